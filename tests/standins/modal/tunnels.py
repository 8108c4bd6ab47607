"""Modal's encrypted tunnels, on loopback: TLS terminated with a test CA, bytes forwarded to the sandbox's port.

A Modal tunnel is ``https://host:port`` and exists before the server inside listens: a
connection made too early is closed, as Modal's edge does. Forwarding whole TCP streams
(not HTTP requests) keeps SSE streaming and keep-alive exactly as the server sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import trustme


class TestCA:
    """A CA made for one test session; clients trust it through ``SSL_CERT_FILE``."""

    def __init__(self, directory: Path) -> None:
        self._ca = trustme.CA()
        self.cert_file = directory / "modal-standin-ca.pem"
        self._ca.cert_pem.write_to_path(str(self.cert_file))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.server_context)


class Tunnel:
    """``https://127.0.0.1:<port>`` in front of ``127.0.0.1:<target_port>``."""

    def __init__(self, server: asyncio.Server, target_port: int) -> None:
        self._server = server
        self.target_port = target_port
        self.port: int = server.sockets[0].getsockname()[1]
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def open(cls, ca: TestCA, target_port: int) -> Tunnel:
        tunnel: Tunnel | None = None

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            assert tunnel is not None
            await tunnel._forward(reader, writer)

        server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=ca.server_context)
        tunnel = cls(server, target_port)
        return tunnel

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, upstream_writer}
        pipes = [asyncio.ensure_future(_pipe(client_reader, upstream_writer)),
                 asyncio.ensure_future(_pipe(upstream_reader, client_writer))]
        try:  # either side closing ends the connection, as a TCP proxy's does (HTTP clients never half-close)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pipe in pipes:
                pipe.cancel()
            for writer in (upstream_writer, client_writer):
                writer.close()
                self._writers.discard(writer)

    async def close(self) -> None:
        """Stop accepting and cut every open connection (the sandbox is gone)."""
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
