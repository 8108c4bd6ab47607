"""``service.yaml`` made into one deployment's service: its names, image, access mode, store.

``service.yaml`` is the IAM-mode service with placeholders; ``deploy.sh`` renders it with
this module and checks the result (:mod:`hosting.cloud_run.check_service`) before
``gcloud run services replace``. Public mode swaps the IAM opt-out
(``AGENT_ALLOW_UNAUTHENTICATED``) for the bearer token from its secret, and the startup probe
to ``/health``: ``/ready`` needs the token, which a probe cannot carry.

    python -m hosting.cloud_run.render_service --image IMAGE --service NAME --service-account SA \\
        --key-secret SECRET [--mode public --token-secret SECRET] [--store-secret SECRET] [--max-instances N]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from hosting.cloud_run.check_service import MODES, load

TEMPLATE = Path(__file__).with_name("service.yaml")


def _secret(name: str, secret: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": "latest"}}}


def render(service: dict[str, Any], *, image: str, name: str, service_account: str, key_secret: str,
           mode: str = "iam", token_secret: str | None = None, store_secret: str | None = None,
           max_instances: int | None = None) -> dict[str, Any]:
    """A copy of ``service`` for one deployment (``ValueError`` for a public mode with no token secret)."""
    if mode not in MODES:
        raise ValueError(f"unknown access mode {mode!r}")
    if mode == "public" and not token_secret:
        raise ValueError("public mode needs the token's secret")
    rendered = copy.deepcopy(service)
    rendered["metadata"]["name"] = name
    template = rendered["spec"]["template"]
    if max_instances is not None:
        template["metadata"]["annotations"]["autoscaling.knative.dev/maxScale"] = str(max_instances)
    template["spec"]["serviceAccountName"] = service_account
    container = template["spec"]["containers"][0]
    container["image"] = image
    env = [entry for entry in container["env"] if entry["name"] != "ANTHROPIC_API_KEY"]
    env.insert(0, _secret("ANTHROPIC_API_KEY", key_secret))
    if mode == "public":
        env = [entry for entry in env if entry["name"] != "AGENT_ALLOW_UNAUTHENTICATED"]
        env.insert(1, _secret("AGENT_AUTH_TOKEN", token_secret or ""))
        container["startupProbe"]["httpGet"]["path"] = "/health"
    if store_secret:
        env.append(_secret("AGENT_SESSION_STORE", store_secret))
    container["env"] = env
    return rendered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="render_service", description=__doc__.splitlines()[0])
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--image", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--service-account", required=True)
    parser.add_argument("--key-secret", required=True)
    parser.add_argument("--mode", choices=MODES, default="iam")
    parser.add_argument("--token-secret")
    parser.add_argument("--store-secret")
    parser.add_argument("--max-instances", type=int)
    args = parser.parse_args(argv)
    try:
        rendered = render(dict(load(args.template)), image=args.image, name=args.service,
                          service_account=args.service_account, key_secret=args.key_secret, mode=args.mode,
                          token_secret=args.token_secret, store_secret=args.store_secret,
                          max_instances=args.max_instances)
    except ValueError as exc:
        print(f"render_service: {exc}", file=sys.stderr)
        return 2
    yaml.safe_dump(rendered, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
