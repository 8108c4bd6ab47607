"""The container tier on a real Docker engine: image, run-once, serve, restarts, compose.

Needs a running engine (``scripts/start-dockerd.sh`` as root). The image is
built on the offline base from ``hosting/docker/build-base-image.sh``. All
traffic stays on 127.0.0.1: containers use host networking, compose publishes
on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest

from harness.processes import free_port
from tests.support import ROOT
from tests.support.images import BASE_IMAGE, docker
from tests.support.polling import wait_for
from tests.support.servers import API_KEY, healthy
from tests.support.turns import post_turn

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

RECALL = "What value did I ask you to remember?"


@pytest.fixture
def image(agent_image: str) -> str:
    """The product image, built once per run by conftest (the gateway and backend tests share it)."""
    return agent_image


@pytest.fixture
def resources() -> Iterator[dict[str, list[str]]]:
    """Containers and volumes a test created; removed even if it fails."""
    created: dict[str, list[str]] = {"containers": [], "volumes": []}
    yield created
    for name in created["containers"]:
        docker("rm", "-f", name, check=False)
    for name in created["volumes"]:
        docker("volume", "rm", "-f", name, check=False)


def model_env(local_model) -> list[str]:
    env = {"ANTHROPIC_BASE_URL": local_model.base_url, "ANTHROPIC_API_KEY": API_KEY, "CLAUDE_CODE_MAX_RETRIES": "0",
           "AGENT_PREWARM": "2"}  # the default pool (12) is sized for serving, not for a test
    return [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]


def test_image_runs_as_non_root_with_a_fixed_workdir_and_healthcheck(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "agent"
    assert config["WorkingDir"] == "/app"
    assert config["Entrypoint"] == ["/app/hosting/entrypoint.sh"]
    assert "/data" in config["Volumes"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() != "0"


def test_run_once_prints_the_answer_and_exits_0(image, local_model):
    proc = docker("run", "--rm", "--network", "host", *model_env(local_model), "-e", "PROMPT=What do otters eat?", image)
    assert proc.stdout.startswith("Local model answer to: What do otters eat?")


def test_run_once_without_prompt_exits_2(image, local_model):
    proc = docker("run", "--rm", "--network", "host", *model_env(local_model), image, check=False)
    assert proc.returncode == 2 and "PROMPT" in proc.stderr


def test_run_once_api_error_exits_nonzero(image, local_model):
    proc = docker("run", "--rm", "--network", "host", *model_env(local_model), "-e", "PROMPT=x [[error:500]]",
                  image, check=False)
    assert proc.returncode == 1 and "API Error: 500" in proc.stderr


def _serve(image, local_model, resources, volume: str, port: int) -> str:
    name = f"agent-test-{uuid.uuid4().hex[:8]}"
    resources["containers"].append(name)
    docker("run", "-d", "--name", name, "--network", "host", *model_env(local_model),
           "-e", "HOST=127.0.0.1", "-e", f"PORT={port}", "-v", f"{volume}:/data", image, "serve")
    wait_for(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy", timeout=90)
    return name


def test_serve_container_keeps_conversations_across_restart_and_recreate(image, local_model, resources):
    volume = f"agent-test-{uuid.uuid4().hex[:8]}"
    resources["volumes"].append(volume)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    name = _serve(image, local_model, resources, volume, port)
    assert docker("exec", name, "id", "-un").stdout.strip() == "agent"
    post_turn(base, "boxed", "Remember this value: dock1")
    assert "You asked me to remember dock1." in post_turn(base, "boxed", RECALL).text

    docker("restart", name)
    wait_for(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy", timeout=90)
    assert "You asked me to remember dock1." in post_turn(base, "boxed", RECALL).text

    docker("rm", "-f", name)
    _serve(image, local_model, resources, volume, port)
    turn = post_turn(base, "boxed", RECALL)
    assert turn.of("session")[0]["resumed"] is True
    assert "You asked me to remember dock1." in turn.text


def test_compose_up_recall_down(image):
    project = f"agenttest{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {**os.environ, "AGENT_IMAGE": image, "AGENT_PORT": str(port), "ANTHROPIC_API_KEY": "local",
           "ANTHROPIC_BASE_URL": "http://local-model:8787"}
    env.pop("AGENT_AUTH_TOKEN", None)
    compose = ["docker-compose", "-f", str(ROOT / "hosting/docker/docker-compose.yml"), "-p", project, "--profile", "local"]
    # The compose file requires a token: without one nothing starts, with a clear message.
    refused = subprocess.run([*compose, "up", "-d", "--no-build"], env=env, timeout=300, capture_output=True, text=True)
    assert refused.returncode != 0 and "set AGENT_AUTH_TOKEN" in refused.stderr, refused.stderr
    env["AGENT_AUTH_TOKEN"] = token = "compose-token-5e2a"
    bearer = {"authorization": f"Bearer {token}"}
    try:
        subprocess.run([*compose, "up", "-d", "--no-build"], env=env, check=True, timeout=300, capture_output=True)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(base), timeout=90)
        assert httpx.get(f"{base}/ready").status_code == 401
        post_turn(base, "composed", "Remember this value: comp5", headers=bearer)
        assert "You asked me to remember comp5." in post_turn(base, "composed", RECALL, headers=bearer).text
    finally:
        subprocess.run([*compose, "down", "-v"], env=env, timeout=300, capture_output=True)
    assert docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}").stdout.strip() == ""


PLAIN_DEBIAN = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get purge -y python3-pip python3-venv python3.11-venv >/dev/null && rm -f /usr/local/bin/pip* \\
    && useradd -m dev
USER dev
WORKDIR /home/dev
"""


def test_main_job_works_for_a_non_root_user_on_plain_debian(image, tmp_path):
    """The README's first command on Debian's python3 with no pip, no venv, no root."""
    from tests.e2e.test_quickstart import BLOCKS

    docker_dir = tmp_path / "plain"
    docker_dir.mkdir()
    (docker_dir / "Dockerfile").write_text(PLAIN_DEBIAN)
    docker("build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", "plain-debian:test",
           str(docker_dir))
    assert "No module named pip" in docker("run", "--rm", "plain-debian:test", "python3", "-m", "pip", check=False).stderr
    source = tmp_path / "repo"
    source.mkdir()
    subprocess.run(f"git archive HEAD | tar -x -C {source}", shell=True, cwd=ROOT, check=True)
    proc = docker("run", "--rm", "--network", "host", "-v", f"{source}:/src:ro", "plain-debian:test",
                  "sh", "-c", f"cp -r /src repo && cd repo && {BLOCKS[0].strip()}", timeout=900)
    assert "OK: the second turn recalled" in proc.stdout
