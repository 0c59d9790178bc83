"""Restarts, outages, duplicates and poison messages cost no container and no event."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

import pika
import pytest

from assistant.config import AssistantConfig
from assistant.supervisor import Supervisor
from messages import names
from messages.client import BrokerUnavailable, Client
from messages.models import (
    ContainerState,
    ErrorCode,
    ExitReason,
    HeartbeatReply,
    Verdict,
    utc_now,
)
from tests.helpers import PROJECT_ROOT, ManagerProcess, pid_alive, wait_until
from tests.proxy import TcpProxy

pytestmark = pytest.mark.root


def new_manager(amqp_url, run_prefix, directory, **options) -> ManagerProcess:
    return ManagerProcess(amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", directory, **options)


@pytest.fixture
def manager(amqp_url, run_prefix, tmp_path):
    process = new_manager(amqp_url, run_prefix, tmp_path / "manager")
    process.start()
    yield process
    process.cleanup()


def drain_events(subscription, quiet: float = 1.5) -> list:
    """Collect events until none arrives for ``quiet`` seconds."""
    events = []
    while (event := subscription.get(quiet)) is not None:
        events.append(event)
    return events


def test_same_request_id_runs_once(manager):
    command = {"command": "create", "id": "once", "argv": ["sleep", "infinity"], "request_id": "req-once-1"}
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.once.*")
        first = client.send(command)
        second = client.send(command)
        assert first.ok
        assert second.model_dump_json() == first.model_dump_json()
        assert [event.event for event in drain_events(events)] == ["created"]

        # A fresh request for the same id is a new command, and a conflict.
        again = client.send({**command, "request_id": "req-once-2"})
        assert again.error.code == ErrorCode.CONFLICT

        # A used request id on a different command is rejected, not answered
        # with the old reply.
        reused = client.send({"command": "delete", "id": "once", "force": True, "request_id": "req-once-1"})
        assert reused.error.code == ErrorCode.INVALID_ARGUMENT
        assert "'req-once-1'" in reused.error.message
        assert client.request({"command": "inspect", "id": "once"}).container.state == ContainerState.CREATED
        client.request({"command": "delete", "id": "once", "force": True})


def test_concurrent_duplicates_get_one_reply_each(manager):
    command = {"command": "run", "id": "twins", "argv": ["sleep", "infinity"], "request_id": "req-twins"}
    replies = []

    def send() -> None:
        with manager.client() as client:
            replies.append(client.send(command))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == 2
    assert replies[0].ok
    assert replies[0].model_dump_json() == replies[1].model_dump_json()
    with manager.client() as client:
        client.request({"command": "delete", "id": "twins", "force": True})


def test_delete_twice_succeeds(manager):
    with manager.client() as client:
        client.request({"command": "run", "id": "gone", "argv": ["true"]})
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "gone"}).container.state
            == ContainerState.EXITED,
            10,
        )
        first = client.request({"command": "delete", "id": "gone"})
        second = client.request({"command": "delete", "id": "gone"})
        assert first.container.state == ContainerState.DELETED
        assert second.container.state == ContainerState.DELETED


def test_manager_sigkill_kills_no_workload(manager):
    count = 20
    with manager.client() as client:
        pids = {}
        for number in range(count):
            reply = client.request({"command": "run", "id": f"keep{number}", "argv": ["sleep", "infinity"]})
            pids[reply.container.id] = reply.container.pid

    manager.kill()
    time.sleep(2)
    manager.start()
    time.sleep(3)  # several heartbeat intervals after the restart

    with manager.client() as client:
        listed = {info.id: info for info in client.request({"command": "list"}).containers}
        for container_id, pid in pids.items():
            assert listed[container_id].state == ContainerState.RUNNING, container_id
            assert listed[container_id].pid == pid
            assert pid_alive(pid), container_id
        assert len(manager.assistant_pids()) == count


def test_events_published_once_across_restart(manager):
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.#")
        for number in range(5):
            client.request({"command": "run", "id": f"ev{number}", "argv": ["sleep", "infinity"]})
        manager.kill()
        manager.start()
        for number in range(5):
            client.request({"command": "stop", "id": f"ev{number}", "grace": 5})
        received = drain_events(events)

    ids = [event.event_id for event in received]
    assert len(ids) == len(set(ids)), "an event was published twice"
    for number in range(5):
        names_seen = [event.event for event in received if event.container_id == f"ev{number}"]
        assert names_seen == ["created", "starting", "running", "stopping", "exited"]


def test_exit_while_manager_down_is_kept(manager):
    with manager.client() as client:
        reply = client.request(
            {"command": "run", "id": "quitter", "argv": ["sh", "-c", "sleep 1; exit 5"]}
        )
    manager.kill()
    assert wait_until(lambda: not pid_alive(reply.container.pid), 10)

    manager.start()
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.quitter.exited")
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "quitter"}).container.state
            == ContainerState.EXITED,
            15,
        )
        exit = client.request({"command": "inspect", "id": "quitter"}).container.exit
        assert exit.exit_code == 5
        assert exit.reason == ExitReason.EXITED
        # The exited event was published by the restarted manager's outbox,
        # possibly before this subscription existed: check the stored state
        # above, and that the assistant has gone now that the exit is acked.
        drain_events(events, quiet=0.5)
    assert wait_until(lambda: manager.assistant_pids() == [], 10)


def test_unknown_id_gets_retry_later_during_window(amqp_url, run_prefix, tmp_path):
    manager_id = f"{run_prefix}-{uuid.uuid4().hex[:6]}"
    first = ManagerProcess(amqp_url, manager_id, tmp_path / "first")
    second = ManagerProcess(amqp_url, manager_id, tmp_path / "second", adopt_window=4.0)
    try:
        first.start()
        with first.client() as client:
            pid = client.request(
                {"command": "run", "id": "patient", "argv": ["sleep", "infinity"], "heartbeat_timeout": 8}
            ).container.pid
        first.kill()
        second.start()  # empty state: it does not know "patient"
        time.sleep(2.5)
        assert pid_alive(pid), "killed inside the adopt window"
        assert wait_until(lambda: not pid_alive(pid), 10)
        log = (first.containers_dir / "patient" / "assistant.log").read_text()
        assert "manager is not ready for it yet" in log
        assert "manager_nack" in log
    finally:
        second.cleanup()
        first.cleanup()


def test_stale_epoch_nack_is_ignored(tmp_path):
    config = AssistantConfig(
        manager_id="m",
        container_id="c",
        token="t1",
        container_dir=tmp_path,
        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",
        runc_root=tmp_path / "runc",
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
    )
    supervisor = Supervisor(config)

    def reply(verdict: Verdict, epoch: int) -> None:
        body = HeartbeatReply(verdict=verdict, epoch=epoch).model_dump_json().encode()
        supervisor._on_reply(None, None, None, body)

    reply(Verdict.ACK, 3)
    assert supervisor.epoch == 3
    reply(Verdict.NACK, 2)
    assert supervisor.nacked is False
    before = supervisor.last_reply
    reply(Verdict.RETRY_LATER, 3)
    assert supervisor.last_reply == before
    reply(Verdict.NACK, 3)
    assert supervisor.nacked is True


def test_broker_restart_kills_nothing(rabbitmq_node, amqp_url, run_prefix, tmp_path):
    manager = new_manager(amqp_url, run_prefix, tmp_path / "manager", heartbeat_timeout=15.0)
    manager.start()
    try:
        with manager.client() as client:
            pids = [
                client.request(
                    {"command": "run", "id": f"calm{number}", "argv": ["sleep", "infinity"]}
                ).container.pid
                for number in range(20)
            ]
        rabbitmq_node.ctl("stop_app")
        time.sleep(3)
        rabbitmq_node.ctl("start_app")

        # Every party reconnects; a command now works again end to end.
        with Client(amqp_url, manager.manager_id, timeout=60) as client:
            events = client.subscribe(f"{manager.manager_id}.calm0.*")
            assert wait_until(lambda: _answers(client), 30)
            time.sleep(5)
            assert all(pid_alive(pid) for pid in pids)
            listed = client.request({"command": "list"}).containers
            assert {info.state for info in listed} == {ContainerState.RUNNING}
            client.request({"command": "stop", "id": "calm0", "grace": 5})
            # During the outage no heartbeat arrived, so the containers may
            # have been lost and found again; none exited before the stop.
            seen = [event.event for event in drain_events(events)]
            assert seen[-2:] == ["stopping", "exited"]
            assert "exited" not in seen[:-2]
    finally:
        manager.cleanup()


def _answers(client: Client) -> bool:
    try:
        return client.send({"command": "list"}, timeout=3).ok
    except Exception:
        return False


def test_cut_connections_recover(amqp_url, run_prefix, tmp_path):
    target = pika.URLParameters(amqp_url)
    proxy = TcpProxy(target.host, target.port)
    manager = new_manager(proxy.url(), run_prefix, tmp_path / "manager", heartbeat_timeout=15.0)
    try:
        manager.start()
        with Client(amqp_url, manager.manager_id) as client:
            pid = client.request({"command": "run", "id": "cut", "argv": ["sleep", "infinity"]}).container.pid
            assert proxy.connection_count() >= 2  # the manager and the assistant

            assert proxy.cut() >= 2
            assert wait_until(lambda: _answers(client), 30)
            assert wait_until(lambda: proxy.connection_count() >= 2, 15)
            time.sleep(3)
            assert pid_alive(pid)
            info = client.request({"command": "inspect", "id": "cut"}).container
            assert info.state == ContainerState.RUNNING
            stopped = client.request({"command": "stop", "id": "cut", "grace": 5})
            assert stopped.container.exit.reason == ExitReason.STOPPED
    finally:
        manager.cleanup()
        proxy.close()


def _events_of(subscription, container_id: str, quiet: float = 3.0) -> list[str]:
    return [event.event for event in drain_events(subscription, quiet) if event.container_id == container_id]


@pytest.mark.parametrize("durable", [False, True], ids=["private-queue", "named-queue"])
def test_subscription_survives_outage(amqp_url, manager, durable):
    """A subscriber binds again after its connection is lost; a named queue also keeps
    the events published while it was away."""
    target = pika.URLParameters(amqp_url)
    proxy = TcpProxy(target.host, target.port)
    queue = f"events-{manager.manager_id}" if durable else None
    try:
        with Client(proxy.url(), manager.manager_id) as watcher, manager.client() as client:
            subscription = watcher.subscribe(f"{manager.manager_id}.#", queue=queue)
            client.request({"command": "create", "id": "before", "argv": ["true"]})
            assert _events_of(subscription, "before") == ["created"]

            proxy.refuse = True
            assert proxy.cut() == 1
            client.request({"command": "create", "id": "during", "argv": ["true"]})
            proxy.refuse = False

            client.request({"command": "create", "id": "after", "argv": ["true"]})
            seen = drain_events(subscription, 5.0)
            # The reconnect happens inside get(): the "after" event can only be
            # delivered once the queue is bound again.
            seen += drain_events(subscription, 3.0)
            by_container = {event.container_id for event in seen}
            if durable:
                assert {"during", "after"} <= by_container
            else:
                assert "during" not in by_container
                client.request({"command": "create", "id": "later", "argv": ["true"]})
                assert _events_of(subscription, "later") == ["created"]
            subscription.close()
    finally:
        proxy.close()
        if durable:
            with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
                connection.channel().queue_delete(queue)


def test_named_queue_redelivers_unfinished_event(amqp_url, manager):
    """An event returned but not followed by another get() or close() comes back."""
    queue = f"events-{manager.manager_id}-redeliver"
    try:
        with manager.client() as client:
            client.subscribe(f"{manager.manager_id}.#", queue=queue).close()  # binds the queue
            for container_id in ("r1", "r2"):
                client.request({"command": "create", "id": container_id, "argv": ["true"]})
        with manager.client() as reader:
            first = reader.subscribe(f"{manager.manager_id}.#", queue=queue).get(10)
            assert first.container_id == "r1"
            # The reader ends without asking for more: r1 is not acknowledged.
        with manager.client() as reader:
            subscription = reader.subscribe(f"{manager.manager_id}.#", queue=queue)
            again = subscription.get(10)
            assert again.event_id == first.event_id
            assert subscription.get(10).container_id == "r2"
            subscription.close()
        with manager.client() as reader:
            assert reader.subscribe(f"{manager.manager_id}.#", queue=queue).get(2) is None
    finally:
        with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
            connection.channel().queue_delete(queue)


def test_subscription_fails_cleanly_when_broker_stays_away(amqp_url, manager):
    target = pika.URLParameters(amqp_url)
    proxy = TcpProxy(target.host, target.port)
    try:
        with Client(proxy.url(), manager.manager_id, reconnect_timeout=2.0) as watcher:
            subscription = watcher.subscribe(f"{manager.manager_id}.#")
            proxy.refuse = True
            assert proxy.cut() == 1
            with pytest.raises(BrokerUnavailable, match="check that the broker"):
                subscription.get(30)
    finally:
        proxy.close()


def test_client_wrong_password_names_fix(amqp_url):
    parts = urllib.parse.urlsplit(amqp_url)
    wrong = parts._replace(netloc=f"{parts.username}:not-the-password@{parts.hostname}:{parts.port}")
    with pytest.raises(BrokerUnavailable, match="rejected the login") as raised:
        Client(urllib.parse.urlunsplit(wrong), "nobody")
    assert "check the user, password and vhost" in str(raised.value)
    assert "not-the-password" not in str(raised.value)


def test_poison_command_dead_lettered(amqp_url, run_prefix, tmp_path):
    manager = new_manager(
        amqp_url, run_prefix, tmp_path / "manager", environment={"BERTH_CRASH_ON_CREATE": "poison"}
    )
    manager.start()
    replies = []
    sender = threading.Thread(
        target=lambda: replies.append(
            Client(amqp_url, manager.manager_id).send(
                {"command": "create", "id": "poison", "argv": ["true"]}, timeout=90
            )
        )
    )
    try:
        sender.start()
        # Each delivery ends the manager; start it again until it gives up.
        for _ in range(5):
            if not sender.is_alive():
                break
            manager.process.wait(30)
            assert manager.process.returncode == 70
            manager.launch()
            wait_until(lambda: not sender.is_alive() or manager.process.poll() is not None, 15)
        sender.join(30)
        assert replies and replies[0].error.code == ErrorCode.INTERNAL
        assert "dead-letter" in replies[0].error.message
        manager.wait_ready(30)  # it survived the last delivery

        with manager.client() as client:
            served = client.request({"command": "run", "id": "healthy", "argv": ["true"]})
            assert served.ok
            channel = client._connection.channel()
            queue = channel.queue_declare(names.command_queue(manager.manager_id), passive=True)
            assert queue.method.message_count == 0
            channel.close()
    finally:
        manager.cleanup()


def test_deleted_command_queue_is_redeclared(manager):
    with manager.client() as client:
        channel = client._connection.channel()
        channel.queue_delete(names.command_queue(manager.manager_id))
        channel.close()
        assert wait_until(lambda: _answers(client), 30)
    assert "cancelled the consumer" in manager.log_path.read_text()


def _heartbeat_after(client: Client, container_id: str, moment) -> bool:
    info = client.request({"command": "inspect", "id": container_id}).container
    return info.last_heartbeat_at is not None and info.last_heartbeat_at > moment


def _assert_beats_resume(client: Client, pid: int) -> None:
    """Check that container "beats" is answered again and still running, then delete it."""
    assert wait_until(lambda: _answers(client), 30)
    recovered = utc_now()
    assert wait_until(lambda: _heartbeat_after(client, "beats", recovered), 15)
    info = client.request({"command": "inspect", "id": "beats"}).container
    assert info.state == ContainerState.RUNNING
    assert pid_alive(pid)
    client.request({"command": "delete", "id": "beats", "force": True})


def test_deleted_heartbeat_queue_is_redeclared(manager):
    queue = names.heartbeat_queue(manager.manager_id)
    with manager.client() as client:
        pid = client.request({"command": "run", "id": "beats", "argv": ["sleep", "infinity"]}).container.pid
        channel = client._connection.channel()
        channel.queue_delete(queue)
        channel.close()
        assert wait_until(lambda: f"cancelled the consumer of {queue}" in manager.log_path.read_text(), 15)
        _assert_beats_resume(client, pid)


def _connection_pid(rabbitmq_node, name: str) -> str | None:
    """Return the broker's pid of the client connection named ``name``, if there is one."""
    listed = rabbitmq_node.ctl(
        "--quiet", "list_connections", "--no-table-headers", "pid", "client_properties"
    )
    for line in listed.stdout.splitlines():
        pid, _, properties = line.partition("\t")
        # The properties are an Erlang list, and the name is a quoted string in it.
        if f'"{name}"' in properties:
            return pid
    return None


