"""Heartbeat capacity: one manager against a bare pika echo consumer.

A load process simulates N assistants on one connection: each sends a
Heartbeat every INTERVAL seconds (sends are spread evenly over the
interval) with a direct reply-to address and a correlation id, and the
process records each reply's round-trip time. The same load runs
against:

- berth: a manager with a few real ``sleep infinity`` containers. The
  simulated assistants send ``running`` heartbeats for those ids, so the
  manager replies ``ack`` through its normal path. One more run uses ids
  that the manager has no record of, which it rejects with ``nack`` and a
  warning in its log per heartbeat.
- echo: a process that consumes a queue and publishes a fixed reply for
  each message, with pika's BlockingConnection.

CPU per heartbeat is the consumer's utime + stime delta (/proc/PID/stat)
over the load window divided by the replies received. Levels and
consumers alternate: echo, berth, echo, berth, ...
"""

import json
import multiprocessing
import time
import uuid

import pika

from bench.common import Context, ManagerRun, Probe, Result, cpu_seconds
from messages import names
from messages.models import Heartbeat

INTERVAL = 1.0
ECHO_QUEUE = "bench.echo"
ECHO_REPLY = json.dumps({"schema_version": 1, "verdict": "ack", "grace": None, "exit_recorded": False}).encode()
KNOWN_CONTAINERS = 4


def echo_consumer(amqp_url: str, stop_at: float) -> None:
    """Reply to every message on ECHO_QUEUE with a fixed body until ``stop_at`` (wall time)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(ECHO_QUEUE, arguments={"x-message-ttl": 10_000})

    def on_message(channel, method, properties, body: bytes) -> None:
        if properties.reply_to:
            channel.basic_publish(
                "",
                properties.reply_to,
                ECHO_REPLY,
                pika.BasicProperties(content_type="application/json", correlation_id=properties.correlation_id),
            )

    channel.basic_consume(ECHO_QUEUE, on_message, auto_ack=True)
    while time.time() < stop_at:
        connection.process_data_events(time_limit=0.1)
    connection.close()


def heartbeat_load(
    amqp_url: str, queue: str, bodies: list[bytes], assistants: int, duration: float, results, go
) -> None:
    """Send heartbeats of ``assistants`` simulated assistants for ``duration`` s.

    The counts and round-trip latencies go to ``results`` at the end. Puts "ready" on ``results`` once connected and starts sending when
    ``go`` is set, so the caller can read the consumer's CPU time first.
    """
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    sent_at: dict[str, float] = {}
    latencies: list[float] = []

    def on_reply(channel, method, properties, body: bytes) -> None:
        began = sent_at.pop(properties.correlation_id, None)
        if began is not None:
            latencies.append(time.perf_counter() - began)

    channel.basic_consume(names.DIRECT_REPLY_TO, on_reply, auto_ack=True)
    results.put("ready")
    if not go.wait(60):
        connection.close()
        return
    spacing = INTERVAL / assistants
    began = time.perf_counter()
    end = began + duration
    sent = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        # Send every heartbeat that is due, then read replies.
        due = min(int((now - began) / spacing) + 1, int(duration / spacing))
        while sent < due:
            correlation_id = str(sent)
            sent_at[correlation_id] = time.perf_counter()
            channel.basic_publish(
                "",
                queue,
                bodies[sent % len(bodies)],
                pika.BasicProperties(
                    content_type="application/json",
                    reply_to=names.DIRECT_REPLY_TO,
                    correlation_id=correlation_id,
                ),
            )
            sent += 1
        connection.process_data_events(time_limit=min(spacing, 0.002))
    # Late replies count towards latency but not towards the window's rate.
    in_window = len(latencies)
    drain_end = time.perf_counter() + 2.0
    while sent_at and time.perf_counter() < drain_end:
        connection.process_data_events(time_limit=0.05)
    connection.close()
    results.put({"sent": sent, "replied_in_window": in_window, "latencies": latencies})


def heartbeat_bodies(senders: list[tuple[str, str | None]]) -> list[bytes]:
    """Serialize one ``running`` heartbeat per (container id, assistant token).

    The model builds the body, so the load follows the protocol as it
    changes. A sender without a token gets a random one when the model
    requires tokens.
    """
    bodies = []
    for container_id, token in senders:
        fields = {"container_id": container_id, "assistant_pid": 1, "status": "running", "pid": 1}
        if "token" in Heartbeat.model_fields:
            fields["token"] = token or uuid.uuid4().hex
        bodies.append(Heartbeat(**fields).model_dump_json().encode())
    return bodies


def assistant_token(manager: ManagerRun, container_id: str) -> str | None:
    """Return the token the manager gave the container's assistant, if the protocol has one."""
    config = json.loads((manager.containers_dir / container_id / "assistant.json").read_text())
    return config.get("token")


