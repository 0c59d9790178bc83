"""Run-to-completion throughput: containers of /bin/true per second.

Each round takes COUNT containers through create, start, exit and
delete with CLIENTS threads working in parallel, once through berth and
once through raw runc, alternating berth and runc rounds.

- berth: each thread has its own messages.client.Client and, per
  container, sends ``run`` (create and start in one command), waits for
  the container's ``exited`` event and sends ``delete``.
- runc: each thread, per container, writes the bundle with
  manager.bundle.write_bundle, runs ``runc create`` and ``runc start``,
  waits for the init to exit (pidfd), runs ``runc delete`` and removes the
  bundle.

The rate of a round is COUNT divided by the time from the first thread's
start to the last thread's end.
"""

import threading
import time

from bench.common import Context, ExitWatch, ManagerRun, Result, RuncPeer, parallel
from messages.client import Client

WORKLOAD = ["/bin/true"]
CLIENTS = 4
EXIT_TIMEOUT = 60.0


def split(ids: list[str], parts: int) -> list[list[str]]:
    return [ids[index::parts] for index in range(parts)]


def berth_round(context: Context, manager: ManagerRun, ids: list[str]) -> float:
    """Run ``ids`` through berth; return containers per second."""
    shares = split(ids, CLIENTS)
    ready = threading.Barrier(CLIENTS)

    def worker(index: int) -> tuple[float, float]:
        with Client(context.amqp_url, manager.manager_id, timeout=EXIT_TIMEOUT) as client:
            events = client.subscribe(f"{manager.manager_id}.*.exited")
            exited: set[str] = set()
            ready.wait(timeout=60)
            began = time.perf_counter()
            for container_id in shares[index]:
                client.request({"command": "run", "id": container_id, "argv": WORKLOAD})
                while container_id not in exited:
                    event = events.get(timeout=EXIT_TIMEOUT)
                    if event is None:
                        raise TimeoutError(f"no exited event for {container_id} in {EXIT_TIMEOUT} s")
                    exited.add(event.container_id)
                client.request({"command": "delete", "id": container_id})
            return began, time.perf_counter()

    spans = parallel(CLIENTS, worker)
    return len(ids) / (max(end for _, end in spans) - min(began for began, _ in spans))


def runc_round(runc: RuncPeer, ids: list[str]) -> float:
    """Run ``ids`` through raw runc; return containers per second."""
    shares = split(ids, CLIENTS)

    def worker(index: int) -> tuple[float, float]:
        began = time.perf_counter()
        for container_id in shares[index]:
            bundle_dir = runc.write_bundle(container_id, WORKLOAD)
            pid = runc.create(container_id, bundle_dir)
            runc.start(container_id)
            if pid not in ExitWatch([pid]).wait(EXIT_TIMEOUT):
                raise TimeoutError(f"runc container {container_id} still runs after {EXIT_TIMEOUT} s")
            runc.delete(container_id)
            runc.remove_bundle(container_id)
        return began, time.perf_counter()

    spans = parallel(CLIENTS, worker)
    return len(ids) / (max(end for _, end in spans) - min(began for began, _ in spans))


def run(context: Context) -> dict:
    result = Result("throughput")
    count = 50 if context.quick else 200
    rounds = 1 if context.quick else 2
    base = context.directory("throughput")
    manager = ManagerRun(context, context.manager_id("throughput"), base / "berth")
    runc = RuncPeer(base / "runc", context.manager_id("throughput-runc"))
    berth_rates: list[float] = []
    runc_rates: list[float] = []
    try:
        manager.start()
        for round_index in range(rounds):
            ids = [f"r{round_index}-{number}" for number in range(count)]
            berth_rates.append(berth_round(context, manager, ids))
            runc_rates.append(runc_round(runc, ids))
            result.note(
                f"round {round_index}: berth {berth_rates[-1]:.1f}/s, runc {runc_rates[-1]:.1f}/s"
            )
    finally:
        manager.cleanup()
        runc.cleanup()
    result.note(f"{count} containers per round, {CLIENTS} parallel clients, {rounds} rounds")
    result.add("berth", "containers/s", berth_rates, compare_to="runc", higher_is_better=True)
    result.add("runc", "containers/s", runc_rates, higher_is_better=True)
    return result.finish()