def test_lost_heartbeat_connection_recovers(rabbitmq_node, amqp_url, run_prefix, tmp_path):
    manager = new_manager(amqp_url, run_prefix, tmp_path / "manager", heartbeat_timeout=15.0)
    manager.start()
    name = f"berth-manager {manager.manager_id} heartbeats"
    try:
        with manager.client() as client:
            pid = client.request({"command": "run", "id": "beats", "argv": ["sleep", "infinity"]}).container.pid
            closed = _connection_pid(rabbitmq_node, name)
            assert closed is not None
            rabbitmq_node.ctl("close_connection", closed, "closed by the test")

            assert wait_until(lambda: "heartbeat connection" in manager.log_path.read_text(), 15)
            assert wait_until(lambda: _connection_pid(rabbitmq_node, name) not in (None, closed), 30)
            _assert_beats_resume(client, pid)
    finally:
        manager.cleanup()


def test_manager_killed_mid_create_leaves_nothing(manager):
    with manager.client() as client:
        # Publish without waiting for the reply, then kill the manager
        # while the create is in progress.
        command = {"command": "create", "id": "half", "argv": ["sleep", "infinity"], "request_id": "req-half"}
        client._channel.basic_publish(
            names.COMMAND_EXCHANGE, manager.manager_id, json.dumps(command).encode()
        )
    time.sleep(0.3)
    manager.kill()
    manager.start()

    with manager.client() as client:
        # Sending the same request again returns the one outcome of the
        # redelivered create: created, or an error with nothing left.
        outcome = client.send(command)
        if outcome.ok:
            assert outcome.container.state == ContainerState.CREATED
            client.request({"command": "delete", "id": "half"})
        assert wait_until(lambda: manager.runc.list_ids() == [], 15)
        assert wait_until(lambda: manager.assistant_pids() == [], 15)
        assert not (manager.containers_dir / "half").exists()


