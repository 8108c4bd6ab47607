"""The Docker engine and the product image, built once per run.

With pytest-xdist each worker has its own session fixtures: a file lock in the run's shared
temporary directory makes one worker build while the others wait, then find the image built
(Docker's layer cache makes their own build a no-op).
"""

from __future__ import annotations

import os
import subprocess

import pytest
from filelock import FileLock

from tests.support import ROOT

BASE_IMAGE = os.environ.get("AGENT_TEST_BASE_IMAGE", "research-agent-base:bookworm")
IMAGE = "research-agent:test"


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The docker CLI; fails the test with its output unless ``check=False``."""
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_lock(tmp_path_factory: pytest.TempPathFactory, name: str) -> FileLock:
    """A lock shared by every xdist worker of this run (their temp dirs share one parent)."""
    return FileLock(tmp_path_factory.getbasetemp().parent / f"{name}.lock")


@pytest.fixture(scope="session")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The product image, built once per run on the offline base image (needs a Docker engine)."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: run scripts/start-dockerd.sh as root")
    with run_lock(tmp_path_factory, "agent-image"):
        subprocess.run([str(ROOT / "hosting/docker/build-base-image.sh"), BASE_IMAGE], check=True, timeout=900)
        docker("build", "-q", "-f", "hosting/Dockerfile", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
               "--network", "host", "-t", IMAGE, str(ROOT), timeout=900)
    return IMAGE
