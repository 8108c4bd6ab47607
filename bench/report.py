"""Turning one run's results into ratios, verdicts, a Markdown section, JSON and a console summary.

Targets are reported, never asserted: a slow machine must still produce a full
report, and only a broken harness should make ``python -m bench`` exit non-zero.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import claude_agent_sdk
from claude_agent_sdk import _cli_version

from bench.procs import ROOT

HERE = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    """What the numbers depend on, so runs on different hosts are not compared blindly."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        found = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        ram = int(found.group(1)) * 1024 if found else 0
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "python": platform.python_version(),
        "claude_agent_sdk": claude_agent_sdk.__version__,
        "claude_code_cli": _cli_version.__cli_version__,
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
    }


# -- ratios and targets ------------------------------------------------------

def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _ok(results: dict[str, Any], *path: str) -> dict[str, Any] | None:
    node = _get(results, *path)
    return node if isinstance(node, dict) and node.get("status") == "ok" else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


FROZEN_BOUND_SECONDS = 12
"""The README's bound for a request to a sandbox that stopped answering: 7 s to find it out,
then a new sandbox started on the session's volume (a no-pool first turn) and the turn."""
SCOPE_SUFFIXES = ("", "_tenant")
"""(g)'s parts in session scope (no suffix) and in tenant scope."""


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio the targets and tables use, from one run."""
    def metric(path: tuple[str, ...], key: str) -> float | None:
        node = _ok(results, *path)
        return node.get(key) if node else None

    return {
        "a_server_over_direct_p50": _ratio(metric(("a", "server"), "p50_s"), metric(("a", "direct"), "p50_s")),
        "b_prewarmed_over_direct_p50": _ratio(metric(("b", "prewarmed"), "p50_s"), metric(("b", "direct"), "p50_s")),
        "b_no_prewarm_over_direct_p50": _ratio(metric(("b", "no_prewarm"), "p50_s"), metric(("b", "direct"), "p50_s")),
        "e_default_over_baseline_turns_per_s": _ratio(metric(("e", "default"), "turns_per_s"),
                                                      metric(("e", "baseline"), "turns_per_s")),
        "e_prewarm_over_baseline_turns_per_s": _ratio(metric(("e", "prewarm"), "turns_per_s"),
                                                      metric(("e", "baseline"), "turns_per_s")),
        "e_default_over_baseline_p50": _ratio(metric(("e", "default"), "p50_s"), metric(("e", "baseline"), "p50_s")),
        "e_prewarm_over_baseline_p50": _ratio(metric(("e", "prewarm"), "p50_s"), metric(("e", "baseline"), "p50_s")),
        "limits_first_p50": _ratio(metric(("limits", "first_limited"), "p50_s"),
                                   metric(("limits", "first_unlimited"), "p50_s")),
        "limits_follow_p50": _ratio(metric(("limits", "follow_limited"), "p50_s"),
                                    metric(("limits", "follow_unlimited"), "p50_s")),
        "b_at_once_p95_over_lone_p50": _ratio(metric(("b", "at_once"), "p95_s"), metric(("b", "prewarmed"), "p50_s")),
        **{f"g_relay_added_ms{sfx}": _difference_ms(_get(results, "g", f"relay{sfx}", "gateway", "p50_s")
                                                    if _ok(results, "g", f"relay{sfx}") else None,
                                                    _get(results, "g", f"relay{sfx}", "direct", "p50_s"))
           for sfx in SCOPE_SUFFIXES},
        **{f"g_{where}pool_over_no_pool_p50{sfx}": _ratio(metric(("g", f"{where}first_pool{sfx}"), "p50_s"),
                                                          metric(("g", f"{where}first_no_pool{sfx}"), "p50_s"))
           for where in ("", "docker_") for sfx in SCOPE_SUFFIXES},
        **{f"g_{where}tenant_over_session_turns_per_s": _ratio(metric(("g", f"{where}burst_tenant"), "turns_per_s"),
                                                               metric(("g", f"{where}burst"), "turns_per_s"))
           for where in ("", "docker_")},
        **{f"g_{where}tenant_over_session_memory": _ratio(metric(("g", f"{where}burst_tenant"), "rss_bytes_per_session"),
                                                          metric(("g", f"{where}burst"), "rss_bytes_per_session"))
           for where in ("", "docker_")},
        "g_second_over_first_wave_p95": _ratio(_get(results, "g", "waves", "second", "p95_s") if _ok(results, "g", "waves")
                                               else None, _get(results, "g", "waves", "first", "p95_s")),
        "g_back_to_floor_s": metric(("g", "waves"), "back_to_floor_s"),
        "g_frozen_p95_s": metric(("g", "frozen"), "p95_s"),
        "o_on_over_off_p50": _ratio(_get(results, "o", "on", "p50_s") if _ok(results, "o") else None,
                                    _get(results, "o", "off", "p50_s")),
        "o_on_over_off_cpu": _ratio(_get(results, "o", "on", "cpu_s_per_turn") if _ok(results, "o") else None,
                                    _get(results, "o", "off", "cpu_s_per_turn")),
    }


def _scaled(value: Any, factor: float) -> float | None:
    return value * factor if isinstance(value, (int, float)) else None


def _difference_ms(num: float | None, den: float | None) -> float | None:
    return (num - den) * 1000 if num is not None and den is not None else None


@dataclass(frozen=True)
class Target:
    label: str
    value: float | None
    op: str  # "<=" or ">="
    goal: float
    missing: str  # why there is no value, when there is none
    note: str = ""  # e.g. turns that failed in a part the value is computed from

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "N/A"
        return "PASS" if (self.value <= self.goal if self.op == "<=" else self.value >= self.goal) else "FAIL"

    def line(self) -> str:
        shown = "-" if self.value is None else f"{self.value:.3g}"
        why = f" (not measured: {self.missing})" if self.value is None else ""
        note = f" [{self.note}]" if self.note else ""
        return f"{self.verdict}: {self.label} = {shown} (target {self.op} {self.goal:g}){why}{note}"


def _why(results: dict[str, Any], *paths: tuple[str, ...]) -> str:
    reasons = []
    for path in paths:
        node = _get(results, *path)
        if node is None:
            reasons.append(f"{'/'.join(path)} not run")
        elif node.get("status") != "ok":
            reasons.append(f"{'/'.join(path)} {node.get('status')}")
    return ", ".join(reasons) or "no data"


def _failed_turns(results: dict[str, Any], *paths: tuple[str, ...]) -> str:
    """Say so when a value rests on parts where some turns failed."""
    notes = []
    for path in paths:
        node = _ok(results, *path)
        if node and node.get("errors"):
            notes.append(f"{'/'.join(path)}: {node['errors']}/{node['turns']} turns failed")
    return "; ".join(notes)


def targets(results: dict[str, Any], r: dict[str, float | None]) -> list[Target]:
    c = _ok(results, "c")
    a, b = (("a", "server"), ("a", "direct")), (("b", "prewarmed"), ("b", "direct"))
    e_default, e_prewarm = (("e", "default"), ("e", "baseline")), (("e", "prewarm"), ("e", "baseline"))
    first, follow = (("limits", "first_limited"), ("limits", "first_unlimited")), (
        ("limits", "follow_limited"), ("limits", "follow_unlimited"))
    burst = _ok(results, "limits", "burst")
    limit = f"{burst['limit_bytes'] / 2**20:.0f} MiB" if burst else "the"
    why_burst = _why(results, ("limits", "burst"))
    return [
        Target("(a) follow-up p50, server / direct query(resume)", r["a_server_over_direct_p50"], "<=", 0.15,
               _why(results, *a), _failed_turns(results, *a)),
        Target("(b) first-turn p50, prewarmed server / direct query()", r["b_prewarmed_over_direct_p50"], "<=", 0.2,
               _why(results, *b), _failed_turns(results, *b)),
        Target("(c) errors under concurrent follow-ups", c["errors"] if c else None, "<=", 0, _why(results, ("c",))),
        Target("(c) turns/s under concurrent follow-ups", c.get("turns_per_s") if c else None, ">=", 25,
               _why(results, ("c",)), _failed_turns(results, ("c",))),
        Target("(e) burst turns/s, default / baseline (CLI per turn)", r["e_default_over_baseline_turns_per_s"], ">=", 2,
               _why(results, *e_default), _failed_turns(results, *e_default)),
        Target("(e) burst turns/s, prewarm / baseline (CLI per turn)", r["e_prewarm_over_baseline_turns_per_s"], ">=", 5,
               _why(results, *e_prewarm), _failed_turns(results, *e_prewarm)),
        Target(f"(limits) first-turn p50, {limit} limit / no limit", r["limits_first_p50"], "<=", 1.5,
               _why(results, *first), _failed_turns(results, *first)),
        Target(f"(limits) follow-up p50, {limit} limit / no limit", r["limits_follow_p50"], "<=", 1.5,
               _why(results, *follow), _failed_turns(results, *follow)),
        Target(f"(limits) burst under {limit} limit: errors other than 503 with Retry-After",
               burst["errors"] if burst else None, "<=", 0, why_burst),
        Target(f"(limits) burst under {limit} limit: OOM kills", burst["oom_kills"] if burst else None, "<=", 0,
               why_burst),
        Target("(b) 10 first turns at once (12 CLIs pre-started): p95 / a lone first turn's p50",
               r["b_at_once_p95_over_lone_p50"], "<=", 3, _why(results, ("b", "at_once"), ("b", "prewarmed")),
               _failed_turns(results, ("b", "at_once"))),
        *_gateway_targets(results, r),
        Target("(o) follow-up p50, telemetry on / off", r["o_on_over_off_p50"], "<=", 1.03, _why(results, ("o",))),
        Target("(o) CPU per follow-up, telemetry on / off", r["o_on_over_off_cpu"], "<=", 1.03, _why(results, ("o",))),
        Target(f"(limits) burst under {limit} limit: peak usage / limit",
               burst["peak_bytes"] / burst["limit_bytes"] if burst and burst["peak_bytes"] else None, "<=", 1,
               why_burst if not burst else "the kernel does not record a peak"),
    ]


def _gateway_targets(results: dict[str, Any], r: dict[str, float | None]) -> list[Target]:
    """(g)'s targets: each in both scopes where the issue asks it of both, local and docker."""
    out = []
    for sfx in SCOPE_SUFFIXES:
        scope = "tenant scope" if sfx else "session scope"
        relay = ("g", f"relay{sfx}")
        out.append(Target(f"(g) relay, {scope}: follow-up p50 through the gateway minus straight to the sandbox, ms",
                          r[f"g_relay_added_ms{sfx}"], "<=", 3, _why(results, relay)))
        for where, backend in (("", "local"), ("docker_", "docker")):
            pool, no_pool = ("g", f"{where}first_pool{sfx}"), ("g", f"{where}first_no_pool{sfx}")
            out.append(Target(f"(g) first-turn p50, warm pool / no pool ({backend}, {scope})",
                              r[f"g_{where}pool_over_no_pool_p50{sfx}"], "<=", 0.25, _why(results, pool, no_pool),
                              _failed_turns(results, pool, no_pool)))
    for where, backend in (("", "local"), ("docker_", "docker")):
        for sfx in SCOPE_SUFFIXES:
            path = ("g", f"{where}burst{sfx}")
            node = _ok(results, *path)
            what = f"(g) burst ({backend}, {'tenant' if sfx else 'session'} scope)"
            out.append(Target(f"{what}: errors", node["errors"] if node else None, "<=", 0, _why(results, path)))
            out.append(Target(f"{what}: recall", node["recall_ok"] / node["recall_expected"] if node else None, ">=", 1,
                              _why(results, path)))
        both = ("g", f"{where}burst"), ("g", f"{where}burst_tenant")
        out.append(Target(f"(g) burst turns/s, tenant scope / session scope ({backend})",
                          r[f"g_{where}tenant_over_session_turns_per_s"], ">=", 3, _why(results, *both),
                          _failed_turns(results, *both)))
        out.append(Target(f"(g) sandbox memory per live session after the burst, tenant / session scope ({backend})",
                          r[f"g_{where}tenant_over_session_memory"], "<=", 0.6, _why(results, *both)))
    waves = ("g", "waves")
    out.append(Target("(g) two bursts 60 s apart: second burst's first-turn p95 / the first's",
                      r["g_second_over_first_wave_p95"], "<=", 0.5, _why(results, waves), _failed_turns(results, waves)))
    out.append(Target("(g) seconds from the last claim until the pool is back at its floor", r["g_back_to_floor_s"],
                      "<=", 300, _why(results, waves)))
    frozen = ("g", "frozen")
    out.append(Target("(g) a frozen sandbox's session: its next turn answered within, s (README: the bound)",
                      r["g_frozen_p95_s"], "<=", FROZEN_BOUND_SECONDS, _why(results, frozen),
                      _failed_turns(results, frozen)))
    return out


