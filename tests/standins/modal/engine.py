"""What runs behind the stand-in's control plane: image builds and sandboxes on the local Docker engine.

Modal builds an image from the uploaded Dockerfile and context on its own builders and
runs a sandbox as a container with its own network. Here:

- A build is ``docker build`` of the uploaded Dockerfile and context. No registry is
  reachable, so the builder resolves the Dockerfile's ``BASE_IMAGE`` argument to the
  locally built base image (as Modal's builders pull the public one), unless the client
  passed that argument itself.
- A sandbox is a container on the host network (tests send traffic only to 127.0.0.1).
  It has no network namespace of its own, so the port the definition opens is served
  on a free loopback port: the container gets ``HOST=127.0.0.1`` and ``PORT=<that port>``,
  and the sandbox's tunnel forwards to it. A Volume is a host directory bind-mounted at
  its mount path; secrets and ``env`` become the container's environment.
- A command run in a sandbox (``Sandbox.exec``) is ``docker exec`` in its container, as
  the container's user, with the environment in the request body (never in an argv).
  The engine is on this machine, so a timed-out exec's process is killed by its host pid
  (as root, as the tests run Docker).

Every container carries the stand-in's label, so teardown removes exactly its own.
The Docker SDK is synchronous: the control plane calls it in worker threads.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import docker
from docker.errors import NotFound

LABEL = "modal-standin"


class Engine:
    def __init__(self, instance: str, base_image: str) -> None:
        self.instance = instance
        self.base_image = base_image
        self.client = docker.from_env()
        self.tags: set[str] = set()

    def build(self, tag: str, dockerfile: str, context: Path, build_args: Mapping[str, str]) -> tuple[bool, str]:
        """``docker build``; whether it worked, and its output."""
        (context / ".modal-standin.Dockerfile").write_text(dockerfile)
        args = {"BASE_IMAGE": self.base_image, **build_args}
        # The label gives the image an id of its own (its layers still come from Docker's cache), so that
        # removing another image built from the same Dockerfile, by id, cannot remove this one.
        command = ["docker", "build", "--network", "host", "-f", str(context / ".modal-standin.Dockerfile"), "-t", tag,
                   "--label", f"{LABEL}={self.instance}"]
        for name, value in args.items():
            command += ["--build-arg", f"{name}={value}"]
        proc = subprocess.run([*command, str(context)], capture_output=True, text=True, timeout=1200)
        if proc.returncode == 0:
            self.tags.add(tag)
        return proc.returncode == 0, proc.stdout + proc.stderr

    def run(self, name: str, image: str, command: Sequence[str], env: Mapping[str, str],
            binds: Mapping[Path, str], workdir: str | None, memory_bytes: int | None = None,
            nano_cpus: int | None = None) -> None:
        """Start the sandbox's container; the command replaces the image's entrypoint and command.
        A memory or CPU limit becomes the container's cgroup limit, as on Modal's workers."""
        self.client.containers.run(
            image, list(command[1:]), entrypoint=[command[0]], name=name, detach=True, network_mode="host",
            environment=dict(env), labels={LABEL: self.instance}, working_dir=workdir or None,
            volumes={str(path): {"bind": target, "mode": "rw"} for path, target in binds.items()},
            mem_limit=memory_bytes, nano_cpus=nano_cpus)

    def exec_start(self, name: str, argv: Sequence[str], env: Mapping[str, str],
                   workdir: str | None) -> tuple[str, Iterator[tuple[bytes | None, bytes | None]]]:
        """Start ``argv`` in the container: the exec's id, and its output as ``(stdout, stderr)``
        chunks until it ends (read it in a thread of its own: it blocks). ``NotFound`` if the
        container is gone, ``APIError`` 409 if it is not running."""
        exec_id: str = self.client.api.exec_create(name, list(argv), environment=dict(env), workdir=workdir)["Id"]
        return exec_id, self.client.api.exec_start(exec_id, stream=True, demux=True)

    def exec_state(self, exec_id: str) -> tuple[bool, int | None]:
        """Whether the exec runs, and its exit code once it has ended (``None`` if it has none:
        it was killed with its container, or the container was removed)."""
        try:
            state = self.client.api.exec_inspect(exec_id)
        except NotFound:
            return False, None
        return bool(state["Running"]), state["ExitCode"]

    def exec_kill(self, exec_id: str) -> None:
        """SIGKILL the exec's process, if it still runs."""
        try:
            state = self.client.api.exec_inspect(exec_id)
        except NotFound:
            return
        if state["Running"] and state["Pid"]:
            os.kill(state["Pid"], signal.SIGKILL)

    def exit_code(self, name: str) -> int | None:
        """``None`` while the container runs; its exit code once it has stopped (137 if it is gone)."""
        try:
            state = self.client.api.inspect_container(name)["State"]
        except NotFound:
            return 137
        if state["Status"] in ("created", "running"):
            return None
        return int(state["ExitCode"])

    def logs(self, name: str) -> str:
        try:
            return bytes(self.client.api.logs(name)).decode(errors="replace")
        except NotFound:
            return ""

    def stop(self, name: str, grace: int) -> None:
        """SIGTERM, SIGKILL after ``grace`` seconds, then remove."""
        try:
            self.client.api.stop(name, timeout=grace)
            self.client.api.remove_container(name, force=True)
        except NotFound:
            pass

    def kill(self, name: str) -> None:
        """A crash behind the control plane's back (the tests' ``kill``)."""
        self.client.containers.get(name).kill()

    def containers(self) -> list[str]:
        return [c.name for c in self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.instance}"})]

    def close(self) -> None:
        """Remove every container of this stand-in and untag its images (their layers stay cached)."""
        for name in self.containers():
            self.client.api.remove_container(name, force=True)
        for tag in self.tags:
            try:
                self.client.api.remove_image(tag, noprune=True)
            except NotFound:
                pass
        self.client.close()
