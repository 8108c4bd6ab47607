"""The stand-in as a running server: its own event loop on a thread, so that both the tests'
loop and subprocesses (``modal_app.py``, gateways) can talk to it while it serves. It serves
the control plane (h2c) and the sandboxes' command router (TLS), both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from grpclib.server import Server

from tests.standins.modal.command_router import CommandRouter, StandInRouter
from tests.standins.modal.control_plane import ControlPlane, StandInService
from tests.standins.modal.engine import Engine
from tests.standins.modal.tunnels import TestCA

_T = TypeVar("_T")


class ModalStandIn:
    """Start with :meth:`start`, always :meth:`stop` (removes every container it ran)."""

    def __init__(self, root: Path, base_image: str) -> None:
        self.root = root
        self.token_id = f"ak-{secrets.token_hex(8)}"
        self.token_secret = f"as-{secrets.token_hex(16)}"
        self.ca = TestCA(root)
        self.engine = Engine(f"standin-{secrets.token_hex(4)}", base_image)
        self.plane: ControlPlane = StandInService(self.engine, self.ca, root, self.token_id, self.token_secret)
        self.router: CommandRouter = StandInRouter(self.plane)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modal-standin", daemon=True)
        self._server: Server | None = None
        self._router_server: Server | None = None
        self.port = 0

    def start(self) -> ModalStandIn:
        self._thread.start()
        self.call(self._serve())
        return self

    async def _serve(self) -> None:
        self._server = Server([self.plane])
        self.plane.attach(self._server)
        await self._server.start("127.0.0.1", 0)
        self.port = _port(self._server)
        self._router_server = Server([self.router])
        self.router.attach(self._router_server)
        await self._router_server.start("127.0.0.1", 0, ssl=self.ca.server_context)
        self.plane.router_url = f"https://127.0.0.1:{_port(self._router_server)}"

    def call(self, work: Coroutine[Any, Any, _T], timeout: float = 120) -> _T:
        """Run ``work`` on the stand-in's loop (its state is only touched there)."""
        future: Future[_T] = asyncio.run_coroutine_threadsafe(work, self._loop)
        return future.result(timeout)

    def env(self, config_dir: Path) -> dict[str, str]:
        """What points the ``modal`` client at the stand-in, with a config file of its own,
        and makes HTTPS clients (httpx honours ``SSL_CERT_FILE``) trust the tunnels' CA."""
        return {"MODAL_SERVER_URL": f"http://127.0.0.1:{self.port}", "MODAL_TOKEN_ID": self.token_id,
                "MODAL_TOKEN_SECRET": self.token_secret, "MODAL_CONFIG_PATH": str(config_dir / "modal.toml"),
                "SSL_CERT_FILE": str(self.ca.cert_file)}

    def problems(self) -> list[str]:
        """RPCs the client called that the stand-in does not implement, and handlers that broke."""
        return [f"unimplemented RPC: {name}" for name in self.plane.unimplemented] + self.plane.errors

    def running_sandboxes(self, app_name: str | None = None) -> list[str]:
        """Ids of the sandboxes that run now (of one app, by name), noticing crashed containers."""
        async def running() -> list[str]:
            apps = {a.object_id for a in self.plane.apps.values() if app_name is None or a.name == app_name}
            found = []
            for record in list(self.plane.sandboxes.values()):
                await self.plane._refresh(record)
                if record.running and record.app_id in apps:
                    found.append(record.sandbox_id)
            return found

        return self.call(running())

    def named(self, name: str) -> list[str]:
        """Ids of the running sandboxes of that name (in any app)."""
        return [s.sandbox_id for s in self.plane.sandboxes.values() if s.name == name and s.running]

    def kill(self, sandbox_id: str) -> None:
        """Crash a sandbox behind the control plane's back (``docker kill`` of its container)."""
        self.engine.kill(self.plane.container_of(sandbox_id))

    def traces(self, name: str) -> list[str]:
        """The containers still on the engine of the sandboxes of that name."""
        containers = set(self.engine.containers())
        return [s.container for s in self.plane.sandboxes.values() if s.name == name and s.container in containers]

    def volume_names(self) -> set[str]:
        return set(self.plane.volumes)

    def terminate_tagged(self, tag: str, values: set[str]) -> None:
        """Teardown: terminate every sandbox whose ``tag`` is one of ``values``."""
        async def terminate() -> None:
            for record in list(self.plane.sandboxes.values()):
                if record.tags.get(tag) in values:
                    await self.plane._terminate(record)

        self.call(terminate())

    def terminate_app(self, app_name: str) -> None:
        """Teardown: terminate every sandbox of the app of that name."""
        async def terminate() -> None:
            apps = {a.object_id for a in self.plane.apps.values() if a.name == app_name}
            for record in list(self.plane.sandboxes.values()):
                if record.app_id in apps:
                    await self.plane._terminate(record)

        self.call(terminate())

    def take_problems(self) -> list[str]:
        """:meth:`problems`, forgotten once read (one test's are not the next one's)."""
        found = self.problems()
        self.plane.unimplemented.clear()
        self.plane.errors.clear()
        return found

    def stop(self) -> None:
        if self._thread.is_alive():
            async def shutdown() -> None:
                await self.plane.close()
                self.router.close()
                for server in (self._server, self._router_server):
                    if server is not None:
                        server.close()
                        await server.wait_closed()

            self.call(shutdown())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self.engine.close()


def _port(server: Server) -> int:
    listening = server._server
    assert isinstance(listening, asyncio.Server)
    port: int = listening.sockets[0].getsockname()[1]
    return port