# -- formatting --------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.0f} MiB"


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _config(node: dict[str, Any]) -> str:
    srv = node.get("server")
    if not isinstance(srv, dict):
        return "-"
    return f"warm cap {srv['warm_sessions']}, prewarm {srv['prewarm']}"


def _cli_bound(node: dict[str, Any]) -> str:
    srv = node.get("server")
    if not isinstance(srv, dict) or "sessions" not in node:
        return "-"
    return str(srv["warm_sessions"] + srv["prewarm"] + node["sessions"])


def _recall(node: dict[str, Any]) -> str:
    return f"{node['recall_ok']}/{node['recall_expected']}" if "recall_expected" in node else "-"


ROWS: list[tuple[tuple[str, ...], str]] = [
    (("a", "server"), "server follow-up"),
    (("a", "direct"), "direct query(resume) follow-up"),
    (("b", "prewarmed"), "server first turn, prewarmed"),
    (("b", "no_prewarm"), "server first turn, no prewarm"),
    (("b", "direct"), "direct query() first turn"),
    (("b", "at_once"), "server first turns, 10 at once, 12 pre-started"),
    (("c",), "concurrent follow-ups, default config"),
    (("e", "default"), "burst, default config"),
    (("e", "baseline"), "burst, baseline (warm 0, prewarm 0)"),
    (("e", "prewarm"), "burst, prewarm = sessions"),
    (("limits", "first_unlimited"), "first turn, no limit"),
    (("limits", "first_limited"), "first turn, under the limit"),
    (("limits", "follow_unlimited"), "follow-up, no limit"),
    (("limits", "follow_limited"), "follow-up, under the limit"),
    (("limits", "burst"), "burst under the limit"),
]