def test_silent_assistant_is_lost_then_found(manager):
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.quiet.*")
        reply = client.request(
            {"command": "run", "id": "quiet", "argv": ["sleep", "infinity"], "heartbeat_timeout": 30}
        )
        assistant = reply.container.assistant_pid
        os.kill(assistant, signal.SIGSTOP)  # no heartbeats, nothing dies
        try:
            assert wait_until(
                lambda: client.request({"command": "inspect", "id": "quiet"}).container.state
                == ContainerState.LOST,
                15,
            )
        finally:
            os.kill(assistant, signal.SIGCONT)
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "quiet"}).container.state
            == ContainerState.RUNNING,
            15,
        )
        assert pid_alive(reply.container.pid)
        seen = [event.event for event in drain_events(events)]
        assert seen == ["created", "starting", "running", "lost", "running"]
        client.request({"command": "delete", "id": "quiet", "force": True})


def test_second_manager_with_same_id_exits(manager, tmp_path):
    twin = ManagerProcess(
        manager.amqp_url,
        manager.manager_id,
        tmp_path / "twin",
        extra_args=("--connect-timeout", "2"),
    )
    process = twin.launch()
    assert process.wait(30) == 1
    assert "another manager with id" in twin.log_path.read_text()
    with manager.client() as client:
        assert client.request({"command": "list"}).ok


