"""Bounded input before authentication, on each HTTP front as it is started in production:
the agent server (``python -m hosting.server``), the gateway (``python -m hosting.gateway``)
and the environments webhook (``python -m hosting.environments`` in webhook mode), each a
real process on 127.0.0.1, spoken to over raw sockets so each test says exactly what the
client sent.

What the tests prove:

- a client that sends its headers one byte at a time, faster than the keep-alive timer
  but never finishing, is cut off once the header deadline passes (408), on each front;
- a request head over the size limit is refused (431) on each front; one under it is served;
- the webhook refuses a chunked body over the contract's limit while reading it: its 413
  arrives and the connection closes while the client still has most of the body to send
  (what never left the client was never buffered); a declared length over the limit is
  refused before a byte of the body is sent.
"""

from __future__ import annotations

import concurrent.futures
import secrets
import select
import socket
import time
from collections.abc import Iterator

import pytest

from harness.processes import free_port
from hosting.contract import MAX_BODY_BYTES
from hosting.http_limits import HttpLimits
from hosting.settings_env import ConfigError
from tests.standins.environments import EnvironmentStandIn, OrchestratorProcess, orchestrator_env, serve
from tests.support.gateways import Gateways
from tests.support.polling import wait_for
from tests.support.servers import LocalModel, ServerProcess, agent_env, healthy

HEADER_TIMEOUT = "1"
"""Each front's header deadline in these tests (``<PREFIX>HTTP_HEADER_TIMEOUT_SECONDS``)."""
CUT_OFF_WITHIN = 30.0
"""A generous bound: the cut-off happens at all, not how fast."""
MAX_HEADER_BYTES = HttpLimits.max_header_bytes


@pytest.fixture(scope="module")
def fronts(local_model: LocalModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """The three fronts, started once for the module: their ports by name."""
    root = tmp_path_factory.mktemp("fronts")
    server = ServerProcess(agent_env(local_model, root / "server", AGENT_PREWARM="0",
                                     AGENT_HTTP_HEADER_TIMEOUT_SECONDS=HEADER_TIMEOUT), root / "server")
    gateways = Gateways(local_model, root, "local", None)
    key_file = root / "environment.key"
    key_file.write_text("envkey-" + secrets.token_hex(8))
    standin_serving = serve(EnvironmentStandIn(environment_key=key_file.read_text(),
                                               webhook_secret="whsec_" + "c2VjcmV0LWZvci1saW1pdHM="))
    standin = next(standin_serving)
    webhook_port = free_port()
    orchestrator = OrchestratorProcess(
        orchestrator_env(standin, root / "environment", key_file, f"t{secrets.token_hex(4)}",
                         ENVIRONMENT_MODE="webhook", ENVIRONMENT_WEBHOOK_SECRET=standin.webhook_secret or "",
                         ENVIRONMENT_HTTP_HEADER_TIMEOUT_SECONDS=HEADER_TIMEOUT, HOST="127.0.0.1",
                         PORT=str(webhook_port)),
        root / "orchestrator.log")
    try:
        with concurrent.futures.ThreadPoolExecutor() as starting:  # side by side: each waits for its health
            started = [starting.submit(server.start), starting.submit(orchestrator.start), starting.submit(
                gateways.start, wait_pool=False, GATEWAY_WARM_POOL="0", GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS=HEADER_TIMEOUT)]
        _, _, gateway = (future.result() for future in started)
        wait_for(lambda: healthy(f"http://127.0.0.1:{webhook_port}"), timeout=30)
        yield {"server": server.port, "gateway": gateway.port, "webhook": webhook_port}
    finally:
        orchestrator.stop()
        gateways.cleanup()
        server.stop()
        standin_serving.close()


FRONTS = ["server", "gateway", "webhook"]


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP/1.1 answer."""
    return int(answer.split(b" ", 2)[1])


def read_answer(sock: socket.socket) -> bytes:
    """Everything the front sends until it closes the connection. A front that closes
    with bytes of the client's still unread resets the connection: what came before counts."""
    sock.settimeout(CUT_OFF_WITHIN)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not data:
            raise
    return data


@pytest.mark.parametrize("front", FRONTS)
def test_a_client_sending_its_headers_byte_by_byte_is_cut_off(fronts: dict[str, int], front: str) -> None:
    """Each byte comes sooner than the keep-alive timeout (5 s), which each byte would reset;
    the header deadline counts from the connection's start."""
    head = b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: " + b"a" * 1000  # never finished within the bound
    with socket.create_connection(("127.0.0.1", fronts[front])) as sock:
        started = time.monotonic()
        answer = b""
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], 0.3)  # about three bytes a second
            if readable:
                answer = read_answer(sock)
                break
            assert time.monotonic() - started < CUT_OFF_WITHIN, "the slow client was never cut off"
        else:
            raise AssertionError("the whole head was sent: the slow client was never cut off")
    assert status_of(answer) == 408
    assert answer.endswith(b'"detail": "request headers not received within 1 s", "code": "request_timeout"}')


