"""The walkthrough notebook, executed top to bottom in a real kernel, as a learner runs it.

nbclient starts a kernel from this venv and runs every cell, offline: the notebook starts
the local model, runs the product image (built once per session by ``agent_image``, handed
over as ``NOTEBOOK_AGENT_IMAGE`` so nothing is pulled or rebuilt), compose, the Modal
stand-in and a gateway, and tears all of it down in its last cell. If a cell fails, the
test runs that teardown in the same kernel, then removes whatever is still left itself.
The executed notebook is saved to ``test-artifacts/notebook/`` for inspection.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.v4 import new_code_cell

from harness.processes import alive, descendants
from tests.support import ROOT
from tests.support.images import BASE_IMAGE, docker

pytestmark = [pytest.mark.e2e, pytest.mark.docker, pytest.mark.timeout(1800)]

NOTEBOOK = ROOT / "notebooks" / "hosting_walkthrough.ipynb"
ARTIFACT = ROOT / "test-artifacts" / "notebook" / "hosting_walkthrough.ipynb"
LABEL = "research-agent.walkthrough"
RECALLED = "answer: You asked me to remember 42."


@dataclass
class Executed:
    notebook: nbformat.NotebookNode
    failure: CellExecutionError | None
    processes_left: set[int]
    """Processes below the kernel still alive after the notebook's teardown."""
    containers_left: list[str]
    """Containers of this run (its label, compose project, Modal stand-in) left after teardown."""

    def output(self, marker: str) -> str:
        """The text output of the one code cell whose source contains ``marker``."""
        (cell,) = [c for c in self.notebook.cells if c.cell_type == "code" and marker in c.source]
        return "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in cell.outputs)

    @property
    def all_output(self) -> str:
        return printed(self.notebook)


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook's cells printed."""
    return "".join(str(o.get("text", "")) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def kernel_env(run_id: str, image: str) -> dict[str, str]:
    """Offline whatever this machine has set: no credentials, no Modal or notebook settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_", "AGENT_", "MODAL_", "NOTEBOOK_"))}
    return {**env, "NOTEBOOK_AGENT_IMAGE": image, "NOTEBOOK_BASE_IMAGE": BASE_IMAGE, "NOTEBOOK_RUN_ID": run_id}


def containers_of(labels: list[str]) -> list[str]:
    return [cid for label in labels for cid in docker("ps", "-aq", "--filter", f"label={label}").stdout.split()]


@pytest.fixture(scope="module")
def executed(agent_image: str) -> Iterator[Executed]:
    run_id = f"nbtest{uuid.uuid4().hex[:8]}"
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    failure: CellExecutionError | None = None
    labels = [f"{LABEL}={run_id}", f"com.docker.compose.project={run_id}"]
    try:
        with client.setup_kernel(env=kernel_env(run_id, agent_image)):
            kernel_pid = client.km.provisioner.pid  # type: ignore[union-attr]
            try:
                for index, cell in enumerate(notebook.cells):
                    if cell.cell_type == "code":
                        client.execute_cell(cell, index)
            except CellExecutionError as exc:
                failure = exc
                try:
                    notebook.cells.append(new_code_cell("wt.teardown()"))
                    client.execute_cell(notebook.cells[-1], len(notebook.cells) - 1)
                except CellExecutionError:
                    pass  # what it could not stop is stopped below
            finally:
                # Still below the kernel, so certainly the notebook's: checked, then stopped.
                processes_left = alive(descendants(kernel_pid))
                for pid in processes_left:
                    os.kill(pid, signal.SIGKILL)
        standin = re.search(r"modal-standin=(standin-[0-9a-f]+)", printed(notebook))
        if standin:
            labels.append(f"modal-standin={standin.group(1)}")
        containers_left = containers_of(labels)
        ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, ARTIFACT)
        yield Executed(notebook, failure, processes_left, containers_left)
    finally:  # whatever the notebook's teardown missed
        subprocess.run(["docker-compose", "-f", str(ROOT / "hosting/docker/docker-compose.yml"), "-p", run_id,
                        "--profile", "local", "down", "-v"], capture_output=True, timeout=300,
                       env={**os.environ, "AGENT_AUTH_TOKEN": "teardown"})  # the file requires one
        for cid in containers_of(labels):
            docker("rm", "-f", cid, check=False)


def test_every_cell_runs_offline_with_docker(executed: Executed) -> None:
    """No cell failed; the run was offline (the local model and the Modal stand-in each say
    what they are not) and the Docker cells really ran rather than printing their commands."""
    assert executed.failure is None, str(executed.failure)
    code_cells = [c for c in executed.notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells)
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert "mode: offline" in executed.output("settings = wt.Settings.from_env()")
    assert "LOCAL MODEL: deterministic scripted replies as 'local-model-not-claude', NOT Claude" in executed.output(
        '"-m", "hosting.local_model"')
    assert "MODAL STAND-IN: a local imitation of Modal's control plane, NOT Modal" in executed.output("ModalStandIn(")
    assert "not available" not in executed.all_output


def test_the_agent_and_the_batch_tier(executed: Executed) -> None:
    """The prompt and tool policy come from research_agent; one docker run prints one answer."""
    assert "tools that exist: ['WebSearch']" in executed.output("SYSTEM_PROMPT")
    assert "Local model answer to: What is the tallest tree species?" in executed.output("PROMPT=")


def test_recall_on_every_tier(executed: Executed) -> None:
    """The follow-up recalls the first turn: on compose (also after a restart), through the
    Modal tunnel, and through the gateway (curl and the Python client)."""
    compose = executed.output('wt.turn(SERVER, "demo", "Remember this value: 42", raw=True,')
    assert "event: session" in compose and "event: done" in compose and RECALLED in compose
    assert RECALLED in executed.output("restart agent")
    assert "down -v" in executed.output('wt.undo("compose")')
    assert "url: https://127.0.0.1:" in executed.output("modal_app.py")
    assert RECALLED in executed.output('deployed["url"]')
    assert "deleted volume research-agent-walkthrough-data" in executed.output('wt.undo("modal")')
    assert RECALLED in executed.output('wt.turn(GATEWAY, "trip-1"')
    assert "alice: You asked me to remember 42." in executed.output("SessionNotFoundError")


def test_tenants_kubernetes_and_metrics(executed: Executed) -> None:
    """The gateway's warm pool fills and alice's first turn claims it; no token is 401 and another tenant's session is
    unknown to bob (404); the kind overlay renders; /metrics counts alice's turns."""
    assert '"ready":1' in executed.output("/admin/pool")
    refused = executed.output("BOB_TOKEN")
    assert "HTTP/1.1 401" in refused and "HTTP/1.1 404 Not Found" in refused
    assert "bob: 404" in executed.output("SessionNotFoundError")
    kinds = {line.split()[0] for line in executed.output("kubectl kustomize").splitlines()[1:] if line.strip()}
    assert {"Deployment", "NetworkPolicy", "Role", "StatefulSet"} <= kinds
    metrics = executed.output("/metrics")
    assert 'agent_gateway_warm_pool_claims_total{result="claimed"} 1.0' in metrics
    assert re.search(r'agent_gateway_turns_total\{.*outcome="completed".*tenant="alice"\} [1-9]', metrics)


def test_teardown_leaves_nothing_running(executed: Executed) -> None:
    """The last cell says nothing is left, and that is so: no process below the kernel, no
    container of this run (by its label, its compose project, its Modal stand-in)."""
    assert "left running: nothing" in executed.output("left running:")
    assert executed.processes_left == set()
    assert executed.containers_left == []
