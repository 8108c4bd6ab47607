#!/usr/bin/env bash
# Remove what deploy.sh made: the Cloud Run service, its image, and the token secret of
# public mode. Running it twice is harmless: what is gone already is skipped. It leaves
# your key secret, the service account and the Artifact Registry repository (say so below).
# Settings: the same PROJECT, REGION, SERVICE, REPOSITORY and GCLOUD as deploy.sh.
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
die() { echo "teardown.sh: $*" >&2; exit 1; }
command -v "$GCLOUD" >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
PROJECT=${PROJECT:-$("$GCLOUD" config get-value project 2>/dev/null || true)}
[ -n "$PROJECT" ] || die "no Google Cloud project: set PROJECT=... or run gcloud config set project PROJECT_ID"
REGION=${REGION:-us-central1}
SERVICE=${SERVICE:-research-agent}
REPOSITORY=${REPOSITORY:-research-agent}
G=("$GCLOUD" "--project=$PROJECT" "--quiet")

if "${G[@]}" run services describe "$SERVICE" --region="$REGION" >/dev/null 2>&1; then
    "${G[@]}" run services delete "$SERVICE" --region="$REGION"
else
    echo "teardown.sh: no service $SERVICE"
fi
if "${G[@]}" artifacts packages describe research-agent --repository="$REPOSITORY" --location="$REGION" >/dev/null 2>&1; then
    "${G[@]}" artifacts packages delete research-agent --repository="$REPOSITORY" --location="$REGION"
else
    echo "teardown.sh: no image research-agent in $REPOSITORY"
fi
if "${G[@]}" secrets describe "$SERVICE-token" >/dev/null 2>&1; then
    "${G[@]}" secrets delete "$SERVICE-token"
else
    echo "teardown.sh: no token secret $SERVICE-token"
fi
echo "teardown.sh: done; kept your key secret, the service account $SERVICE@$PROJECT.iam.gserviceaccount.com and the repository $REPOSITORY"