GATEWAY_ROWS: list[tuple[tuple[str, ...], str]] = [
    row for sfx, scope in (("", "session scope"), ("_tenant", "tenant scope")) for row in [
        (("g", f"relay{sfx}", "gateway"), f"follow-up through the gateway, {scope}"),
        (("g", f"relay{sfx}", "direct"), f"follow-up straight to the sandbox, {scope}"),
        (("g", f"relay{sfx}", "bare"), f"follow-up through a bare relay (bench/bare_relay.py), {scope}"),
        (("g", f"first_pool{sfx}"), f"first turn, warm pool, {scope}"),
        (("g", f"first_no_pool{sfx}"), f"first turn, no pool, {scope}"),
        (("g", f"docker_first_pool{sfx}"), f"first turn, warm pool, docker, {scope}"),
        (("g", f"docker_first_no_pool{sfx}"), f"first turn, no pool, docker, {scope}"),
        (("g", f"burst{sfx}"), f"new sessions at once, two turns each, {scope}"),
        (("g", f"docker_burst{sfx}"), f"new sessions at once, two turns each, docker, {scope}"),
    ]
] + [
    (("g", "waves", "first"), "first burst (first turns), session scope, pool following demand"),
    (("g", "waves", "second"), "second burst, 60 s after the first began"),
    (("g", "frozen"), "next turn of a session whose sandbox froze mid-turn (Redis routes and store)"),
]