def measure(context: Context, consumer_pid: int, queue: str, bodies: list[bytes], assistants: int, duration: float) -> dict:
    """Run one load against the consumer ``consumer_pid`` and return its figures."""
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    go = spawn.Event()
    load = spawn.Process(
        target=heartbeat_load,
        args=(context.amqp_url, queue, bodies, assistants, duration, results, go),
    )
    load.start()
    if results.get(timeout=60) != "ready":
        raise RuntimeError("the heartbeat load process did not report ready")
    cpu_before = cpu_seconds(consumer_pid)
    go.set()
    figures = results.get(timeout=duration + 60)
    cpu_after = cpu_seconds(consumer_pid)
    load.join(10)
    latencies = sorted(figures["latencies"])
    replies = len(latencies)
    return {
        "sent": figures["sent"],
        "replies": replies,
        "replies_per_s": figures["replied_in_window"] / duration,
        "cpu_us_per_reply": (cpu_after - cpu_before) / replies * 1e6 if replies else None,
        "latencies_ms": [value * 1000 for value in latencies],
    }


def run(context: Context) -> dict:
    result = Result("heartbeats")
    levels = [1000, 2000] if context.quick else [1000, 2000, 3000]
    duration = 5.0 if context.quick else 10.0
    base = context.directory("heartbeats")
    manager = ManagerRun(context, context.manager_id("heartbeats"), base / "berth", lost_after=30.0)
    spawn = multiprocessing.get_context("spawn")
    echo = spawn.Process(target=echo_consumer, args=(context.amqp_url, time.time() + 3600))
    per_level: dict[str, dict] = {}
    try:
        manager.start()
        with Probe(context.amqp_url, manager.manager_id) as probe:
            known = [f"known-{index}" for index in range(KNOWN_CONTAINERS)]
            for container_id in known:
                probe.run_container(container_id, ["sleep", "infinity"])
        senders = [(container_id, assistant_token(manager, container_id)) for container_id in known]
        echo.start()
        time.sleep(1.0)
        manager_queue = names.heartbeat_queue(manager.manager_id)
        for assistants in levels:
            echo_figures = measure(context, echo.pid, ECHO_QUEUE, heartbeat_bodies(senders), assistants, duration)
            berth_figures = measure(context, manager.pid, manager_queue, heartbeat_bodies(senders), assistants, duration)
            per_level[str(assistants)] = {"echo": echo_figures, "berth": berth_figures}
            for system, figures in (("echo", echo_figures), ("berth", berth_figures)):
                result.note(
                    f"{system} at {assistants}/s: sent {figures['sent']}, {figures['replies']} replies,"
                    f" {figures['replies_per_s']:.0f}/s in the window"
                )
        unknown = measure(
            context, manager.pid, manager_queue, heartbeat_bodies([("unknown-0", None), ("unknown-1", None)]), levels[0], duration
        )
        per_level[f"{levels[0]} unknown ids"] = {"berth": unknown}
    finally:
        if echo.pid is not None:
            echo.kill()
            echo.join(10)
        manager.cleanup()

    for level, pair in per_level.items():
        for system in ("echo", "berth"):
            if system not in pair:
                continue
            figures = pair[system]
            prefix = f"{system} {level}/s"
            peer = f"echo {level}/s" if system == "berth" and "echo" in pair else None
            result.add(f"{prefix} CPU per heartbeat", "us", [figures["cpu_us_per_reply"]],
                       compare_to=f"{peer} CPU per heartbeat" if peer else None)
            result.add(f"{prefix} replies/s", "1/s", [figures["replies_per_s"]],
                       compare_to=f"{peer} replies/s" if peer else None, higher_is_better=True)
            result.add(f"{prefix} reply latency", "ms", figures["latencies_ms"],
                       compare_to=f"{peer} reply latency" if peer else None)
            figures["latencies_ms"] = None  # kept in the row's samples
    for row in result.rows:
        if row["unit"] == "ms":
            row["samples"] = []  # thousands of values; the summary is kept
    result.extra["sent"] = {level: {s: f["sent"] for s, f in pair.items()} for level, pair in per_level.items()}
    result.note(f"{duration:.0f} s per level, heartbeat interval {INTERVAL:.0f} s, levels = simulated assistants")
    return result.finish()
