#!/usr/bin/env bash
# Deploy the agent as a Cloud Run service (README.md in this folder).
#
#   hosting/cloud_run/deploy.sh            IAM mode: only principals with roles/run.invoker reach it
#   hosting/cloud_run/deploy.sh --public   public mode: anyone reaches it, the server requires a bearer token
#   ... --local-image                      build with the local Docker engine and push, instead of Cloud Build
#
# Settings (environment): PROJECT (default: gcloud's), REGION (us-central1), SERVICE
# (research-agent), REPOSITORY (research-agent), KEY_SECRET (anthropic-api-key: the Secret
# Manager secret holding ANTHROPIC_API_KEY, made by you), STORE_SECRET (unset: a secret
# holding an AGENT_SESSION_STORE URL, for sessions that outlive instances), MAX_INSTANCES (3),
# TAG (a timestamp), GCLOUD (gcloud), PYTHON (python3, with PyYAML: the cloud-run extra).
# Everything is checked before anything is changed: a missing tool, project or secret stops
# it with one line.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GCLOUD=${GCLOUD:-gcloud}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MODE=iam
BUILD=cloud-build
for arg in "$@"; do
    case "$arg" in
        --public) MODE=public ;;
        --local-image) BUILD=local ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "deploy.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

die() { echo "deploy.sh: $*" >&2; exit 1; }

command -v "$GCLOUD" >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then gcloud auth login"
if [ "$BUILD" = local ]; then
    command -v docker >/dev/null 2>&1 || die "docker not found: drop --local-image to build with Cloud Build"
fi
"$PYTHON" -c "import yaml" 2>/dev/null || die "$PYTHON cannot import yaml: pip install -e '.[cloud-run]' (or set PYTHON)"
PROJECT=${PROJECT:-$("$GCLOUD" config get-value project 2>/dev/null || true)}
[ -n "$PROJECT" ] || die "no Google Cloud project: set PROJECT=... or run gcloud config set project PROJECT_ID"
REGION=${REGION:-us-central1}
SERVICE=${SERVICE:-research-agent}
REPOSITORY=${REPOSITORY:-research-agent}
KEY_SECRET=${KEY_SECRET:-anthropic-api-key}
STORE_SECRET=${STORE_SECRET:-}
MAX_INSTANCES=${MAX_INSTANCES:-3}
TAG=${TAG:-$(date +%Y%m%d-%H%M%S)}
TOKEN_SECRET="$SERVICE-token"
ACCOUNT="$SERVICE@$PROJECT.iam.gserviceaccount.com"
IMAGE="$REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/research-agent:$TAG"
G=("$GCLOUD" "--project=$PROJECT" "--quiet")

"${G[@]}" secrets describe "$KEY_SECRET" >/dev/null 2>&1 || die "no secret $KEY_SECRET in $PROJECT: create it with
  printf %s \"\$ANTHROPIC_API_KEY\" | gcloud secrets create $KEY_SECRET --data-file=- --project=$PROJECT"
if [ -n "$STORE_SECRET" ]; then
    "${G[@]}" secrets describe "$STORE_SECRET" >/dev/null 2>&1 || die "no secret $STORE_SECRET (STORE_SECRET) in $PROJECT"
fi

# The service as it will be deployed, checked before anything changes.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
render=(--image="$IMAGE" --service="$SERVICE" --service-account="$ACCOUNT" --key-secret="$KEY_SECRET"
        --mode="$MODE" --max-instances="$MAX_INSTANCES")
[ "$MODE" = public ] && render+=(--token-secret="$TOKEN_SECRET")
[ -n "$STORE_SECRET" ] && render+=(--store-secret="$STORE_SECRET")
"$PYTHON" -m hosting.cloud_run.render_service "${render[@]}" >"$WORK/service.yaml"
"$PYTHON" -m hosting.cloud_run.check_service "$WORK/service.yaml" --mode="$MODE" || die "the rendered service fails its checks (above)"

