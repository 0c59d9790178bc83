"""Start latency: berth until its ``running`` event, against runc and podman.

Each iteration runs, in this order, one berth ``start`` of a created
container, one raw runc create + start, one berth ``run`` (create and
start in one command) and one ``podman run -d``, so load drift hits all
of them alike. Every workload is ``sleep infinity`` under tini.

- berth start: ``start`` published until the ``running`` event arrives;
  the container was created beforehand, off the clock.
- berth run: ``run`` published until the ``running`` event arrives.
- runc create+start: ``runc create`` of a bundle written beforehand by
  manager.bundle.write_bundle, then ``runc start``, until tini has forked
  the workload. "runc start" is the part after create returned.
- podman: wall time of ``podman run -d`` (it returns once the container
  runs).

The berth start is also split into phases from the manager's and the
assistant's log timestamps (1 ms resolution).
"""

import statistics
import time

from bench.common import (
    Context,
    ManagerRun,
    Podman,
    Probe,
    Result,
    RuncPeer,
    log_times,
    wait_for_child,
)

WORKLOAD = ["sleep", "infinity"]
EVENT_TIMEOUT = 30.0


def berth_start(probe: Probe, manager: ManagerRun, container_id: str) -> tuple[float, dict]:
    """Time one start of a created container; return seconds and its phase times."""
    probe.request({"command": "create", "id": container_id, "argv": WORKLOAD})
    published_wall = time.time()
    published = time.perf_counter()
    correlation_id = probe.send({"command": "start", "id": container_id})
    arrival, arrival_wall, _ = probe.wait_event(container_id, "running", EVENT_TIMEOUT)
    probe.wait_reply(correlation_id, EVENT_TIMEOUT)

    assistant_log = manager.containers_dir / container_id / "assistant.log"
    marks = {
        "published": published_wall,
        "order received": first(log_times(assistant_log, "control order start")),
        "runc start returned": first(log_times(assistant_log, f"container {container_id} started")),
        "event received": arrival_wall,
    }
    probe.delete(container_id)
    return arrival - published, marks


def berth_run(probe: Probe, container_id: str) -> float:
    published = time.perf_counter()
    correlation_id = probe.send({"command": "run", "id": container_id, "argv": WORKLOAD})
    arrival, _, _ = probe.wait_event(container_id, "running", EVENT_TIMEOUT)
    probe.wait_reply(correlation_id, EVENT_TIMEOUT)
    probe.delete(container_id)
    return arrival - published


def runc_create_start(runc: RuncPeer, container_id: str) -> tuple[float, float]:
    """Time create + start until the workload is forked; return (total, start part)."""
    bundle_dir = runc.write_bundle(container_id, WORKLOAD)
    began = time.perf_counter()
    pid = runc.create(container_id, bundle_dir)
    start_began = time.perf_counter()
    runc.start(container_id)
    if not wait_for_child(pid):
        raise RuntimeError(f"runc container {container_id}: tini forked no workload within 2 s")
    ended = time.perf_counter()
    runc.delete(container_id, force=True)
    runc.remove_bundle(container_id)
    return ended - began, ended - start_began


def podman_run(podman: Podman, name: str) -> float:
    elapsed = podman.run_detached(name, WORKLOAD)
    podman.timed("rm", "--force", "--time", "0", name)
    return elapsed


def first(values: list[float]) -> float | None:
    return values[0] if values else None


def phase_medians(manager: ManagerRun, all_marks: dict[str, dict]) -> dict[str, float]:
    """Return the median milliseconds of each phase of berth's start."""
    phases: dict[str, list[float]] = {}
    for container_id, marks in all_marks.items():
        marks["manager: starting"] = first(log_times(manager.log_path, f"container {container_id} is starting"))
        marks["manager: running"] = first(log_times(manager.log_path, f"container {container_id} is running"))
        order = [
            "published",
            "manager: starting",
            "order received",
            "runc start returned",
            "manager: running",
            "event received",
        ]
        for before, after in zip(order, order[1:]):
            if marks.get(before) is not None and marks.get(after) is not None:
                phases.setdefault(f"{before} -> {after}", []).append((marks[after] - marks[before]) * 1000)
    return {name: round(statistics.median(values), 1) for name, values in phases.items()}


def run(context: Context) -> dict:
    result = Result("start_latency")
    iterations = 8 if context.quick else 30
    base = context.directory("start_latency")
    manager = ManagerRun(context, context.manager_id("start"), base / "berth")
    runc = RuncPeer(base / "runc", context.manager_id("start-runc"))
    podman = Podman()
    samples: dict[str, list[float]] = {
        "berth start": [], "berth run": [], "runc create+start": [], "runc start": [], "podman run -d": [],
    }
    all_marks: dict[str, dict] = {}
    if not podman.usable:
        result.note(f"podman not measured: {podman.unusable_reason}")
    try:
        manager.start()
        with Probe(context.amqp_url, manager.manager_id) as probe:
            for index in range(iterations):
                seconds, marks = berth_start(probe, manager, f"start-{index}")
                samples["berth start"].append(seconds * 1000)
                all_marks[f"start-{index}"] = marks

                total, start_part = runc_create_start(runc, f"runc-{index}")
                samples["runc create+start"].append(total * 1000)
                samples["runc start"].append(start_part * 1000)

                samples["berth run"].append(berth_run(probe, f"run-{index}") * 1000)
                if podman.usable:
                    samples["podman run -d"].append(podman_run(podman, f"podman-{index}") * 1000)
        result.extra["berth_start_phases_ms"] = phase_medians(manager, all_marks)
    finally:
        manager.cleanup()
        runc.cleanup()
        podman.cleanup()

    result.add("berth start", "ms", samples["berth start"], compare_to="runc create+start")
    result.add("berth run", "ms", samples["berth run"], compare_to="runc create+start")
    result.add("runc create+start", "ms", samples["runc create+start"])
    result.add("runc start", "ms", samples["runc start"])
    if samples["podman run -d"]:
        result.add("podman run -d", "ms", samples["podman run -d"])
        result.add("berth start vs podman", "ms", samples["berth start"], compare_to="podman run -d")
    return result.finish()
