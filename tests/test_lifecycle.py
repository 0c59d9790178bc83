"""Container lifecycles through a real broker, a real manager and real runc."""

import os
import signal
import time
import uuid

import pytest

from assistant.cgroups import cgroup_dirs, cgroup_pids
from assistant.supervisor import has_own_pid_namespace
from manager.bundle import cgroups_path
from messages.client import NoManager
from messages.models import ContainerState, ErrorCode, ExitReason
from tests.helpers import ManagerProcess, pid_alive, wait_until, zombie_children

pytestmark = pytest.mark.root


@pytest.fixture
def manager(amqp_url, run_prefix, tmp_path):
    process = ManagerProcess(amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", tmp_path / "manager")
    process.start()
    yield process
    process.cleanup()


def events_of(subscription, container_id, until, timeout=20.0):
    """Collect events of one container until one named ``until`` arrives."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = subscription.get(deadline - time.monotonic())
        if event is None:
            break
        if event.container_id != container_id:
            continue
        seen.append(event)
        if event.event == until:
            break
    return seen


def assert_nothing_left(manager, container_id):
    assert manager.runc.state(container_id) is None
    assert not (manager.containers_dir / container_id).exists()
    assert cgroup_dirs(cgroups_path(manager.manager_id, container_id)) == []
    assert wait_until(lambda: manager.assistant_pids() == [], 10)


def test_stop_sends_sigterm_then_delete(manager):
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.#")
        reply = client.request({"command": "run", "id": "web", "argv": ["sleep", "infinity"]})
        assert reply.container.state == ContainerState.RUNNING
        assert pid_alive(reply.container.pid)

        stopped = client.request({"command": "stop", "id": "web", "grace": 10})
        assert stopped.container.state == ContainerState.EXITED
        assert stopped.container.exit.signal == "SIGTERM"
        assert stopped.container.exit.exit_code == 128 + signal.SIGTERM
        assert stopped.container.exit.reason == ExitReason.STOPPED
        assert not pid_alive(reply.container.pid)

        client.request({"command": "delete", "id": "web"})
        names = [event.event for event in events_of(events, "web", until="deleted")]
        assert names == ["created", "starting", "running", "stopping", "exited", "deleted"]
    assert_nothing_left(manager, "web")


def test_event_sequence_numbers_have_no_gaps(manager):
    with manager.client() as client:
        events = client.subscribe(f"{manager.manager_id}.seq.*")
        client.request({"command": "run", "id": "seq", "argv": ["true"]})
        received = events_of(events, "seq", until="exited")
        assert [event.sequence for event in received] == list(range(1, len(received) + 1))
        assert all(event.manager_id == manager.manager_id for event in received)
        client.request({"command": "delete", "id": "seq"})


def test_exit_code_and_both_log_streams(manager):
    with manager.client() as client:
        client.request(
            {
                "command": "run",
                "id": "exit3",
                "argv": ["sh", "-c", "echo out; echo err >&2; exit 3"],
            }
        )
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": "exit3"}).container.state
                == ContainerState.EXITED
            ),
            10,
        )
        info = client.request({"command": "inspect", "id": "exit3"}).container
        assert info.exit.exit_code == 3
        assert info.exit.signal is None
        assert info.exit.reason == ExitReason.EXITED

        logs = client.request({"command": "logs", "id": "exit3"}).logs
        assert {(line.stream, line.line) for line in logs} == {("stdout", "out"), ("stderr", "err")}
        tail = client.request({"command": "logs", "id": "exit3", "tail": 1}).logs
        assert len(tail) == 1
        client.request({"command": "delete", "id": "exit3"})
    assert_nothing_left(manager, "exit3")


def test_stop_kills_workload_ignoring_sigterm(manager):
    with manager.client() as client:
        client.request(
            {
                "command": "run",
                "id": "stubborn",
                "argv": ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
            }
        )
        stopped = client.request({"command": "stop", "id": "stubborn", "grace": 1})
        assert stopped.container.exit.signal == "SIGKILL"
        assert stopped.container.exit.exit_code == 128 + signal.SIGKILL
        assert stopped.container.exit.reason == ExitReason.STOPPED
        client.request({"command": "delete", "id": "stubborn"})
    assert_nothing_left(manager, "stubborn")


def test_kill_with_signal(manager):
    with manager.client() as client:
        client.request({"command": "run", "id": "victim", "argv": ["sleep", "infinity"]})
        client.request({"command": "kill", "id": "victim", "signal": "SIGUSR1"})
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": "victim"}).container.state
                == ContainerState.EXITED
            ),
            10,
        )
        exit = client.request({"command": "inspect", "id": "victim"}).container.exit
        assert exit.signal == "SIGUSR1"
        assert exit.reason == ExitReason.KILLED
        client.request({"command": "delete", "id": "victim"})


@pytest.mark.parametrize("init", [True, False])
def test_sigkill_leaves_no_forked_process(manager, init):
    """A SIGKILL through the init's pidfd ends the processes it forked too."""
    container_id = f"forks-{'tini' if init else 'sh'}"
    cgroup = cgroups_path(manager.manager_id, container_id)
    with manager.client() as client:
        client.request(
            {
                "command": "run",
                "id": container_id,
                "argv": ["sh", "-c", "sleep infinity & sleep infinity & wait"],
                "init": init,
            }
        )
        # tini (with init), the shell and its two sleeps
        expected = 4 if init else 3
        assert wait_until(lambda: len(cgroup_pids(cgroup)) == expected, 10)
        pids = cgroup_pids(cgroup)

        client.request({"command": "kill", "id": container_id, "signal": "SIGKILL"})
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": container_id}).container.state
                == ContainerState.EXITED
            ),
            10,
        )
        exit = client.request({"command": "inspect", "id": container_id}).container.exit
        assert exit.signal == "SIGKILL"
        assert exit.reason == ExitReason.KILLED
        for pid in pids:
            assert not pid_alive(pid), f"process {pid} of {container_id} survived"
        client.request({"command": "delete", "id": container_id})
    assert_nothing_left(manager, container_id)


