"""The image run by the real Docker engine the way Cloud Run runs it, its environment taken
from hosting/cloud_run/service.yaml itself: ``PORT`` injected (not 8000), a read-only root with
an in-memory ``/tmp``, the service's memory and CPU limits. A conversation is remembered; SIGTERM
during a turn ends that turn's stream with a retryable ``error`` and ``done`` and the container
exits 0 within Cloud Run's 10 s; with a session store the conversation continues on a new
container once the first is gone (scale to zero and back).

As in tests/system/test_docker.py, containers use host networking with ``HOST=127.0.0.1``:
they reach the local model and Redis on 127.0.0.1, and the test reaches them there.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from harness.processes import free_port
from hosting.cloud_run.check_service import SIGKILL_AFTER_SECONDS, memory_bytes
from hosting.cloud_run.render_service import TEMPLATE, render
from tests.support.images import docker
from tests.support.polling import wait_for
from tests.support.servers import API_KEY, LocalModel
from tests.support.turns import Turn, post_turn

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

RECALL = "What value did I ask you to remember?"
KEY_SECRET, STORE_SECRET = "anthropic-api-key", "agent-session-store"


def service_container(store: bool = False) -> dict[str, Any]:
    """The container as deploy.sh would deploy it (IAM mode; a store secret if ``store``)."""
    service = render(yaml.safe_load(TEMPLATE.read_text()), image="unused", name="research-agent",
                     service_account="sa@example.iam.gserviceaccount.com", key_secret=KEY_SECRET,
                     store_secret=STORE_SECRET if store else None)
    container: dict[str, Any] = service["spec"]["template"]["spec"]["containers"][0]
    return container


class CloudRunInstance:
    """One container started as Cloud Run starts an instance of the service."""

    def __init__(self, image: str, local_model: LocalModel, store_url: str | None = None) -> None:
        container = service_container(store=store_url is not None)
        secrets = {KEY_SECRET: API_KEY, STORE_SECRET: store_url}
        self.port = free_port()  # Cloud Run's PORT: never the image's 8000
        self.name = f"cloud-run-test-{uuid.uuid4().hex[:8]}"
        env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
        env.update({e["name"]: str(secrets[e["valueFrom"]["secretKeyRef"]["name"]])
                    for e in container["env"] if "valueFrom" in e})
        env.update({"PORT": str(self.port), "HOST": "127.0.0.1", "ANTHROPIC_BASE_URL": local_model.base_url,
                    "CLAUDE_CODE_MAX_RETRIES": "0"})
        limits = container["resources"]["limits"]
        docker("run", "-d", "--name", self.name, "--network", "host", "--read-only", "--tmpfs", "/tmp:size=256m",
               f"--memory={memory_bytes(limits['memory'])}", f"--cpus={limits['cpu']}",
               *(arg for key, value in env.items() for arg in ("-e", f"{key}={value}")), image, *container["args"])
        # The startup probe: /ready on the container's port.
        wait_for(lambda: self.ready().get("ready") is True, timeout=90)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.base_url}/ready", timeout=2).json()
        except httpx.TransportError:
            assert docker("inspect", "-f", "{{.State.Running}}", self.name).stdout.strip() == "true", self.logs()
            return {}

    def logs(self) -> str:
        logs = docker("logs", self.name, check=False)
        return (logs.stdout + logs.stderr)[-3000:]  # the server logs to stderr

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture
def instances(agent_image: str, local_model: LocalModel) -> Iterator[Any]:
    """Factory: ``instances(store_url=None)`` starts an instance; all removed at the end."""
    started: list[CloudRunInstance] = []

    def start(store_url: str | None = None) -> CloudRunInstance:
        started.append(CloudRunInstance(agent_image, local_model, store_url))
        return started[-1]

    yield start
    for instance in started:
        instance.remove()


def test_an_instance_remembers_then_sigterm_cuts_its_turn_and_it_exits_0_within_10_s(instances) -> None:
    instance = instances()
    assert service_container()["ports"][0]["containerPort"] != instance.port
    assert post_turn(instance.base_url, "cr-1", "Remember this value: 7311").types[-1] == "done"
    assert "7311" in post_turn(instance.base_url, "cr-1", RECALL).text
    box: list[Turn] = []
    thread = threading.Thread(target=lambda: box.append(
        post_turn(instance.base_url, "cr-2", "[[slow:0.3]] " + " ".join(f"w{n}" for n in range(80)))))
    thread.start()
    wait_for(lambda: instance.ready().get("running_turns") == 1, timeout=30)
    signalled = time.monotonic()
    docker("kill", "--signal", "SIGTERM", instance.name)
    exit_code = docker("wait", instance.name, timeout=30).stdout.strip()
    stopped_after = time.monotonic() - signalled
    thread.join(10)
    assert exit_code == "0", instance.logs()
    assert stopped_after < SIGKILL_AFTER_SECONDS, f"exited {stopped_after:.1f} s after SIGTERM:\n{instance.logs()}"
    (cut,) = box
    assert cut.types[-2:] == ["error", "done"], cut.types
    assert cut.of("error")[0]["code"] == "shutting_down" and cut.of("error")[0]["retryable"] is True


@pytest.mark.stores
def test_with_a_session_store_a_conversation_continues_on_the_next_instance(instances, redis_url: str) -> None:
    first = instances(store_url=redis_url)
    assert post_turn(first.base_url, "cr-store", "Remember this value: 6060").types[-1] == "done"
    docker("stop", "-t", str(SIGKILL_AFTER_SECONDS), first.name)  # scaled to zero: its /tmp is gone with it
    first_logs = first.logs()
    first.remove()
    second = instances(store_url=redis_url)
    recalled = post_turn(second.base_url, "cr-store", RECALL)
    assert recalled.of("session")[0]["resumed"] is True and "6060" in recalled.text, \
        f"{recalled.types}\nfirst:\n{first_logs}\nsecond:\n{second.logs()}"
