"""The Cloud Run service (hosting/cloud_run/service.yaml): as committed and as deploy.sh renders it
in both access modes it passes every rule of the checker, and each rule fails on a service broken
in just that way."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from hosting.cloud_run.check_service import RULES, load, service_errors
from hosting.cloud_run.render_service import TEMPLATE, render

Service = dict[str, Any]


def rendered(mode: str, **extra: Any) -> Service:
    return render(dict(load(TEMPLATE)), image="europe-west1-docker.pkg.dev/p/research-agent/research-agent:abc",
                  name="research-agent", service_account="research-agent@p.iam.gserviceaccount.com",
                  key_secret="anthropic-api-key", mode=mode,
                  token_secret="research-agent-token" if mode == "public" else None, **extra)


def container(service: Service) -> Service:
    return service["spec"]["template"]["spec"]["containers"][0]


def annotations(service: Service) -> Service:
    return service["spec"]["template"]["metadata"]["annotations"]


def env(service: Service) -> list[Service]:
    return container(service)["env"]


def set_env(name: str, value: str) -> Callable[[Service], None]:
    def mutate(service: Service) -> None:
        env(service)[:] = [e for e in env(service) if e["name"] != name] + [{"name": name, "value": value}]
    return mutate


def drop_env(name: str) -> Callable[[Service], None]:
    def mutate(service: Service) -> None:
        env(service)[:] = [e for e in env(service) if e["name"] != name]
    return mutate


def test_the_committed_service_is_the_iam_mode_service_and_parses_as_knative() -> None:
    service = load(TEMPLATE)
    assert service["apiVersion"] == "serving.knative.dev/v1" and service["kind"] == "Service"
    assert service_errors(service, "iam") == []


@pytest.mark.parametrize("mode", ["iam", "public"])
def test_the_rendered_service_passes_every_rule_with_or_without_a_store(mode: str) -> None:
    assert service_errors(rendered(mode), mode) == []
    with_store = rendered(mode, store_secret="agent-session-store", max_instances=5)
    assert service_errors(with_store, mode) == []
    assert {"name": "AGENT_SESSION_STORE",
            "valueFrom": {"secretKeyRef": {"name": "agent-session-store", "key": "latest"}}} in env(with_store)
    assert annotations(with_store)["autoscaling.knative.dev/maxScale"] == "5"


def test_public_mode_requires_the_token_from_its_secret_and_drops_the_iam_opt_out() -> None:
    public = rendered("public")
    names = {e["name"]: e for e in env(public)}
    assert names["AGENT_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "research-agent-token"
    assert "AGENT_ALLOW_UNAUTHENTICATED" not in names
    with pytest.raises(ValueError, match="token"):
        render(dict(load(TEMPLATE)), image="i", name="n", service_account="s", key_secret="k", mode="public")


BROKEN: list[tuple[str, str, Callable[[Service], None], str]] = [
    ("shape", "iam", lambda s: s.update(apiVersion="v1"), "serving.knative.dev/v1"),
    ("shape", "iam", lambda s: s["spec"]["template"]["spec"]["containers"].append({"image": "x"}), "exactly one"),
    ("serve", "iam", lambda s: container(s).update(args=["python", "-m", "hosting.server"]), "args [serve]"),
    ("serve", "iam", lambda s: container(s).pop("image"), "no image"),
    ("port", "iam", set_env("PORT", "8080"), "env PORT: set by Cloud Run"),
    ("port", "iam", lambda s: container(s).pop("ports"), "containerPort"),
    ("limit", "iam", lambda s: container(s)["resources"]["limits"].update(memory="512Mi"), "at least 1Gi"),
    ("limit", "iam", lambda s: container(s)["resources"]["limits"].pop("cpu"), "limits.cpu"),
    ("scaling", "iam", lambda s: annotations(s).update({"autoscaling.knative.dev/minScale": "1"}), "minScale"),
    ("scaling", "iam", lambda s: annotations(s).pop("autoscaling.knative.dev/maxScale"), "maxScale"),
    ("scaling", "iam", lambda s: s["spec"]["template"]["spec"].pop("containerConcurrency"), "containerConcurrency"),
    ("scaling", "iam", lambda s: annotations(s).pop("run.googleapis.com/sessionAffinity"), "sessionAffinity"),
    ("probe", "iam", lambda s: container(s)["startupProbe"]["httpGet"].update(path="/health"), "startupProbe"),
    ("probe", "public", lambda s: container(s)["startupProbe"]["httpGet"].update(path="/ready"), "startupProbe"),
    ("probe", "iam", lambda s: container(s).pop("livenessProbe"), "livenessProbe"),
    ("probe", "iam", lambda s: container(s)["livenessProbe"]["httpGet"].update(port=9000), "container's port"),
    ("probe", "iam", lambda s: container(s)["startupProbe"].update(failureThreshold=200), "240 s"),
    ("secret", "iam", set_env("ANTHROPIC_API_KEY", "sk-ant-api03-literal"), "literal value"),
    ("secret", "iam", set_env("MODEL_NOTE", "sk-ant-api03-literal"), "looks like an Anthropic key"),
    ("secret", "iam", drop_env("ANTHROPIC_API_KEY"), "from a secret"),
    ("secret", "iam", set_env("AGENT_SESSION_STORE", "redis://:pw@10.0.0.3:6379/0"), "AGENT_SESSION_STORE"),
    ("secret", "public", set_env("AGENT_AUTH_TOKEN", "hunter2"), "AGENT_AUTH_TOKEN: a literal value"),
    ("filesystem", "iam", set_env("AGENT_DATA_DIR", "/data"), "AGENT_DATA_DIR"),
    ("filesystem", "iam", drop_env("AGENT_DISK_BUDGET_BYTES"), "AGENT_DISK_BUDGET_BYTES"),
    ("filesystem", "iam", set_env("AGENT_DISK_BUDGET_BYTES", str(2**30)), "a quarter of the memory"),
    ("shutdown", "iam", set_env("AGENT_SHUTDOWN_GRACE_SECONDS", "30"), "AGENT_SHUTDOWN_GRACE_SECONDS"),
    ("shutdown", "iam", drop_env("AGENT_SHUTDOWN_GRACE_SECONDS"), "AGENT_SHUTDOWN_GRACE_SECONDS"),
    ("access", "iam", lambda s: annotations(s).update({"run.googleapis.com/invoker-iam-disabled": "true"}),
     "invoker-iam-disabled"),
    ("access", "iam", drop_env("AGENT_ALLOW_UNAUTHENTICATED"), "IAM mode"),
    ("access", "public", drop_env("AGENT_AUTH_TOKEN"), "public mode: AGENT_AUTH_TOKEN"),
    ("access", "public", set_env("AGENT_ALLOW_UNAUTHENTICATED", "1"), "public mode: no AGENT_ALLOW_UNAUTHENTICATED"),
]


@pytest.mark.parametrize(("rule", "mode", "mutate", "complaint"), BROKEN,
                         ids=[f"{rule}-{complaint}" for rule, _, _, complaint in BROKEN])
def test_each_rule_fails_on_a_service_broken_its_way(rule: str, mode: str, mutate: Callable[[Service], None],
                                                     complaint: str) -> None:
    service = copy.deepcopy(rendered(mode))
    mutate(service)
    errors = service_errors(service, mode)
    assert any(complaint in error for error in errors), errors
    (checker,) = [r for r in RULES if r.__name__ == f"{rule}_errors"]
    assert checker(service, mode), f"the {rule} rule itself complains"


def test_every_rule_has_a_failing_case() -> None:
    assert {f"{rule}_errors" for rule, *_ in BROKEN} == {rule.__name__ for rule in RULES}