def test_manager_rejects_non_amqp_url(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "manager", "--amqp-url", "http://broker.invalid", "--id", "url-check",
         "--state-dir", str(tmp_path / "state"), "--runc-root", str(tmp_path / "runc")],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "'--amqp-url'" in result.stderr
    assert "scheme 'http'" in result.stderr
    assert "is not an AMQP URL" in result.stderr
    assert not (tmp_path / "state").exists()


def test_sigterm_ends_broker_retries(run_prefix, tmp_path):
    """A manager that keeps retrying an unreachable broker still stops on SIGTERM."""
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = new_manager(
        f"amqp://guest:guest@127.0.0.1:{port}/%2F",
        run_prefix,
        tmp_path / "manager",
        extra_args=("--connect-timeout", "0"),
    )
    process = manager.launch()
    try:
        assert wait_until(lambda: "cannot reach broker" in manager.log_tail(), 30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert "stops before reaching the broker" in manager.log_tail()
    finally:
        manager.cleanup()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_assistant_stops_workload(manager, signum):
    with manager.client() as client:
        reply = client.request({"command": "run", "id": "sig", "argv": ["sleep", "infinity"]})
        os.kill(reply.container.assistant_pid, signum)
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "sig"}).container.state
            == ContainerState.EXITED,
            20,
        )
        exit = client.request({"command": "inspect", "id": "sig"}).container.exit
        assert exit.reason == ExitReason.STOPPED
        assert exit.signal == "SIGTERM"
        assert not pid_alive(reply.container.pid)
        assert wait_until(lambda: not pid_alive(reply.container.assistant_pid), 10)
        client.request({"command": "delete", "id": "sig"})


def test_kill_during_long_stop_is_not_blocked(manager):
    stubborn = ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]
    with manager.client() as client:
        client.request({"command": "run", "id": "slow", "argv": stubborn, "init": False})
        stopper = threading.Thread(
            target=lambda: Client(manager.amqp_url, manager.manager_id).send(
                {"command": "stop", "id": "slow", "grace": 60}
            )
        )
        stopper.start()
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "slow"}).container.state
            == ContainerState.STOPPING,
            10,
        )
        started = time.monotonic()
        client.request({"command": "kill", "id": "slow", "signal": "SIGKILL"})
        assert wait_until(
            lambda: client.request({"command": "inspect", "id": "slow"}).container.state
            == ContainerState.EXITED,
            10,
        )
        assert time.monotonic() - started < 30, "the kill waited for the stop's grace"
        stopper.join(30)
        client.request({"command": "delete", "id": "slow"})