def test_exit_report_then_runc_state_removed(manager):
    """The assistant removes the runc state and writes exit.json after its report, before it ends."""
    with manager.client() as client:
        client.request({"command": "run", "id": "brief", "argv": ["sh", "-c", "exit 7"]})
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": "brief"}).container.state
                == ContainerState.EXITED
            ),
            10,
        )
        assert wait_until(lambda: manager.assistant_pids() == [], 10)
        assert manager.runc.state("brief") is None
        record = (manager.containers_dir / "brief" / "exit.json").read_text()
        assert '"exit_code":7' in record
        assert client.request({"command": "inspect", "id": "brief"}).container.exit.exit_code == 7
        client.request({"command": "delete", "id": "brief"})
    assert_nothing_left(manager, "brief")


def test_delete_right_after_stop_leaves_nothing(manager):
    """A delete waits for the assistant, which still writes exit.json after its report."""
    with manager.client() as client:
        for number in range(5):
            container_id = f"quick-{number}"
            client.request({"command": "run", "id": container_id, "argv": ["sleep", "infinity"]})
            client.request({"command": "stop", "id": container_id, "grace": 10})
            client.request({"command": "delete", "id": container_id})
            assert_nothing_left(manager, container_id)


def test_illegal_transitions_name_state_or_id(manager):
    with manager.client() as client:
        client.request({"command": "run", "id": "busy", "argv": ["sleep", "infinity"]})

        again = client.send({"command": "start", "id": "busy"})
        assert again.error.code == ErrorCode.CONFLICT
        assert "running" in again.error.message

        delete = client.send({"command": "delete", "id": "busy"})
        assert delete.error.code == ErrorCode.CONFLICT
        assert "running" in delete.error.message

        duplicate = client.send({"command": "create", "id": "busy", "argv": ["true"]})
        assert duplicate.error.code == ErrorCode.CONFLICT

        unknown = client.send({"command": "stop", "id": "ghost"})
        assert unknown.error.code == ErrorCode.NOT_FOUND
        assert "'ghost'" in unknown.error.message

        forced = client.request({"command": "delete", "id": "busy", "force": True})
        assert forced.container.state == ContainerState.DELETED
        # The last container gone, the manager's own cgroups go too.
        assert cgroup_dirs(f"/berth/{manager.manager_id}") == []
        gone = client.send({"command": "inspect", "id": "busy"})
        assert gone.error.code == ErrorCode.NOT_FOUND
    assert_nothing_left(manager, "busy")


def test_create_then_start_and_delete_created(manager):
    with manager.client() as client:
        created = client.request(
            {"command": "create", "id": "later", "argv": ["sleep", "infinity"]}
        )
        assert created.container.state == ContainerState.CREATED
        started = client.request({"command": "start", "id": "later"})
        assert started.container.state == ContainerState.RUNNING

        client.request({"command": "create", "id": "never", "argv": ["sleep", "infinity"]})
        client.request({"command": "delete", "id": "never"})
        client.request({"command": "delete", "id": "later", "force": True})
    assert_nothing_left(manager, "later")
    assert_nothing_left(manager, "never")


