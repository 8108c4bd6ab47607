"""hosting/cloud_run/deploy.sh and teardown.sh against a recording stand-in of ``gcloud``
(tests/standins/gcloud.py), which fails on any call it does not know: what each access mode
deploys, that IAM mode never makes the service public, that a missing ``gcloud`` or project
stops the script before it changes anything, and that tearing down twice is harmless."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hosting.cloud_run.check_service import service_errors
from tests.support import ROOT

SCRIPTS = ROOT / "hosting/cloud_run"
PROJECT = "agent-test-project"


@dataclass
class Cloud:
    """A project as the stand-in keeps it, and every call the scripts made."""

    home: Path

    @property
    def log(self) -> Path:
        return self.home / "calls.jsonl"

    @property
    def state(self) -> Path:
        return self.home / "state.json"

    def calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def argvs(self) -> list[str]:
        """Each call as its command words, then its flags."""
        return [" ".join([*words(call), *(a for a in call["argv"] if a.startswith("--"))]) for call in self.calls()]

    def resources(self) -> dict[str, list[str]]:
        return json.loads(self.state.read_text()) if self.state.exists() else {}

    def run(self, script: str, *args: str, project: str | None = PROJECT, **env: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "PATH": f"{self.home / 'bin'}:{os.environ['PATH']}", "PYTHON": sys.executable,
                       "GCLOUD_STANDIN_LOG": str(self.log), "GCLOUD_STANDIN_STATE": str(self.state), "TAG": "t1", **env}
        environment.pop("PROJECT", None)
        if project is not None:
            environment["GCLOUD_STANDIN_PROJECT"] = project
        return subprocess.run([str(SCRIPTS / script), *args], env=environment, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)


@pytest.fixture
def cloud(tmp_path: Path) -> Cloud:
    """A project holding the key secret (made by the operator, as the README says)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = bin_dir / "gcloud"
    standin.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests/standins/gcloud.py'} \"$@\"\n")
    standin.chmod(0o755)
    cloud = Cloud(tmp_path)
    cloud.state.write_text(json.dumps({"secrets": ["anthropic-api-key"]}))
    return cloud


def words(call: dict[str, Any]) -> list[str]:
    """A recorded call's command words (gcloud's global flags come first in the scripts' calls)."""
    return [a for a in call["argv"] if not a.startswith("--")]


def deployed_service(cloud: Cloud) -> dict[str, Any]:
    (replaced,) = [call for call in cloud.calls() if words(call)[:3] == ["run", "services", "replace"]]
    return yaml.safe_load(replaced["yaml"])


