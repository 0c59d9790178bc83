"""Memory per container: PSS of berth's assistants against podman's conmon.

Starts COUNT idle containers (``sleep infinity`` under tini) through one
manager, waits for them to settle, and divides the summed PSS
(/proc/PID/smaps_rollup) of all assistants by their number. PSS splits
shared pages among the processes that map them, so the sum is what the
assistants cost together. The same is then done for COUNT containers of
``podman run -d`` and their conmon processes. The workloads themselves
(tini, sleep) are the same for both and are not counted.

While the berth containers run, the benchmark also times LIST_REQUESTS
``list`` commands (the scale figure on a small scale).
"""

import time

from bench.common import (
    Context,
    ManagerRun,
    Podman,
    Probe,
    Result,
    parallel,
    pids_matching,
    total_pss_mib,
)

CLIENTS = 4
SETTLE_SECONDS = 3.0
LIST_REQUESTS = 50


def start_berth_containers(context: Context, manager: ManagerRun, count: int) -> None:
    ids = [f"idle-{number}" for number in range(count)]

    def worker(index: int) -> None:
        with Probe(context.amqp_url, manager.manager_id, events=False) as probe:
            for container_id in ids[index::CLIENTS]:
                probe.run_container(container_id, ["sleep", "infinity"])

    parallel(CLIENTS, worker)


def list_latencies(context: Context, manager: ManagerRun) -> list[float]:
    latencies = []
    with Probe(context.amqp_url, manager.manager_id, events=False) as probe:
        for _ in range(LIST_REQUESTS):
            began = time.perf_counter()
            probe.request({"command": "list"})
            latencies.append((time.perf_counter() - began) * 1000)
    return latencies


def run(context: Context) -> dict:
    result = Result("memory")
    count = 20 if context.quick else 200
    base = context.directory("memory")
    manager = ManagerRun(context, context.manager_id("memory"), base / "berth", lost_after=30.0)
    podman = Podman()
    try:
        manager.start()
        began = time.perf_counter()
        start_berth_containers(context, manager, count)
        result.note(f"berth started {count} containers in {time.perf_counter() - began:.1f} s")
        time.sleep(SETTLE_SECONDS)
        assistants = manager.assistant_pids()
        berth_total = total_pss_mib(assistants)
        result.add("berth assistant PSS per container", "MiB", [berth_total / len(assistants)],
                   compare_to="conmon PSS per container" if podman.usable else None)
        result.add("berth manager PSS", "MiB", [total_pss_mib([manager.pid])])
        result.add(f"list latency, {count} containers", "ms", list_latencies(context, manager))
        result.note(f"{len(assistants)} assistants, {berth_total:.1f} MiB PSS in total")
        manager.cleanup()

        if podman.usable:
            began = time.perf_counter()
            for number in range(count):
                podman.run_detached(f"idle-{number}", ["sleep", "infinity"])
            result.note(f"podman started {count} containers in {time.perf_counter() - began:.1f} s")
            time.sleep(SETTLE_SECONDS)
            conmons = pids_matching(b"conmon", str(podman.base_dir).encode())
            conmon_total = total_pss_mib(conmons)
            result.add("conmon PSS per container", "MiB", [conmon_total / len(conmons)])
            result.note(f"{len(conmons)} conmon processes, {conmon_total:.1f} MiB PSS in total")
        else:
            result.note(f"conmon not measured: {podman.unusable_reason}")
    finally:
        manager.cleanup()
        podman.cleanup()
    return result.finish()