def test_failed_creates_report_runc_error_and_leave_nothing(manager):
    # runc cannot create a missing working directory below the read-only
    # /usr of the default root, so create fails inside runc itself.
    runc_rejects = {
        "command": "create",
        "id": "broken",
        "argv": ["true"],
        "cwd": "/usr/berth-no-such-dir",
    }
    with manager.client() as client:
        for attempt in range(5):
            reply = client.send(runc_rejects)
            assert reply.error.code == ErrorCode.CREATE_FAILED
            assert "read-only file system" in reply.error.message
            assert_nothing_left(manager, "broken")
        for init in (True, False):
            missing = client.send(
                {"command": "create", "id": "broken", "argv": ["/no/such/binary"], "init": init}
            )
            assert missing.error.code == ErrorCode.INVALID_ARGUMENT
            assert "'/no/such/binary' not found" in missing.error.message
            assert_nothing_left(manager, "broken")
        missing_root = client.send(
            {"command": "create", "id": "noroot", "argv": ["true"], "rootfs": "/no/such/root"}
        )
        assert missing_root.error.code == ErrorCode.INVALID_ARGUMENT
        assert "/no/such/root" in missing_root.error.message
        assert client.request({"command": "list", "all": True}).containers == []


def test_exit_codes_never_lost_to_reaping_races(manager):
    with manager.client() as client:
        for number in range(30):
            container_id = f"seven{number}"
            client.request({"command": "run", "id": container_id, "argv": ["sh", "-c", "exit 7"]})
            assert wait_until(
                lambda: (
                    client.request({"command": "inspect", "id": container_id}).container.state
                    == ContainerState.EXITED
                ),
                10,
            )
            exit = client.request({"command": "inspect", "id": container_id}).container.exit
            assert exit.exit_code == 7, container_id
            client.request({"command": "delete", "id": container_id})
    # The manager reaps ended assistants on its periodic check.
    assert wait_until(lambda: zombie_children(manager.process.pid) == [], 5)


def test_memory_limit_sets_oom_flag(manager):
    hog = "b = bytearray(512 * 1024 * 1024); print(len(b))"
    with manager.client() as client:
        client.request(
            {
                "command": "run",
                "id": "hog",
                "argv": ["python3", "-c", hog],
                "limits": {"memory_bytes": 32 * 1024 * 1024, "pids": 64, "cpus": 0.5},
            }
        )
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": "hog"}).container.state
                == ContainerState.EXITED
            ),
            20,
        )
        exit = client.request({"command": "inspect", "id": "hog"}).container.exit
        assert exit.oom_killed is True
        assert exit.reason == ExitReason.OOM
        assert exit.exit_code == 128 + signal.SIGKILL
        client.request({"command": "delete", "id": "hog"})
    assert_nothing_left(manager, "hog")


def test_malformed_commands_get_errors_and_next_is_served(manager):
    cases = [
        (b"{not json", ErrorCode.BAD_REQUEST),
        (b'{"command": "explode", "id": "x"}', ErrorCode.BAD_REQUEST),
        (b'{"command": "create", "id": "x", "argv": 5}', ErrorCode.INVALID_ARGUMENT),
        (b'{"command": "create", "id": "../etc", "argv": ["true"]}', ErrorCode.INVALID_ARGUMENT),
        (b'{"command": "list", "schema_version": 9}', ErrorCode.UNSUPPORTED_VERSION),
        (b"[1, 2]", ErrorCode.BAD_REQUEST),
        (b" " * (2 * 1024 * 1024), ErrorCode.BAD_REQUEST),
    ]
    with manager.client() as client:
        for body, code in cases:
            reply = client.send_raw(body, correlation_id=uuid.uuid4().hex, timeout=10)
            assert reply.ok is False
            assert reply.error.code == code, body[:40]
        served = client.request({"command": "run", "id": "after", "argv": ["true"]})
        assert served.ok
        client.request({"command": "list"})

        # Rejected commands are dead-lettered, not requeued: the command
        # queue is empty again.
        channel = client._connection.channel()
        queue = channel.queue_declare(f"berth.commands.{manager.manager_id}", passive=True)
        assert queue.method.message_count == 0
        channel.close()


def test_command_to_unserved_manager_fails_fast(manager):
    with manager.client() as client:
        started = time.monotonic()
        with pytest.raises(NoManager, match="no-such-host"):
            client.send({"command": "list"}, manager_id="no-such-host", timeout=30)
        # Far below the reply timeout: the broker returned the message.
        assert time.monotonic() - started < 10