def test_the_scripts_pass_shellcheck() -> None:
    result = subprocess.run(["shellcheck", str(SCRIPTS / "deploy.sh"), str(SCRIPTS / "teardown.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_iam_mode_deploys_the_checked_service_and_never_makes_it_public(cloud: Cloud) -> None:
    result = cloud.run("deploy.sh")
    assert result.returncode == 0, result.stderr
    calls = cloud.argvs()
    assert not any("add-iam-policy-binding" in call and ("allUsers" in call or "allAuthenticatedUsers" in call)
                   for call in calls), calls
    assert not cloud.resources().get("public")
    assert all(f"--project={PROJECT}" in call for call in calls if not call.startswith("config ")), calls
    image = f"us-central1-docker.pkg.dev/{PROJECT}/research-agent/research-agent:t1"
    assert any(call.startswith("builds submit") and f"--substitutions=_IMAGE={image}" in call for call in calls)
    account = f"research-agent@{PROJECT}.iam.gserviceaccount.com"
    assert any(call.startswith("secrets add-iam-policy-binding anthropic-api-key")
               and f"--member=serviceAccount:{account}" in call and "secretAccessor" in call for call in calls)
    service = deployed_service(cloud)
    assert service_errors(service, "iam") == []
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == image and service["spec"]["template"]["spec"]["serviceAccountName"] == account
    assert "gcloud run services proxy research-agent" in result.stdout
    assert cloud.resources()["services"] == ["research-agent"] and "research-agent-token" not in cloud.resources()["secrets"]


def test_public_mode_keeps_a_generated_token_in_secret_manager_and_grants_all_users(cloud: Cloud) -> None:
    cloud.state.write_text(json.dumps({"secrets": ["anthropic-api-key", "agent-store"]}))
    result = cloud.run("deploy.sh", "--public", STORE_SECRET="agent-store", MAX_INSTANCES="2")
    assert result.returncode == 0, result.stderr
    calls = cloud.calls()
    (created,) = [c for c in calls if words(c)[:3] == ["secrets", "create", "research-agent-token"]]
    assert created["stdin"], "the token goes in on stdin, never on a command line"
    bound = {words(c)[2] for c in calls if words(c)[:2] == ["secrets", "add-iam-policy-binding"]}
    assert bound == {"anthropic-api-key", "agent-store", "research-agent-token"}
    assert any(words(c) == ["run", "services", "add-iam-policy-binding", "research-agent"]
               and "--member=allUsers" in c["argv"] and "--role=roles/run.invoker" in c["argv"] for c in calls)
    service = deployed_service(cloud)
    assert service_errors(service, "public") == []
    assert service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/maxScale"] == "2"
    assert "gcloud secrets versions access latest --secret=research-agent-token" in result.stdout
    again = cloud.run("deploy.sh", "--public", STORE_SECRET="agent-store")
    assert again.returncode == 0, again.stderr
    assert len([c for c in cloud.calls() if words(c)[:2] == ["secrets", "create"]]) == 1, "the token is kept"
    assert cloud.resources()["public"] == ["research-agent"]


def test_an_iam_deploy_takes_back_what_an_earlier_public_deploy_opened(cloud: Cloud) -> None:
    assert cloud.run("deploy.sh", "--public").returncode == 0
    assert cloud.resources()["public"] == ["research-agent"]
    result = cloud.run("deploy.sh")
    assert result.returncode == 0, result.stderr
    assert cloud.resources()["public"] == [], "IAM mode never leaves the service public"
    calls = [words(c)[:3] for c in cloud.calls()]
    closed = max(i for i, c in enumerate(calls) if c == ["run", "services", "remove-iam-policy-binding"])
    replaced = max(i for i, c in enumerate(calls) if c == ["run", "services", "replace"])
    assert closed < replaced, "closed before the revision without a token serves"


@pytest.mark.parametrize("script", ["deploy.sh", "teardown.sh"])
def test_no_gcloud_or_no_project_is_one_clear_line_and_changes_nothing(cloud: Cloud, script: str) -> None:
    missing = cloud.run(script, GCLOUD=str(cloud.home / "no-such-gcloud"))
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1 and "gcloud not found" in missing.stderr
    assert cloud.calls() == []
    unset = cloud.run(script, project=None)
    assert unset.returncode != 0 and unset.stderr.count("\n") == 1 and "no Google Cloud project" in unset.stderr
    assert cloud.argvs() == ["config get-value project"]


def test_deploy_without_the_key_secret_says_how_to_make_it_and_changes_nothing(cloud: Cloud) -> None:
    cloud.state.write_text("{}")
    result = cloud.run("deploy.sh")
    assert result.returncode != 0 and "gcloud secrets create anthropic-api-key" in result.stderr
    assert all(call.split()[1] in ("get-value", "describe") for call in cloud.argvs()), cloud.argvs()


def test_teardown_removes_what_deploy_made_and_twice_is_harmless(cloud: Cloud) -> None:
    assert cloud.run("deploy.sh", "--public").returncode == 0
    first = cloud.run("teardown.sh")
    assert first.returncode == 0, first.stderr
    left = cloud.resources()
    assert left["services"] == [] and left["packages"] == [] and left["secrets"] == ["anthropic-api-key"]
    second = cloud.run("teardown.sh")
    assert second.returncode == 0, second.stderr
    assert "no service research-agent" in second.stdout and cloud.resources() == left
