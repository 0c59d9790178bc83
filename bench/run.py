"""Run berth's benchmarks on this machine and write a JSON results file.

    python3 -m bench.run [--quick] [--only NAME[,NAME]] [--out PATH]

Starts a private RabbitMQ node on 127.0.0.1 and, per benchmark, its own
manager, runc root and podman storage, and removes all of them at the
end. Needs root (runc), runc, tini and rabbitmq-server; podman and
conmon are measured when installed.
"""

import argparse
import importlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import PROJECT_ROOT, Context, loadavg
from deploy.rabbitmq import PrivateNode

log = logging.getLogger("bench")

BENCHMARKS = ["start_latency", "throughput", "heartbeats", "memory", "reactions", "scale"]
QUICK_SKIPPED: set[str] = set()


def tool_version(command: list[str]) -> str | None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = (completed.stdout or completed.stderr).strip().splitlines()
    return output[0] if output else None


def machine_info() -> dict:
    rabbitmq = tool_version(["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"])
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "runc": tool_version(["runc", "--version"]),
        "podman": tool_version(["podman", "--version"]) if shutil.which("podman") else None,
        "conmon": tool_version(["conmon", "--version"]) if shutil.which("conmon") else None,
        "rabbitmq_server": rabbitmq,
        "memory_kib": int(Path("/proc/meminfo").read_text().split()[1]),
    }


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def print_summary(results: list[dict]) -> None:
    header = f"{'benchmark':<15} {'row':<42} {'unit':<10} {'n':>5} {'median':>9} {'p90':>9} {'p99':>9} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for result in results:
        if "error" in result:
            print(f"{result['benchmark']:<15} FAILED: {result['error']}")
            continue
        for row in result["rows"]:
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
            print(
                f"{result['benchmark']:<15} {row['label'][:42]:<42} {row['unit']:<10} {row['n']:>5}"
                f" {format_value(row['median']):>9} {format_value(row['p90']):>9}"
                f" {format_value(row['p99']):>9} {ratio:>7}"
            )
        load = f"load {result['load_start'][0]:.2f} -> {result['load_end'][0]:.2f}"
        print(f"{'':<15} ({load})")
        for note in result["notes"]:
            print(f"{'':<15} note: {note}")
    print("ratio: this row's median divided by the median of the row it names as its peer (see JSON)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations and containers")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run, from: {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/DATE.json)")
    parser.add_argument(
        "--spawn",
        choices=["fork", "exec"],
        default="fork",
        help="how the managers start assistants (default: fork)",
    )
    parser.add_argument(
        "--scale-count",
        type=int,
        help="containers the scale benchmark starts (default: 1000, 100 with --quick)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)

    selected = args.only.split(",") if args.only else [
        name for name in BENCHMARKS if not (args.quick and name in QUICK_SKIPPED)
    ]
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}")
    if os.geteuid() != 0:
        parser.error("the benchmarks must run as root: runc needs it")

    # SIGTERM (from timeout(1), say) raises SystemExit, so the cleanup in
    # the finally blocks still stops the node, the managers and containers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    started = datetime.now(timezone.utc)
    output = args.out or PROJECT_ROOT / "bench" / "results" / f"{started:%Y-%m-%dT%H%M%S}.json"
    report = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "spawn": args.spawn,
        "machine": machine_info(),
        "load_start": loadavg(),
        "results": [],
    }
    work_dir = Path(tempfile.mkdtemp(prefix="berth-bench-"))
    # The node runs as the rabbitmq user, which cannot enter the mode 0700
    # work directory, so it gets a directory of its own.
    node_dir = Path(tempfile.mkdtemp(prefix="berth-bench-rabbitmq-"))
    node = PrivateNode(node_dir)
    try:
        url = node.start()
        context = Context(
            amqp_url=url,
            work_dir=work_dir / "work",
            quick=args.quick,
            spawn=args.spawn,
            broker_pid=int(node.pid_file.read_text()),
            scale_count=args.scale_count,
        )
        for name in selected:
            log.info("benchmark %s starts (load %s)", name, loadavg())
            began = time.monotonic()
            module = importlib.import_module(f"bench.{name}")
            try:
                result = module.run(context)
            except Exception as exc:
                log.exception("benchmark %s failed", name)
                result = {"benchmark": name, "error": repr(exc)}
            result["seconds"] = round(time.monotonic() - began, 1)
            report["results"].append(result)
            log.info("benchmark %s done in %.0f s", name, result["seconds"])
    finally:
        node.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(node_dir, ignore_errors=True)
    report["load_end"] = loadavg()

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print_summary(report["results"])
    print(f"results written to {output}")
    return 1 if any("error" in result for result in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
