"""What a Cloud Run service of the agent must hold, checked before ``deploy.sh`` applies it.

``gcloud run services replace`` accepts much that would not work or would leak: a key
written into the YAML, a probe on a route that needs a token, a data dir on no
writable filesystem, a shutdown longer than Cloud Run's 10 s, a public invoker in IAM
mode. Each rule below is one function returning its complaints, so a test can break a
service one rule at a time (``tests/unit/test_cloud_run_service.py``).

    python -m hosting.cloud_run.check_service SERVICE.yaml --mode iam|public
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

Service = Mapping[str, Any]
MODES = ("iam", "public")

KEY_VARIABLES = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN")
SECRET_VARIABLES = (*KEY_VARIABLES, "AGENT_AUTH_TOKEN", "AGENT_METRICS_TOKEN", "AGENT_SESSION_STORE")
"""Never a literal in the YAML: anyone who can read the service could read them."""
CLOUD_RUN_SETS = ("PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION")
"""Reserved: Cloud Run sets them itself and refuses a service that does."""
MIN_MEMORY_BYTES = 2**30
"""1 GiB: below about 580 MiB not one CLI fits with headroom (README, Memory)."""
SIGKILL_AFTER_SECONDS = 10
"""Cloud Run's SIGTERM-to-SIGKILL interval; the server's shutdown deadline must fall before it."""
MAX_STARTUP_PROBE_SECONDS = 240
"""The longest Cloud Run waits for a startup probe (period × failure threshold)."""
IN_MEMORY_DIR = "/tmp"
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str) -> int | None:
    """A Kubernetes-style quantity (``1Gi``, ``512Mi``) in bytes; ``None`` if it is not one."""
    match = _QUANTITY.fullmatch(str(quantity).strip())
    return None if match is None else int(float(match[1]) * _UNITS[match[2]])


def _template(service: Service) -> Mapping[str, Any]:
    return service.get("spec", {}).get("template", {}) or {}


def _annotations(service: Service) -> Mapping[str, Any]:
    return _template(service).get("metadata", {}).get("annotations", {}) or {}


def _container(service: Service) -> Mapping[str, Any]:
    containers = _template(service).get("spec", {}).get("containers") or [{}]
    return containers[0] or {}


def _env(service: Service) -> dict[str, Mapping[str, Any]]:
    return {entry.get("name", ""): entry for entry in _container(service).get("env") or []}


def _literal(service: Service, name: str) -> str | None:
    entry = _env(service).get(name)
    return None if entry is None or "value" not in entry else str(entry["value"])


def _from_secret(service: Service, name: str) -> bool:
    ref = (_env(service).get(name) or {}).get("valueFrom", {}).get("secretKeyRef", {})
    return bool(ref.get("name")) and bool(ref.get("key"))


def _port(service: Service) -> int | None:
    ports = _container(service).get("ports") or [{}]
    port = ports[0].get("containerPort")
    return port if isinstance(port, int) else None


def shape_errors(service: Service, mode: str) -> list[str]:
    errors = []
    if service.get("apiVersion") != "serving.knative.dev/v1" or service.get("kind") != "Service":
        errors.append("not a serving.knative.dev/v1 Service")
    if not service.get("metadata", {}).get("name"):
        errors.append("metadata.name: the service needs a name")
    if len(_template(service).get("spec", {}).get("containers") or []) != 1:
        errors.append("spec.template.spec.containers: exactly one container, the agent")
    return errors


def serve_errors(service: Service, mode: str) -> list[str]:
    container = _container(service)
    errors = []
    if not container.get("image"):
        errors.append("the container has no image")
    if container.get("command") or container.get("args") != ["serve"]:
        errors.append("the container must run the image's entrypoint with args [serve] (and no command)")
    return errors


def port_errors(service: Service, mode: str) -> list[str]:
    errors = [f"env {name}: set by Cloud Run, not by the service" for name in CLOUD_RUN_SETS if name in _env(service)]
    if _port(service) is None:
        errors.append("ports[0].containerPort: the port Cloud Run sends traffic to (and sets as PORT)")
    return errors


def limit_errors(service: Service, mode: str) -> list[str]:
    limits = _container(service).get("resources", {}).get("limits", {}) or {}
    memory = memory_bytes(limits.get("memory", ""))
    errors = []
    if memory is None or memory < MIN_MEMORY_BYTES:
        errors.append(f"resources.limits.memory: at least 1Gi (got {limits.get('memory')!r})")
    if not limits.get("cpu"):
        errors.append("resources.limits.cpu: set it (the server sizes its CLI starts to it)")
    return errors


def scaling_errors(service: Service, mode: str) -> list[str]:
    annotations = _annotations(service)
    errors = []
    if str(annotations.get("autoscaling.knative.dev/minScale", "0")) != "0":
        errors.append("autoscaling.knative.dev/minScale: 0, so an idle service costs nothing")
    if not str(annotations.get("autoscaling.knative.dev/maxScale", "")).isdigit():
        errors.append("autoscaling.knative.dev/maxScale: a number, the most instances (and model spend) at once")
    concurrency = _template(service).get("spec", {}).get("containerConcurrency")
    if not (isinstance(concurrency, int) and concurrency >= 1):
        errors.append("containerConcurrency: a number of requests per instance (a turn holds one while it streams)")
    if str(annotations.get("run.googleapis.com/sessionAffinity", "")).lower() != "true":
        errors.append("run.googleapis.com/sessionAffinity: \"true\", so a caller stays on its warm instance")
    return errors


def probe_errors(service: Service, mode: str) -> list[str]:
    container = _container(service)
    startup = container.get("startupProbe") or {}
    liveness = container.get("livenessProbe") or {}
    # /ready needs the bearer token when the server has one (public mode), and a probe cannot carry a secret.
    ready_path = "/ready" if mode == "iam" else "/health"
    errors = []
    for name, probe, path in (("startupProbe", startup, ready_path), ("livenessProbe", liveness, "/health")):
        get = probe.get("httpGet") or {}
        if get.get("path") != path:
            errors.append(f"{name}: httpGet on {path} (got {get.get('path')!r})")
        if get.get("port", _port(service)) != _port(service):
            errors.append(f"{name}: probe the container's port {_port(service)}")
    waited = int(startup.get("periodSeconds", 10)) * int(startup.get("failureThreshold", 3))
    if waited > MAX_STARTUP_PROBE_SECONDS:
        errors.append(f"startupProbe: periodSeconds × failureThreshold is {waited} s, over Cloud Run's "
                      f"{MAX_STARTUP_PROBE_SECONDS} s")
    return errors


def secret_errors(service: Service, mode: str) -> list[str]:
    errors = [f"env {name}: a literal value; take it from Secret Manager (valueFrom.secretKeyRef)"
              for name in SECRET_VARIABLES if _literal(service, name) is not None]
    errors += [f"env {name}: its value looks like an Anthropic key; keep keys in Secret Manager"
               for name, entry in _env(service).items() if str(entry.get("value", "")).startswith("sk-ant-")]
    if not any(_from_secret(service, name) for name in KEY_VARIABLES):
        errors.append("env ANTHROPIC_API_KEY (or CLAUDE_CODE_OAUTH_TOKEN): from a secret (valueFrom.secretKeyRef)")
    if "AGENT_SESSION_STORE" in _env(service) and not _from_secret(service, "AGENT_SESSION_STORE"):
        errors.append("env AGENT_SESSION_STORE: its URL holds a password; take it from a secret")
    return errors


def filesystem_errors(service: Service, mode: str) -> list[str]:
    data_dir = _literal(service, "AGENT_DATA_DIR") or "/data"
    errors = []
    if not (data_dir == IN_MEMORY_DIR or data_dir.startswith(IN_MEMORY_DIR + "/")):
        errors.append(f"env AGENT_DATA_DIR: under {IN_MEMORY_DIR} (got {data_dir!r}), the in-memory filesystem the "
                      "container may write to")
    budget = _literal(service, "AGENT_DISK_BUDGET_BYTES")
    memory = memory_bytes((_container(service).get("resources", {}).get("limits", {}) or {}).get("memory", "")) or 0
    if budget is None or not budget.isdigit() or not 0 < int(budget) <= memory // 4:
        errors.append("env AGENT_DISK_BUDGET_BYTES: sessions sit in memory, so cap them (at most a quarter of the "
                      f"memory limit), got {budget!r}")
    return errors


def shutdown_errors(service: Service, mode: str) -> list[str]:
    grace = _literal(service, "AGENT_SHUTDOWN_GRACE_SECONDS")
    try:
        fits = grace is not None and 0 < float(grace) < SIGKILL_AFTER_SECONDS
    except ValueError:
        fits = False
    return [] if fits else [f"env AGENT_SHUTDOWN_GRACE_SECONDS: under Cloud Run's {SIGKILL_AFTER_SECONDS} s before "
                            f"SIGKILL (got {grace!r})"]


def access_errors(service: Service, mode: str) -> list[str]:
    errors = []
    if str(_annotations(service).get("run.googleapis.com/invoker-iam-disabled", "")).lower() == "true" or \
            str(service.get("metadata", {}).get("annotations", {}).get("run.googleapis.com/invoker-iam-disabled",
                                                                        "")).lower() == "true":
        errors.append("run.googleapis.com/invoker-iam-disabled: never; public mode grants allUsers run.invoker "
                      "and the server checks its token")
    if mode == "iam":
        if _literal(service, "AGENT_ALLOW_UNAUTHENTICATED") != "1" and not _from_secret(service, "AGENT_AUTH_TOKEN"):
            errors.append("IAM mode: AGENT_ALLOW_UNAUTHENTICATED=1 (Cloud Run's IAM check is the front door)")
    elif mode == "public":
        if not _from_secret(service, "AGENT_AUTH_TOKEN"):
            errors.append("public mode: AGENT_AUTH_TOKEN from a secret, so the server requires the bearer token")
        if "AGENT_ALLOW_UNAUTHENTICATED" in _env(service):
            errors.append("public mode: no AGENT_ALLOW_UNAUTHENTICATED; the server must require its token")
    else:
        errors.append(f"unknown access mode {mode!r} (one of {', '.join(MODES)})")
    return errors


RULES: tuple[Callable[[Service, str], list[str]], ...] = (
    shape_errors, serve_errors, port_errors, limit_errors, scaling_errors, probe_errors, secret_errors,
    filesystem_errors, shutdown_errors, access_errors,
)


def service_errors(service: Service, mode: str) -> list[str]:
    """Every complaint about ``service`` deployed in access ``mode`` (``iam`` or ``public``); none: deployable."""
    return [error for rule in RULES for error in rule(service, mode)]


def load(path: Path) -> Service:
    service = yaml.safe_load(path.read_text())
    if not isinstance(service, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return service


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check_service", description=__doc__.splitlines()[0])
    parser.add_argument("service", type=Path)
    parser.add_argument("--mode", choices=MODES, default="iam")
    args = parser.parse_args(argv)
    errors = service_errors(load(args.service), args.mode)
    for error in errors:
        print(f"{args.service}: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
