"""(o) What telemetry costs a turn: the same follow-ups with tracing and metrics on and off.

Two servers in one run, otherwise alike: one as shipped with nothing configured (no-op tracer,
``/metrics`` only), one exporting spans and metrics over OTLP/HTTP to a local sink with
the SDK's default intervals (spans batched every 5 s, metrics every 60 s) and JSON
logs, so every per-turn cost is paid: the request and turn spans, the batch exporter,
the metric instruments, the JSON log lines. Their follow-ups alternate, so a drift in the machine's speed hits
both alike; latency p50 and CPU seconds per turn of each server's process tree (what
a turn costs the box) are compared, and of the server process alone (where telemetry
runs) reported.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from bench.drive import RECALL, TurnResult, http_client, http_turn, recalled, remember_prompt, summarize
from bench.procs import CLK_TCK, ScenarioError, server, settle, tree, tree_cpu_seconds

if TYPE_CHECKING:
    from bench.scenarios import Bench


def own_cpu_seconds(pid: int) -> float:
    """CPU time of the server process alone: where telemetry runs (the tree adds its CLIs)."""
    return next(s.cpu_ticks for s in tree(pid) if s.pid == pid) / CLK_TCK


@contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP endpoint that accepts every export and keeps nothing (a stand-in for
    a collector, so the exporter does its full work: encode, POST, read the answer)."""

    class Accept(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    sink = ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{sink.server_address[1]}"
    finally:
        sink.shutdown()
        sink.server_close()


async def overhead(bench: Bench) -> dict[str, Any]:
    counts = bench.counts
    with otlp_sink() as endpoint:
        telemetry = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "AGENT_LOG_FORMAT": "json"}
        # No pre-started CLIs: follow-ups do not use them, and filling two pools would keep the
        # trees from settling on a busy machine.
        quiet = {"AGENT_PREWARM": "0"}
        async with server(bench.model_url, bench.tmp, "o-off", quiet) as off, \
                server(bench.model_url, bench.tmp, "o-on", quiet | telemetry) as on, http_client() as client:
            servers = (off, on)
            sessions, values = {}, {}
            for srv in servers:
                await settle(client, srv, need_prewarm=False, timeout=counts.prewarm_timeout)
                sessions[srv.name], (values[srv.name], prompt) = f"o-{secrets.token_hex(6)}", remember_prompt()
                first = await http_turn(client, srv.base_url, sessions[srv.name], prompt)
                if first.error is not None:
                    raise ScenarioError(f"{srv.name}: first turn failed: {first.error}")
            for srv in servers:
                await settle(client, srv, need_prewarm=False, timeout=counts.prewarm_timeout)
            turns: dict[str, list[TurnResult]] = {srv.name: [] for srv in servers}
            cpu_before = {srv.name: tree_cpu_seconds(srv.pid) for srv in servers}
            own_before = {srv.name: own_cpu_seconds(srv.pid) for srv in servers}
            for round_no in range(counts.obs_turns):
                for srv in servers if round_no % 2 == 0 else servers[::-1]:
                    turns[srv.name].append(await http_turn(client, srv.base_url, sessions[srv.name], RECALL))
            cpu = {srv.name: tree_cpu_seconds(srv.pid) - cpu_before[srv.name] for srv in servers}
            own = {srv.name: own_cpu_seconds(srv.pid) - own_before[srv.name] for srv in servers}
            return {key: srv.finish({**summarize(turns[srv.name], recall_expected=len(turns[srv.name]),
                                                 recall_ok=sum(recalled(t, values[srv.name]) for t in turns[srv.name])),
                                     "cpu_s_per_turn": cpu[srv.name] / len(turns[srv.name]),
                                     "server_cpu_s_per_turn": own[srv.name] / len(turns[srv.name])})
                    for key, srv in (("off", off), ("on", on))}