echo "deploy.sh: $SERVICE in $PROJECT/$REGION, $MODE mode"
"${G[@]}" services enable run.googleapis.com artifactregistry.googleapis.com cloudbuild.googleapis.com \
    secretmanager.googleapis.com
"${G[@]}" artifacts repositories describe "$REPOSITORY" --location="$REGION" >/dev/null 2>&1 ||
    "${G[@]}" artifacts repositories create "$REPOSITORY" --location="$REGION" --repository-format=docker
"${G[@]}" iam service-accounts describe "$ACCOUNT" >/dev/null 2>&1 ||
    "${G[@]}" iam service-accounts create "$SERVICE" --display-name="research agent (Cloud Run)"

if [ "$BUILD" = local ]; then
    docker build -f "$ROOT/hosting/Dockerfile" -t "$IMAGE" "$ROOT"
    "${G[@]}" auth configure-docker "$REGION-docker.pkg.dev"
    docker push "$IMAGE"
else
    "${G[@]}" builds submit "$ROOT" --config="$ROOT/hosting/cloud_run/cloudbuild.yaml" --substitutions="_IMAGE=$IMAGE"
fi

# The runtime service account reads only the secrets this service needs.
secrets=("$KEY_SECRET")
[ -n "$STORE_SECRET" ] && secrets+=("$STORE_SECRET")
if [ "$MODE" = public ]; then
    if ! "${G[@]}" secrets describe "$TOKEN_SECRET" >/dev/null 2>&1; then
        "$PYTHON" -c "import secrets, sys; sys.stdout.write(secrets.token_urlsafe(32))" |
            "${G[@]}" secrets create "$TOKEN_SECRET" --data-file=- --replication-policy=automatic
    fi
    secrets+=("$TOKEN_SECRET")
fi
for secret in "${secrets[@]}"; do
    "${G[@]}" secrets add-iam-policy-binding "$secret" --member="serviceAccount:$ACCOUNT" \
        --role=roles/secretmanager.secretAccessor >/dev/null
done

public_invoker=""
if "${G[@]}" run services describe "$SERVICE" --region="$REGION" >/dev/null 2>&1; then
    public_invoker=$("${G[@]}" run services get-iam-policy "$SERVICE" --region="$REGION" --flatten=bindings \
        --filter="bindings.role=roles/run.invoker AND bindings.members:allUsers" --format="value(bindings.role)")
fi
if [ "$MODE" = iam ] && [ -n "$public_invoker" ]; then
    # An earlier --public deploy opened it to allUsers: closed before a revision without a token serves.
    "${G[@]}" run services remove-iam-policy-binding "$SERVICE" --region="$REGION" --member=allUsers \
        --role=roles/run.invoker >/dev/null
fi
"${G[@]}" run services replace "$WORK/service.yaml" --region="$REGION"
if [ "$MODE" = public ] && [ -z "$public_invoker" ]; then  # opened once the revision requires the token
    "${G[@]}" run services add-iam-policy-binding "$SERVICE" --region="$REGION" --member=allUsers \
        --role=roles/run.invoker >/dev/null
fi
URL=$("${G[@]}" run services describe "$SERVICE" --region="$REGION" --format="value(status.url)")

echo "url: $URL"
if [ "$MODE" = public ]; then
    cat <<HOW
Anyone can reach it; the server answers only the bearer token, kept in Secret Manager:
  TOKEN=\$(gcloud secrets versions access latest --secret=$TOKEN_SECRET --project=$PROJECT)
  curl -N -X POST $URL/sessions/demo/messages -H "Authorization: Bearer \$TOKEN" \\
       -H 'content-type: application/json' -d '{"prompt": "Remember this value: 42"}'
HOW
else
    cat <<HOW
Only principals with roles/run.invoker reach it. From your machine, through an authenticated proxy:
  gcloud run services proxy $SERVICE --region=$REGION --project=$PROJECT --port=8080
  curl -N -X POST http://127.0.0.1:8080/sessions/demo/messages \\
       -H 'content-type: application/json' -d '{"prompt": "Remember this value: 42"}'
HOW
fi