@pytest.mark.parametrize("front", FRONTS)
def test_a_request_head_over_the_limit_is_refused(fronts: dict[str, int], front: str) -> None:
    for size, expected in ((MAX_HEADER_BYTES // 2, 200), (MAX_HEADER_BYTES * 2, 431), (4 * 2**20, 431)):
        with socket.create_connection(("127.0.0.1", fronts[front])) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\nx-big: "
                             + b"a" * size + b"\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the client was done: the answer was sent all the same
            answer = read_answer(sock)
            assert status_of(answer) == expected, f"a header of {size} bytes"
            assert expected == 200 or answer.endswith(b'"code": "headers_too_large"}')


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_the_webhook_refuses_a_chunked_body_over_the_limit_while_reading_it(fronts: dict[str, int]) -> None:
    total = 64 * 2**20
    piece = chunk(b"x" * 65536)
    sent = 0
    with socket.create_connection(("127.0.0.1", fronts["webhook"])) as sock:
        sock.settimeout(CUT_OFF_WITHIN)  # a front that stopped reading without answering fails here
        sock.sendall(b"POST /webhooks HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the front answered before the body was over
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # ... and closed the connection
            sent += len(piece)
        answer = read_answer(sock)
    assert status_of(answer) == 413
    assert answer.endswith(b'{"detail": "request body larger than %d bytes", "code": "payload_too_large"}'
                           % MAX_BODY_BYTES)
    # What the socket buffers of loopback hold is all that could have left the client past the limit.
    assert sent < total // 4, f"{sent} of {total} bytes were sent before the front answered"


def test_the_webhook_refuses_a_declared_length_over_the_limit_before_reading(fronts: dict[str, int]) -> None:
    with socket.create_connection(("127.0.0.1", fronts["webhook"])) as sock:
        sock.sendall(b"POST /webhooks HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1))  # and not one byte of it
        answer = read_answer(sock)
    assert status_of(answer) == 413 and b"request body larger than" in answer
    # A body within the limit is read and judged: an unsigned one is refused for its signature.
    with socket.create_connection(("127.0.0.1", fronts["webhook"])) as sock:
        sock.sendall(b"POST /webhooks HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"connection: close\r\ncontent-length: 2\r\n\r\n{}")
        assert status_of(read_answer(sock)) == 400


def test_the_limits_are_read_from_each_processs_environment() -> None:
    env = {"GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS": "2.5", "GATEWAY_HTTP_KEEP_ALIVE_SECONDS": "7",
           "GATEWAY_HTTP_MAX_HEADER_BYTES": "65536", "AGENT_HTTP_HEADER_TIMEOUT_SECONDS": "9"}
    assert HttpLimits.from_env(env, "GATEWAY_") == HttpLimits(2.5, 7, 65536)
    assert HttpLimits.from_env(env, "ENVIRONMENT_") == HttpLimits()
    for name, value in (("GATEWAY_HTTP_HEADER_TIMEOUT_SECONDS", "0"), ("GATEWAY_HTTP_KEEP_ALIVE_SECONDS", "0"),
                        ("GATEWAY_HTTP_MAX_HEADER_BYTES", "100"), ("GATEWAY_HTTP_MAX_HEADER_BYTES", "lots")):
        with pytest.raises(ConfigError, match=name):
            HttpLimits.from_env({name: value}, "GATEWAY_")
