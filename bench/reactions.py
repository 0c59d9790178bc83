"""Reaction times: stop, heartbeat timeout and nack.

- stop -> exited: ``stop`` (grace 10 s) of a running ``sleep infinity``
  under tini, which exits on the forwarded SIGTERM, until the ``exited``
  event arrives. Peers, alternating with berth: ``runc kill SIGTERM``
  until the init's pidfd reports its exit, and ``podman stop -t 10``.
- heartbeat timeout: containers with a heartbeat timeout of T run under a
  manager that is then SIGKILLed. The figure is the time from the kill to
  each workload's exit (pidfd) minus T. The assistant's last reply came
  up to one interval before the kill, so values from -interval to 0 are
  expected.
- nack -> dead: containers run under a manager that is SIGKILLed and
  replaced by one with the same id and an empty state directory, in two
  variants. With the same runc root, the new manager finds the workloads
  as orphan runc containers and removes them at start. With another runc
  root it cannot see them, so only the heartbeat path ends them: the
  manager replies ``retry_later`` during its adopt window, then ``nack``.
  Figures: from the new manager's first ``list`` reply to each workload's
  exit (pidfd), and from the manager's log line that replied ``nack``
  to the container's heartbeat to the exit (1 ms resolution).
"""

import time

from bench.common import (
    Context,
    ExitWatch,
    ManagerRun,
    Podman,
    Probe,
    Result,
    RuncPeer,
    log_times,
    wait_for_child,
)

WORKLOAD = ["sleep", "infinity"]
INTERVAL = 1.0
TIMEOUT_T = 3.0


def wall_offset() -> float:
    """Return time.time() - time.perf_counter(), to turn perf_counter values into wall times."""
    return time.time() - time.perf_counter()


def stop_round(context: Context, index: int, probe: Probe, runc: RuncPeer, podman: Podman, samples: dict) -> None:
    container_id = f"stop-{index}"
    probe.run_container(container_id, WORKLOAD)
    published = time.perf_counter()
    probe.send({"command": "stop", "id": container_id, "grace": 10})
    arrival, _, _ = probe.wait_event(container_id, "exited", 30.0)
    samples["berth stop -> exited"].append((arrival - published) * 1000)
    probe.delete(container_id)

    runc_id = f"runc-stop-{index}"
    pid = runc.create(runc_id, runc.write_bundle(runc_id, WORKLOAD))
    runc.start(runc_id)
    wait_for_child(pid)
    watch = ExitWatch([pid])
    signalled = time.perf_counter()
    runc.kill(runc_id, "SIGTERM")
    exited = watch.wait(30.0).get(pid)
    if exited is None:
        raise TimeoutError(f"runc container {runc_id} ignored SIGTERM for 30 s")
    samples["runc kill SIGTERM -> exit"].append((exited - signalled) * 1000)
    runc.delete(runc_id, force=True)
    runc.remove_bundle(runc_id)

    if podman.usable:
        name = f"podman-stop-{index}"
        podman.run_detached(name, WORKLOAD)
        samples["podman stop"].append(podman.timed("stop", "-t", "10", name) * 1000)
        podman.timed("rm", "--force", name)


def start_and_kill_manager(context: Context, manager: ManagerRun, count: int, **options) -> tuple[float, dict[int, str]]:
    """Run ``count`` containers, SIGKILL the manager, and return the kill time and workload pids."""
    manager.start()
    pids = {}
    with Probe(context.amqp_url, manager.manager_id, events=False) as probe:
        for number in range(count):
            container_id = f"react-{number}"
            info = probe.run_container(container_id, WORKLOAD, **options)
            pids[info["pid"]] = container_id
    # Spread the kill across the assistants' heartbeat phases.
    time.sleep(INTERVAL * 1.5)
    return manager.kill(), pids


