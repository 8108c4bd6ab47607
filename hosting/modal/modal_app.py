"""Deploy the agent server as one Modal Sandbox and print how to reach it.

    python hosting/modal/modal_app.py [--replace] [--timeout 3600] [--idle-timeout 1800]

Runs ``serve`` from the product image (``hosting/Dockerfile``, built by Modal), with the
model credential from the Modal secret ``anthropic``, conversations on the Modal Volume
``research-agent-data`` at ``/data``, and a bearer token of its own. Once ``/health`` and
``/ready`` answer through the tunnel it prints::

    sandbox: <id>
    url: https://...
    token: <bearer token>

Running it again finds the running sandbox (by its name and tag) and prints the same
three lines; ``--replace`` terminates it and starts a fresh one (new token, same volume).
Every failure exits 1 with one line saying what to do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import shlex
import sys
import time
from dataclasses import dataclass

import httpx

from hosting.sandboxes.base import SandboxError
from hosting.sandboxes.modal import create_agent_sandbox, require_client, tunnel_url

with contextlib.suppress(ImportError):  # the modal extra; without it main() says so in one line
    import modal
    import modal.exception

DEPLOY_TAG = "research-agent.deploy"
"""Tag naming the deployment a sandbox belongs to; how a second run finds the first's sandbox."""


class DeployError(Exception):
    """One clear line for the operator; the script exits 1 with it."""


@dataclass(frozen=True)
class Options:
    app: str
    name: str
    volume: str
    secret: str
    timeout: int
    idle_timeout: int
    ready_timeout: float
    replace: bool
    memory_mib: int = 1024
    cpus: float = 1.0

    @property
    def tokens_dict(self) -> str:
        """The Modal Dict that keeps each deployment's token. Tags are listed to anyone who can see
        the sandbox and carry no secrets; a Dict is private to the workspace, whose members can
        already exec into the sandbox and read its environment, so keeping the token there exposes
        it to no one new, and any machine with the workspace's credentials can print it again."""
        return f"{self.app}-tokens"


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--app", default="research-agent", help="Modal app name (default: %(default)s)")
    parser.add_argument("--name", default="agent", help="sandbox name within the app (default: %(default)s)")
    parser.add_argument("--volume", default="research-agent-data", help="Modal Volume at /data (default: %(default)s)")
    parser.add_argument("--secret", default="anthropic",
                        help="Modal secret with ANTHROPIC_API_KEY (and optionally ANTHROPIC_BASE_URL) (default: %(default)s)")
    parser.add_argument("--timeout", type=int, default=3600, help="lifetime cap in seconds (default: %(default)s)")
    parser.add_argument("--idle-timeout", type=int, default=1800,
                        help="seconds without traffic before Modal stops it (default: %(default)s)")
    parser.add_argument("--ready-timeout", type=float, default=300.0,
                        help="seconds to wait for /ready through the tunnel (default: %(default)s)")
    parser.add_argument("--replace", action="store_true", help="terminate the running sandbox and start a fresh one")
    parser.add_argument("--memory-mib", type=int, default=1024,
                        help="memory limit in MiB; the server sizes its CLIs to it (default: %(default)s)")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPU limit (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 10 <= args.timeout <= 24 * 3600 or not 10 <= args.idle_timeout <= args.timeout:
        parser.error("need 10 <= --idle-timeout <= --timeout <= 86400")
    if args.memory_mib < 512 or args.cpus <= 0:
        parser.error("need --memory-mib >= 512 (the server and one CLI) and --cpus > 0")
    return Options(args.app, args.name, args.volume, args.secret, args.timeout, args.idle_timeout,
                   args.ready_timeout, args.replace, args.memory_mib, args.cpus)


async def deploy(options: Options) -> tuple[str, str, str]:
    """The running sandbox's id, URL and token, starting it if needed."""
    app = await modal.App.lookup.aio(options.app, create_if_missing=True)
    tokens = modal.Dict.from_name(options.tokens_dict, create_if_missing=True)
    running = [sandbox async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id, tags={DEPLOY_TAG: options.name})]
    if running and options.replace:
        for sandbox in running:
            await sandbox.terminate.aio()
        running = []
    if running:
        sandbox = running[0]
        token = await tokens.get.aio(options.name)
        if not isinstance(token, str):
            raise DeployError(f"sandbox {sandbox.object_id} runs but its token is lost: run again with --replace")
    else:
        token = secrets.token_urlsafe(32)  # the server listens on 0.0.0.0 behind the tunnel: always a token
        try:
            sandbox = await create_agent_sandbox(
                app, name=options.name, volume=options.volume, token=token, env={}, secrets=[options.secret],
                tags={DEPLOY_TAG: options.name}, timeout=options.timeout, idle_timeout=options.idle_timeout,
                memory_bytes=options.memory_mib * 2**20, cpus=options.cpus)
        except modal.exception.NotFoundError as exc:
            if "secret" in str(exc).lower():
                raise DeployError(f"Modal secret {options.secret!r} not found: create it with "
                                  f"`modal secret create {options.secret} ANTHROPIC_API_KEY=...` ({exc})") from None
            raise
        except modal.exception.ImageBuildError as exc:
            raise DeployError(f"the image build failed: {exc}") from None
        try:
            await tokens.put.aio(options.name, token)
        except BaseException:
            await sandbox.terminate.aio()  # a sandbox whose token nobody can read again is of no use
            raise
    url = await tunnel_url(sandbox)
    await wait_ready(sandbox, url, token, options.ready_timeout)
    return sandbox.object_id, url, token


async def wait_ready(sandbox: modal.Sandbox, url: str, token: str, timeout: float) -> None:
    """Until ``/health`` and ``/ready`` answer 200 through the tunnel; a sandbox that exits
    or is not ready in time is terminated (nothing half-deployed stays)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            exit_code = await sandbox.poll.aio()
            if exit_code is not None:
                raise DeployError(f"sandbox {sandbox.object_id} exited with code {exit_code} before it was ready: "
                                  f"see `modal sandbox logs {sandbox.object_id}`")
            try:
                health = await client.get(f"{url}/health")
                ready = await client.get(f"{url}/ready", headers={"authorization": f"Bearer {token}"})
                if health.status_code == ready.status_code == 200:
                    return
            except httpx.TransportError:
                pass  # the tunnel exists before the server inside listens
            if time.monotonic() > deadline:
                await sandbox.terminate.aio()
                raise DeployError(f"sandbox {sandbox.object_id} was not ready within {timeout:.0f} s; terminated it")
            await asyncio.sleep(1)


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    try:
        require_client()
    except SandboxError as exc:
        sys.exit(f"modal_app: {exc}")
    try:
        sandbox_id, url, token = asyncio.run(deploy(options))
    except modal.exception.AuthError as exc:
        sys.exit(f"modal_app: no usable Modal credentials ({exc}): run `modal setup` "
                 "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET")
    except (DeployError, SandboxError) as exc:
        sys.exit(f"modal_app: {exc}")
    except modal.exception.Error as exc:
        sys.exit(f"modal_app: Modal refused: {exc}")
    print(f"sandbox: {sandbox_id}")
    print(f"url: {url}")
    print(f"token: {token}")
    body = shlex.quote('{"prompt": "What can you do?"}')
    print(f"try: curl -N -X POST {url}/sessions/demo/messages -H 'Authorization: Bearer {token}' "
          f"-H 'Content-Type: application/json' -d {body}")


if __name__ == "__main__":
    main()