def _gateway_rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    rows = []
    for path, label in GATEWAY_ROWS:
        node = _get(results, *path)
        if isinstance(node, dict):
            status = (_get(results, *path[:2]) or {}).get("status") if len(path) == 3 else node.get("status")
            rows.append((path[0], label, {**node, "status": status}))
    return rows


def _rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(section, label, node) for every part present in this run, in report order."""
    return [(path[0], label, node) for path, label in ROWS if isinstance(node := _get(results, *path), dict)]


def _status(node: dict[str, Any]) -> str:
    return "ok" if node.get("status") == "ok" else f"**{node.get('status')}**"


def _burst_rounds(results: dict[str, Any]) -> int:
    return max((len(n.get("rounds_turns_per_s", [])) for n in (results.get("e") or {}).values()), default=1)


def _round_rates(results: dict[str, Any]) -> str:
    return "; ".join(f"{key} " + ", ".join(_num(v, "{:.1f}") for v in node.get("rounds_turns_per_s", []))
                     for key, node in (results.get("e") or {}).items())


def _only(run: dict[str, Any]) -> str:
    return f" --only {','.join(run['scenarios'])}" if run["section"] != run["mode"] else ""


def markdown(run: dict[str, Any]) -> str:
    """One run as a Markdown section (without the replace markers)."""
    m, results, r = run["machine"], run["results"], run["ratios"]
    counts = ", ".join(f"{k}={v}" for k, v in run["counts"].items())
    out = [
        f"## `python -m bench{' --quick' if run['mode'] == 'quick' else ''}{_only(run)}`: {m['date_utc']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB RAM; Python {m['python']}; "
        f"claude-agent-sdk {m['claude_agent_sdk']}; Claude Code CLI {m['claude_code_cli']}; "
        f"git {m['git_commit']}{' + uncommitted changes' if m['git_dirty'] else ''}.",
        "",
        f"Counts: {counts}. Harness wall time {run['wall_s']:.0f} s.",
        "",
    ]
    if run["mode"] == "quick":
        out += ["Quick mode: counts scaled down, so percentiles and targets are indicative only.", ""]

    latency_rows = [
        [f"({s}) {label}", _status(n), _config(n), str(n.get("turns", "-")), str(n.get("errors", "-")), _recall(n),
         _ms(n.get("p50_s")), _ms(n.get("p95_s")), _ms(n.get("p50_to_result_s"))]
        for s, label, n in _rows(results) if s in ("a", "b")
    ]
    if latency_rows:
        out += ["### Sequential latency: (a) follow-ups, (b) first turns", "",
                _table(["path", "status", "config", "turns", "errors", "recall", "p50", "p95", "p50 to result"],
                       latency_rows), "",
                f"(a) server p50 / direct p50 = {_num(r['a_server_over_direct_p50'], '{:.3f}')}; "
                f"(b) prewarmed p50 / direct p50 = {_num(r['b_prewarmed_over_direct_p50'], '{:.3f}')}, "
                f"no-prewarm p50 / direct p50 = {_num(r['b_no_prewarm_over_direct_p50'], '{:.3f}')}.", ""]

    load_rows = [
        [f"({s}) {label}", _status(n), _config(n), str(n.get("sessions", "-")), str(n.get("turns", "-")),
         str(n.get("errors", "-")), _recall(n), _num(n.get("turns_per_s"), "{:.1f}"), _ms(n.get("p50_s")),
         _ms(n.get("p95_s")), _num(n.get("cpu_s_per_turn"), "{:.3f} s"), _mib(n.get("peak_rss_bytes")),
         str(n.get("peak_clis", "-")), _cli_bound(n), _mib(n.get("end_rss_bytes"))]
        for s, label, n in _rows(results) if s in ("c", "e")
    ]
    if load_rows:
        out += ["### Concurrent load: (c) established sessions, (d) CPU per turn, (e) burst of new sessions", "",
                _table(["scenario", "status", "config", "sessions", "turns", "errors", "recall", "turns/s", "p50",
                        "p95", "CPU/turn", "peak RSS", "peak CLIs", "CLI bound", "RSS at end"], load_rows), "",
                f"(e) turns/s vs baseline: default {_num(r['e_default_over_baseline_turns_per_s'])}x, "
                f"prewarm {_num(r['e_prewarm_over_baseline_turns_per_s'])}x; p50 vs baseline: default "
                f"{_num(r['e_default_over_baseline_p50'])}, prewarm {_num(r['e_prewarm_over_baseline_p50'])}. "
                f"Each (e) row is the median of {_burst_rounds(results)} alternated rounds; turns/s of every round: "
                f"{_round_rates(results)}.", "",
                "RSS is summed over the server and all its descendants (shared pages counted once per process, "
                "so an upper bound), sampled every 100 ms. Peak CLIs is the most direct children of the server "
                "seen at once; CLI bound = warm cap + prewarm + concurrent sessions, the most the server may "
                "hold, which is what keeps RSS bounded.", ""]

    limit_rows = [
        [f"({s}) {label}", _status(n), _config(n), str(n.get("sessions", "-")), str(n.get("turns", "-")),
         str(n.get("errors", "-")), str(n.get("refusals_503", "-")), _recall(n), _num(n.get("turns_per_s"), "{:.1f}"),
         _ms(n.get("p50_s")), _ms(n.get("p95_s")), _mib(n.get("usage_bytes")), _mib(n.get("peak_bytes")),
         str(n.get("limit_hits", "-")), str(n.get("oom_kills", "-"))]
        for s, label, n in _rows(results) if s == "limits"
    ]
    if limit_rows:
        out += [f"### Under a memory limit: {run['counts']['limit_mib']} MiB, cgroup", "",
                _table(["path", "status", "config", "sessions", "turns", "errors", "503s", "recall", "turns/s", "p50",
                        "p95", "usage at end", "peak usage", "limit hits", "OOM kills"], limit_rows), "",
                f"First-turn p50 under the limit / without = {_num(r['limits_first_p50'], '{:.2f}')}; follow-up p50 "
                f"= {_num(r['limits_follow_p50'], '{:.2f}')}. Both servers run the default configuration, the "
                "limited one in a memory cgroup (with every CLI it starts), so it sizes itself from the limit; "
                "their turns alternate, both settled (pools full, trees quiet) before each first turn and before "
                "the follow-ups. The burst runs on a fresh limited server; a 503 (no room for another CLI within "
                "the budget) is retried after its Retry-After and counted under 503s, the turn's latency includes "
                "the wait. Usage, peak, limit hits (v1 failcnt: times usage reached the limit and the kernel had "
                "to reclaim) and OOM kills are the cgroup's own counters.", ""]

    gateway_rows = [
        [f"({s}) {label}", _status(n), str(n.get("turns", "-")), str(n.get("errors", "-")), _recall(n),
         _ms(n.get("p50_s")), _ms(n.get("p95_s")), _ms(n.get("first_turn_p95_s")), _num(n.get("turns_per_s"), "{:.1f}"),
         str(n.get("sandboxes", "-")), _mib(n.get("rss_bytes_per_session")), _mib(n.get("peak_rss_bytes"))]
        for s, label, n in _gateway_rows(results)
    ]
    if gateway_rows:
        relay = _get(results, "g", "relay") or {}
        out += ["### The gateway (local backend unless said)", "",
                _table(["path", "status", "turns", "errors", "recall", "p50", "p95", "first-turn p95", "turns/s",
                        "sandboxes", "RSS/session", "peak RSS"], gateway_rows), "",
                f"Relay: p50 through the gateway - straight to the same sandbox = "
                f"{_num(r['g_relay_added_ms'], '{:+.1f} ms')} (follow-ups taken in turn on the three paths); median "
                f"of the pairs' differences {_num(_scaled(relay.get('paired_median_added_s'), 1000), '{:+.1f} ms')}; "
                f"through a bare relay (uvicorn and the relay's client as the gateway's, no framework, checks or access log: "
                f"what any relay on this stack costs on this machine) - straight = "
                f"{_num(_difference_ms(_get(relay, 'bare', 'p50_s'), _get(relay, 'direct', 'p50_s')), '{:+.1f} ms')}; "
                f"the gateway process's own CPU per relayed turn "
                f"{_num(_scaled(relay.get('gateway_cpu_s_per_turn'), 1000), '{:.1f} ms')}. "
                f"First turn, warm pool / no pool: local {_num(r['g_pool_over_no_pool_p50'], '{:.3f}')} "
                f"(tenant scope {_num(r['g_pool_over_no_pool_p50_tenant'], '{:.3f}')}), docker "
                f"{_num(r['g_docker_pool_over_no_pool_p50'], '{:.3f}')} "
                f"(tenant scope {_num(r['g_docker_pool_over_no_pool_p50_tenant'], '{:.3f}')}); "
                "each first turn starts from steady state "
                "(pool full, the gateway's process tree quiet). The burst's peak RSS is the whole tree: the gateway, "
                "every sandbox's server and their CLIs (local backend). RSS/session: every sandbox's processes "
                "(pooled ones included), summed once the tree is quiet after the burst, divided by its sessions; "
                f"tenant / session scope: turns/s local {_num(r['g_tenant_over_session_turns_per_s'])}x, docker "
                f"{_num(r['g_docker_tenant_over_session_turns_per_s'])}x; memory local "
                f"{_num(r['g_tenant_over_session_memory'])}, docker {_num(r['g_docker_tenant_over_session_memory'])}. "
                f"Two bursts: second p95 / first p95 {_num(r['g_second_over_first_wave_p95'])}; pool "
                f"{_get(results, 'g', 'waves', 'pool_before_second')} before the second; back at its floor "
                f"{_num(r['g_back_to_floor_s'], '{:.0f} s')} after the last claim.", ""]

    telemetry_rows = [
        [label, _status(results["o"]), str(n.get("turns", "-")), str(n.get("errors", "-")), _recall(n),
         _ms(n.get("p50_s")), _ms(n.get("p95_s")), _num(n.get("cpu_s_per_turn"), "{:.3f} s"),
         _ms(n.get("server_cpu_s_per_turn"))]
        for key, label in (("off", "(o) telemetry off (as shipped)"), ("on", "(o) traces + metrics over OTLP, JSON logs"))
        if isinstance(n := _get(results, "o", key), dict)
    ]
    if telemetry_rows:
        out += ["### Telemetry: (o) on vs off", "",
                _table(["server", "status", "turns", "errors", "recall", "p50", "p95", "CPU/turn",
                        "server process CPU/turn"], telemetry_rows), "",
                f"On / off: p50 {_num(r['o_on_over_off_p50'], '{:.3f}')}, CPU per turn "
                f"{_num(r['o_on_over_off_cpu'], '{:.3f}')}. Follow-ups on one session of each server, alternated; "
                "CPU is the server's whole process tree (server, CLIs) over the measured turns.", ""]

    out += ["### Targets", ""] + [f"- {t}" for t in run["target_lines"]] + [""]
    problems = [f"- {'/'.join(p)}: {n['status']}: {n.get('error', '')}".replace("\n", " ")[:600]
                for p, n in _parts(results) if n.get("status") != "ok"]
    if problems:
        out += ["### Parts not measured", ""] + problems + [""]
    return "\n".join(out)


def _parts(results: dict[str, Any]) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    out: list[tuple[tuple[str, ...], dict[str, Any]]] = []
    for section, node in results.items():
        if isinstance(node, dict) and "status" in node:
            out.append(((section,), node))
        elif isinstance(node, dict):
            out += [((section, key), sub) for key, sub in node.items() if isinstance(sub, dict)]
    return out


def console(run: dict[str, Any]) -> str:
    """The compact summary printed at the end of a run."""
    results = run["results"]
    rows = [[f"({s}) {label}", n.get("status", "?"), _config(n), str(n.get("turns", "-")), str(n.get("errors", "-")),
             _recall(n), _ms(n.get("p50_s")), _ms(n.get("p95_s")), _num(n.get("turns_per_s"), "{:.1f}"),
             _num(n.get("cpu_s_per_turn"), "{:.3f}"), _mib(n.get("peak_rss_bytes"))]
            for s, label, n in _rows(results) + _gateway_rows(results)]
    headers = ["part", "status", "config", "turns", "err", "recall", "p50", "p95", "turns/s", "cpu/turn", "peak RSS"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines + [""] + run["target_lines"])


# -- files -------------------------------------------------------------------

def write(run: dict[str, Any], results_md: Path = HERE / "RESULTS.md", results_json: Path = HERE / "results.json") -> None:
    """Replace this run's section of RESULTS.md and entry of results.json (one per mode, and
    per ``--only`` subset), keeping the others, so a smoke run or a subset never overwrites
    the numbers of a full run."""
    mode = run["section"]
    start, end = f"<!-- bench:{mode}:start -->", f"<!-- bench:{mode}:end -->"
    section = f"{start}\n{markdown(run)}\n{end}"
    text = results_md.read_text() if results_md.exists() else (
        "# Benchmark results\n\nWritten by `python -m bench` (see `bench/README.md`): one section per mode "
        "(full, quick) and `--only` subset, replaced by each run of it.\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{section}\n"
    results_md.write_text(text)

    try:
        raw = json.loads(results_json.read_text()) if results_json.exists() else {}
    except json.JSONDecodeError:
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    raw[mode] = run
    results_json.write_text(json.dumps(raw, indent=2) + "\n")
