"""``python -m bench [--quick] [--only a,b,c,e,limits,g,o]``: run every scenario once, write the results.

Exit status: 0 when every part was measured or skipped because the server lacks
a feature (targets are reported, not asserted); 1 when the harness or a server
broke (a part failed, or the local model did not start); 2 on bad arguments;
130 when interrupted (SIGINT or SIGTERM: servers are still torn down).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import local_model
from bench.scenarios import QUICK, Bench, Counts, run_all

SCENARIOS = ("a", "b", "c", "e", "limits", "g", "o")


def parse(argv: list[str] | None) -> argparse.Namespace:
    defaults = Counts()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts for a smoke test (section 'quick')")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help="comma-separated scenarios to run (default: all); a subset writes its own section")
    parser.add_argument("--follow-ups", type=int, metavar="N", help=f"(a) sequential follow-ups per path ({defaults.follow_ups})")
    parser.add_argument("--first-turns", type=int, metavar="N",
                        help=f"(b) sequential first turns per path ({defaults.first_turns})")
    parser.add_argument("--prewarm", type=int, metavar="N", dest="prewarm_b", help=f"(b) AGENT_PREWARM ({defaults.prewarm_b})")
    parser.add_argument("--sessions", type=int, metavar="N", dest="established", help=f"(c) sessions ({defaults.established})")
    parser.add_argument("--turns-per-session", type=int, metavar="N", dest="follow_ups_c",
                        help=f"(c) follow-ups per session ({defaults.follow_ups_c})")
    parser.add_argument("--burst", type=int, metavar="N", help=f"(e) new sessions at once, and AGENT_PREWARM ({defaults.burst})")
    parser.add_argument("--burst-rounds", type=int, metavar="N",
                        help=f"(e) rounds of the three servers ({defaults.burst_rounds})")
    parser.add_argument("--limit-mib", type=int, metavar="N",
                        help=f"(limits) memory limit of the limited servers, MiB ({defaults.limit_mib})")
    parser.add_argument("--gateway-follow-ups", type=int, metavar="N", dest="gw_follow_ups",
                        help=f"(g) follow-ups per path, gateway and straight to the sandbox ({defaults.gw_follow_ups})")
    parser.add_argument("--gateway-first-turns", type=int, metavar="N", dest="gw_first_turns",
                        help=f"(g) first turns per gateway, warm pool and none ({defaults.gw_first_turns})")
    parser.add_argument("--gateway-burst", type=int, metavar="N", dest="gw_burst",
                        help=f"(g) new sessions at once through the gateway ({defaults.gw_burst})")
    parser.add_argument("--gateway-docker-image", metavar="IMAGE",
                        help="(g) also measure first turns on the docker backend with this image (hosting/Dockerfile)")
    parser.add_argument("--telemetry-turns", type=int, metavar="N", dest="obs_turns",
                        help=f"(o) follow-ups per server, telemetry on and off ({defaults.obs_turns})")
    parser.add_argument("--part-timeout", type=float, metavar="S", help="seconds each part may take (900; quick: 300)")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not only or only - set(SCENARIOS):
        parser.error(f"--only takes some of {','.join(SCENARIOS)}")
    args.only = only
    return args


def counts_from(args: argparse.Namespace) -> Counts:
    base = QUICK if args.quick else Counts()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Counts)
                 if getattr(args, f.name, None) is not None}
    counts = dataclasses.replace(base, **overrides)
    if any(v < 1 for v in dataclasses.asdict(counts).values()):
        raise SystemExit("python -m bench: every count must be >= 1")
    if counts.first_turns > counts.prewarm_b:
        print(f"note: {counts.first_turns} first turns with prewarm {counts.prewarm_b}: "
              "turns are spaced until the pool refills, so it is never exhausted", file=sys.stderr)
    return counts


async def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    counts = counts_from(args)
    tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    failures: list[str] = []
    started = time.monotonic()
    try:
        async with local_model(tmp) as model_url:
            bench = Bench(model_url, tmp, counts, args.part_timeout or (300.0 if args.quick else 900.0), failures,
                          args.gateway_docker_image)
            results = await run_all(bench, args.only)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = report.ratios(results)
    mode = "quick" if args.quick else "full"
    run_info = {
        "mode": mode,
        "section": mode if args.only == set(SCENARIOS) else f"{mode}-only-{'-'.join(sorted(args.only))}",
        "machine": report.machine(),
        "counts": dataclasses.asdict(counts),
        "scenarios": sorted(args.only),
        "wall_s": time.monotonic() - started,
        "results": results,
        "ratios": ratios,
        "target_lines": [t.line() for t in report.targets(results, ratios)],
    }
    return run_info, failures


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` kills its servers and removes its temp dir."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        run_info, failures = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("python -m bench: interrupted; servers stopped, nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the harness itself broke: say so, exit 1
        print(f"python -m bench: harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report.write(run_info)
    print()
    print(report.console(run_info))
    print(f"\nwrote {report.HERE / 'RESULTS.md'} and {report.HERE / 'results.json'} (section '{run_info['section']}')")
    for failure in failures:
        print(f"harness: part failed: {failure.splitlines()[0]}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