def test_forgotten_container_is_killed_on_nack(amqp_url, run_prefix, tmp_path):
    manager_id = f"{run_prefix}-{uuid.uuid4().hex[:6]}"
    first = ManagerProcess(amqp_url, manager_id, tmp_path / "first", heartbeat_interval=0.5)
    first.start()
    second = ManagerProcess(amqp_url, manager_id, tmp_path / "second", heartbeat_interval=0.5)
    try:
        with first.client() as client:
            pid = client.request(
                {"command": "run", "id": "orphan", "argv": ["sleep", "infinity"]}
            ).container.pid
        first.kill()
        assert pid_alive(pid)

        second.start()  # same id, empty state: it has never heard of "orphan"
        assert wait_until(lambda: not pid_alive(pid), 10)
        assert wait_until(lambda: first.assistant_pids() == [], 10)
        assistant_log = (first.containers_dir / "orphan" / "assistant.log").read_text()
        assert "does not know this container" in assistant_log
        assert "manager_nack" in assistant_log
        assert first.runc.state("orphan") is None
    finally:
        second.cleanup()
        first.cleanup()


def test_workload_dies_at_heartbeat_timeout_without_manager(manager):
    with manager.client() as client:
        reply = client.request(
            {"command": "run", "id": "alone", "argv": ["sleep", "infinity"], "heartbeat_timeout": 3}
        )
    pid = reply.container.pid
    manager.kill()
    killed_at = time.monotonic()

    time.sleep(1)
    assert pid_alive(pid), "killed before the heartbeat timeout"
    assert wait_until(lambda: not pid_alive(pid), 10)
    # The assistant counts the timeout from its last reply, which came up to
    # one heartbeat interval before the kill.
    assert time.monotonic() - killed_at >= 3 - manager.heartbeat_interval
    assert cgroup_pids(cgroups_path(manager.manager_id, "alone")) == []
    # The assistant writes exit.json and removes the runc state after it
    # reports the exit, so both can lag the workload's death.
    assert wait_until(lambda: manager.runc.state("alone") is None, 10)
    record = (manager.containers_dir / "alone" / "exit.json").read_text()
    assert '"manager_unreachable"' in record
    assert '"exit_code":137' in record


def test_zero_heartbeat_timeout_never_self_kills(manager):
    with manager.client() as client:
        reply = client.request(
            {
                "command": "run",
                "id": "forever",
                "argv": ["sleep", "infinity"],
                "heartbeat_timeout": 0,
            }
        )
    manager.kill()
    time.sleep(3)
    assert pid_alive(reply.container.pid)


def test_killed_assistant_ends_container_with_unknown_code(manager):
    with manager.client() as client:
        reply = client.request({"command": "run", "id": "shim", "argv": ["sleep", "infinity"]})
        os.kill(reply.container.assistant_pid, signal.SIGKILL)
        assert wait_until(
            lambda: (
                client.request({"command": "inspect", "id": "shim"}).container.state
                == ContainerState.EXITED
            ),
            10,
        )
        exit = client.request({"command": "inspect", "id": "shim"}).container.exit
        assert exit.exit_code is None
        assert exit.reason == ExitReason.ASSISTANT_LOST
        assert not pid_alive(reply.container.pid)
        client.request({"command": "delete", "id": "shim"})
    assert_nothing_left(manager, "shim")
    # The manager reaps ended assistants on its periodic check.
    assert wait_until(lambda: zombie_children(manager.process.pid) == [], 5)


def test_manager_restart_keeps_containers_running(manager):
    with manager.client() as client:
        reply = client.request({"command": "run", "id": "steady", "argv": ["sleep", "infinity"]})
    manager.kill()
    time.sleep(1)
    manager.start()
    with manager.client() as client:
        time.sleep(2)
        info = client.request({"command": "inspect", "id": "steady"}).container
        assert info.state == ContainerState.RUNNING
        assert info.pid == reply.container.pid
        assert pid_alive(info.pid)
        stopped = client.request({"command": "stop", "id": "steady", "grace": 5})
        assert stopped.container.exit.signal == "SIGTERM"
        client.request({"command": "delete", "id": "steady"})
    assert_nothing_left(manager, "steady")


def test_pid_namespace_detection_in_spec():
    """Only a new PID namespace lets a SIGKILL to the init end every process."""
    own = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]}}
    joined = {"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}}
    host = {"linux": {"namespaces": [{"type": "network"}]}}
    assert has_own_pid_namespace(own)
    assert not has_own_pid_namespace(joined)
    assert not has_own_pid_namespace(host)
    assert not has_own_pid_namespace(None)