def timeout_round(context: Context, base, round_index: int, count: int, samples: list[float]) -> None:
    manager = ManagerRun(
        context, context.manager_id(f"timeout{round_index}"), base / f"timeout{round_index}",
        heartbeat_interval=INTERVAL,
    )
    try:
        killed, pids = start_and_kill_manager(context, manager, count, heartbeat_timeout=TIMEOUT_T)
        exits = ExitWatch(list(pids)).wait(TIMEOUT_T + 30.0)
        for pid in pids:
            if pid not in exits:
                raise TimeoutError(f"workload {pid} still runs {TIMEOUT_T + 30:.0f} s after the manager died")
            samples.append((exits[pid] - killed - TIMEOUT_T) * 1000)
    finally:
        manager.cleanup()


def nack_round(context: Context, base, round_index: int, count: int, same_root: bool, samples: dict) -> None:
    variant = "same runc root" if same_root else "other runc root"
    manager_id = context.manager_id(f"nack{round_index}{'s' if same_root else 'o'}")
    directory = base / manager_id
    first = ManagerRun(context, manager_id, directory, heartbeat_interval=INTERVAL)
    second = ManagerRun(
        context, manager_id, directory, heartbeat_interval=INTERVAL, state_name="empty",
        runc_name="runc" if same_root else "runc-other",
    )
    try:
        _, pids = start_and_kill_manager(context, first, count, heartbeat_timeout=60.0)
        watch = ExitWatch(list(pids))
        ready = second.start()
        offset = wall_offset()
        exits = watch.wait(60.0)
        for pid, container_id in pids.items():
            if pid not in exits:
                raise TimeoutError(f"workload {pid} of {container_id} still runs 60 s after the restart")
            samples.setdefault(f"{variant}: manager ready -> dead", []).append((exits[pid] - ready) * 1000)
            nacked = log_times(second.log_path, f"heartbeat from unknown container {container_id} (", ": nack")
            if nacked:
                samples.setdefault(f"{variant}: nack logged -> dead", []).append(
                    (exits[pid] + offset - nacked[0]) * 1000
                )
    finally:
        first.cleanup()
        second.cleanup()


def run(context: Context) -> dict:
    result = Result("reactions")
    stops = 5 if context.quick else 15
    rounds = 1 if context.quick else 2
    per_round = 3 if context.quick else 5
    base = context.directory("reactions")
    manager = ManagerRun(context, context.manager_id("stop"), base / "stop")
    runc = RuncPeer(base / "runc", context.manager_id("stop-runc"))
    podman = Podman()
    stop_samples = {"berth stop -> exited": [], "runc kill SIGTERM -> exit": [], "podman stop": []}
    timeout_samples: list[float] = []
    nack_samples: dict[str, list[float]] = {}
    try:
        manager.start()
        with Probe(context.amqp_url, manager.manager_id) as probe:
            for index in range(stops):
                stop_round(context, index, probe, runc, podman, stop_samples)
        manager.cleanup()
        for round_index in range(rounds):
            timeout_round(context, base, round_index, per_round, timeout_samples)
            nack_round(context, base, round_index, per_round, False, nack_samples)
            nack_round(context, base, round_index, per_round, True, nack_samples)
    finally:
        manager.cleanup()
        runc.cleanup()
        podman.cleanup()

    result.add("berth stop -> exited", "ms", stop_samples["berth stop -> exited"], compare_to="podman stop")
    result.add("runc kill SIGTERM -> exit", "ms", stop_samples["runc kill SIGTERM -> exit"])
    if stop_samples["podman stop"]:
        result.add("podman stop", "ms", stop_samples["podman stop"])
    result.add(f"timeout: dead after kill minus T={TIMEOUT_T:.0f} s", "ms", timeout_samples)
    for label, samples in nack_samples.items():
        result.add(f"restart, {label}", "ms", samples)
    result.note(f"heartbeat interval {INTERVAL:.0f} s; {rounds} timeout and nack rounds of {per_round} containers")
    return result.finish()
