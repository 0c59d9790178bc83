"""The assistant fork server: forked assistants, the exec fallback, reaping."""

import uuid
from pathlib import Path

import pytest

from messages.models import ContainerState, ExitReason
from tests.helpers import ManagerProcess, pid_alive, wait_until, zombie_children

pytestmark = pytest.mark.root


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("spawn", ["fork", "exec"])
def test_spawn_modes_run_a_container(amqp_url, run_prefix, tmp_path, spawn):
    manager = ManagerProcess(
        amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", tmp_path / "m", extra_args=("--spawn", spawn)
    )
    manager.start()
    try:
        with manager.client() as client:
            info = client.request({"command": "run", "id": "z", "argv": ["sleep", "infinity"]}).container
            assistant = info.assistant_pid
            assert f"-m assistant {manager.containers_dir / 'z'}" in command_line(assistant)
            if spawn == "fork":
                assert parent_of(assistant) != manager.process.pid
                assert "assistant.zygote" in command_line(parent_of(assistant))
            else:
                assert parent_of(assistant) == manager.process.pid
            stopped = client.request({"command": "stop", "id": "z", "grace": 5})
            assert stopped.container.exit.reason == ExitReason.STOPPED
            client.request({"command": "delete", "id": "z"})
            assert wait_until(lambda: not pid_alive(assistant), 10)
    finally:
        manager.cleanup()


def test_fork_server_outlives_manager_and_reaps(amqp_url, run_prefix, tmp_path):
    manager = ManagerProcess(amqp_url, f"{run_prefix}-{uuid.uuid4().hex[:6]}", tmp_path / "m")
    manager.start()
    try:
        with manager.client() as client:
            info = client.request(
                {"command": "run", "id": "orphaned", "argv": ["sleep", "infinity"], "heartbeat_timeout": 30}
            ).container
        zygote = parent_of(info.assistant_pid)
        manager.kill()
        assert pid_alive(zygote)
        assert pid_alive(info.pid)

        manager.start()  # a new manager adopts the assistant of the old fork server
        with manager.client() as client:
            assert client.request({"command": "inspect", "id": "orphaned"}).container.state == ContainerState.RUNNING
            client.request({"command": "delete", "id": "orphaned", "force": True})
        # The old fork server reaped its assistant and, with no child left, ended.
        assert wait_until(lambda: not pid_alive(info.assistant_pid), 10)
        assert wait_until(lambda: not pid_alive(zygote), 10)
        assert wait_until(lambda: zombie_children(manager.process.pid) == [], 5)
    finally:
        manager.cleanup()
