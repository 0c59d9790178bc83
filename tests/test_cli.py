"""Tests of the ``berth`` command line.

The unit tests run the click commands with CliRunner and replace
``messages.cli.Client`` with a fake, so they need no broker. The last test
runs ``python -m messages.cli`` as a subprocess against a real broker and a
real manager.
"""

import os
import select
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pika.exceptions
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from messages import cli
from messages.client import BrokerUnavailable, CommandFailed, NoManager, ReplyTimeout
from messages.models import (
    ContainerInfo,
    ContainerState,
    ErrorCode,
    Event,
    ExitInfo,
    ExitReason,
    LogLine,
    Reply,
)
from tests.helpers import ManagerProcess

PROJECT_ROOT = Path(__file__).resolve().parent.parent
URL = "amqp://guest:secret@127.0.0.1:5672/%2F"
MANAGER_ID = "host-a"


# --- fakes -------------------------------------------------------------------


class FakeSubscription:
    def __init__(self, events: list[Event]):
        self.events = events

    def __iter__(self):
        return iter(self.events)

    def close(self) -> None:
        pass


class FakeBroker:
    """Fake broker and manager behind ``messages.cli.Client``.

    Each request takes the next item of ``outcomes`` and returns it (a Reply)
    or raises it (an exception). When ``outcomes`` is empty, a request gets an
    ok reply with a container of the command's id.
    """

    def __init__(self) -> None:
        self.outcomes: list[Reply | Exception] = []
        self.events: list[Event] = []
        self.commands: list = []
        self.connections: list[dict] = []
        self.patterns: list[str] = []
        self.event_queues: list[str | None] = []
        self.closed = 0

    def make_client(self, url: str, manager_id: str | None, timeout: float):
        self.connections.append({"url": url, "manager_id": manager_id, "timeout": timeout})
        return FakeClient(self, manager_id)


class FakeClient:
    def __init__(self, broker: FakeBroker, manager_id: str | None):
        self.broker = broker
        self.manager_id = manager_id

    def request(self, command) -> Reply:
        self.broker.commands.append(command)
        if self.broker.outcomes:
            outcome = self.broker.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return Reply(ok=True, container=make_info(getattr(command, "id", "c1")))

    def subscribe(self, pattern: str, queue: str | None = None) -> FakeSubscription:
        self.broker.patterns.append(pattern)
        self.broker.event_queues.append(queue)
        return FakeSubscription(self.broker.events)

    def close(self) -> None:
        self.broker.closed += 1


def make_info(container_id: str = "c1", **changes) -> ContainerInfo:
    fields = {
        "id": container_id,
        "manager_id": MANAGER_ID,
        "state": ContainerState.RUNNING,
        "argv": ["sleep", "60"],
        "heartbeat_timeout": 30.0,
        "created_at": datetime.now(timezone.utc),
        "pid": 4242,
    }
    fields.update(changes)
    return ContainerInfo(**fields)


@pytest.fixture
def broker(monkeypatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(cli, "Client", fake.make_client)
    return fake


@pytest.fixture
def runner() -> CliRunner:
    # The caller's environment must not supply a URL or manager id.
    return CliRunner(env={"BERTH_AMQP_URL": None, "AMQP_URL": None, "BERTH_MANAGER": None})


def berth(runner: CliRunner, *args: str, **options):
    return runner.invoke(cli.cli, ["--url", URL, "--manager", MANAGER_ID, *args], **options)


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "berth: error: " in result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


# --- sizes and KEY=VALUE pairs -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4194304", 4194304),
        ("512k", 512 * 1024),
        ("64m", 64 * 1024**2),
        ("64M", 64 * 1024**2),
        ("64mb", 64 * 1024**2),
        ("64MiB", 64 * 1024**2),
        ("1g", 1024**3),
        ("1.5g", 1536 * 1024**2),
        ("2t", 2 * 1024**4),
        ("100b", 100),
        ("1.3k", 1331),  # 1331.2 bytes, rounded down
    ],
)
def test_parse_size_units(text, expected):
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["12q", "", "m", "-1m", "1.2.3g", "64 m", "0x10", "1e3", "64ib"])
def test_parse_size_rejects_invalid(text):
    with pytest.raises(ValueError, match="not a valid size"):
        cli.parse_size(text)


def test_parse_pairs_splits_at_first_equals():
    pairs = cli.parse_pairs(["A=1", "B=x=y", "EMPTY=", "A=2"])
    assert pairs == {"A": "2", "B": "x=y", "EMPTY": ""}


@pytest.mark.parametrize(
    ("item", "message"),
    [("NOEQUALS", "'NOEQUALS' is not in the form KEY=VALUE"), ("=x", "'=x' has an empty key")],
)
def test_parse_pairs_rejects_item(item, message):
    with pytest.raises(ValueError, match=message):
        cli.parse_pairs(["A=1", item])


# --- run and create ------------------------------------------------------------


def test_run_sends_every_option(runner, broker):
    result = berth(
        runner,
        "run", "web",
        "--env", "A=1", "-e", "B=two=2",
        "--cwd", "/srv",
        "--rootfs", "/var/lib/roots/web",
        "--hostname", "web-1",
        "--memory", "64m",
        "--cpus", "0.5",
        "--pids", "32",
        "--label", "app=web", "-l", "tier=front",
        "--heartbeat-timeout", "0",
        "--", "sh", "-c", "echo hi",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert result.stdout == "web\n"
    [command] = broker.commands
    assert command.command == "run"
    assert command.id == "web"
    assert command.argv == ["sh", "-c", "echo hi"]
    assert command.env == {"A": "1", "B": "two=2"}
    assert command.cwd == "/srv"
    assert command.rootfs == "/var/lib/roots/web"
    assert command.hostname == "web-1"
    assert command.limits.memory_bytes == 64 * 1024**2
    assert command.limits.cpus == 0.5
    assert command.limits.pids == 32
    assert command.labels == {"app": "web", "tier": "front"}
    assert command.heartbeat_timeout == 0
    assert broker.connections == [
        {"url": URL, "manager_id": MANAGER_ID, "timeout": cli.DEFAULT_TIMEOUT}
    ]
    assert broker.closed == 1


def test_create_leaves_model_defaults(runner, broker):
    result = berth(runner, "create", "job", "--", "true")

    assert result.exit_code == 0, result.output
    [command] = broker.commands
    assert command.command == "create"
    assert command.argv == ["true"]
    assert command.cwd == "/"
    assert command.rootfs is None
    assert command.heartbeat_timeout is None
    assert command.limits.memory_bytes is None


def test_memory_invalid_unit_names_value(runner, broker):
    result = berth(runner, "run", "web", "--memory", "12q", "--", "true")

    assert_usage_error(result, "'--memory'", "'12q'", "64m or 1g")
    assert broker.commands == []


def test_env_without_equals_names_value(runner, broker):
    result = berth(runner, "run", "web", "--env", "NOEQUALS", "--", "true")

    assert_usage_error(result, "'--env'", "'NOEQUALS'", "KEY=VALUE")
    assert broker.commands == []


def test_label_with_empty_key_names_value(runner, broker):
    result = berth(runner, "create", "web", "--label", "=front", "--", "true")

    assert_usage_error(result, "'--label'", "'=front'", "KEY=VALUE")


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--memory", "1m"], ["'--memory'", "1048576", "4194304"]),
        (["--memory", "99999999999t"], ["'--memory'", "9223372036854775807"]),
        (["--cwd", "srv"], ["'--cwd'", "'srv'"]),
        (["--cpus", "0"], ["'--cpus'", "greater than 0"]),
        (["--pids", "0"], ["'--pids'"]),
        (["--hostname", "a b"], ["'--hostname'", "'a b'"]),
        (["--heartbeat-timeout", "-1"], ["'--heartbeat-timeout'", "-1.0"]),
    ],
)
def test_values_rejected_by_model_name_option(runner, broker, arguments, fragments):
    result = berth(runner, "run", "web", *arguments, "--", "true")

    assert_usage_error(result, *fragments)
    assert broker.commands == []


def test_invalid_container_id_names_rule(runner, broker):
    result = berth(runner, "run", "web.1", "--", "true")

    assert_usage_error(result, "'web.1'", "not a valid container id")
    assert broker.commands == []


def test_run_without_command_is_usage_error(runner, broker):
    result = berth(runner, "run", "web")

    assert_usage_error(result, "COMMAND")
    assert broker.commands == []


# --- start, stop, kill, rm -------------------------------------------------------


def test_start_sends_id(runner, broker):
    result = berth(runner, "start", "web")

    assert result.exit_code == 0, result.output
    assert broker.commands[0].command == "start"
    assert broker.commands[0].id == "web"


def test_stop_grace_default_and_option(runner, broker):
    assert berth(runner, "stop", "web").exit_code == 0
    assert berth(runner, "stop", "web", "-t", "2.5").exit_code == 0

    assert [command.grace for command in broker.commands] == [10.0, 2.5]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ([], "SIGKILL"),
        (["-s", "term"], "SIGTERM"),
        (["--signal", "9"], "SIGKILL"),
        (["-s", "SIGHUP"], "SIGHUP"),
    ],
)
def test_kill_normalizes_signal(runner, broker, arguments, expected):
    result = berth(runner, "kill", "web", *arguments)

    assert result.exit_code == 0, result.output
    assert broker.commands[0].signal == expected


def test_kill_unknown_signal_names_value(runner, broker):
    result = berth(runner, "kill", "web", "-s", "NOPE")

    assert_usage_error(result, "'--signal'", "'NOPE'")
    assert broker.commands == []


def test_rm_sends_delete(runner, broker):
    assert berth(runner, "rm", "web").exit_code == 0
    assert berth(runner, "rm", "-f", "web").exit_code == 0

    assert [command.command for command in broker.commands] == ["delete", "delete"]
    assert [command.force for command in broker.commands] == [False, True]


# --- ps, inspect, logs --------------------------------------------------------------


def test_ps_sends_filters(runner, broker):
    broker.outcomes = [Reply(ok=True, containers=[])]

    result = berth(runner, "ps", "-a", "--state", "EXITED", "-l", "app=web", "-l", "tier=front")

    assert result.exit_code == 0, result.output
    [command] = broker.commands
    assert command.command == "list"
    assert command.all is True
    assert command.state == ContainerState.EXITED
    assert command.labels == {"app": "web", "tier": "front"}
    assert result.stdout == "ID  STATE  PID  EXIT  CREATED  COMMAND\n"


def test_ps_table_columns(runner, broker):
    now = datetime.now(timezone.utc)
    long_argv = ["sh", "-c", "while true; do echo a rather long line of output; sleep 1; done"]
    containers = [
        make_info("web", created_at=now - timedelta(seconds=5)),
        make_info(
            "batch-job",
            state=ContainerState.EXITED,
            argv=long_argv,
            created_at=now - timedelta(hours=3),
            exit=ExitInfo(exit_code=4, reason=ExitReason.EXITED),
        ),
        make_info(
            "gone",
            state=ContainerState.EXITED,
            created_at=now - timedelta(days=3),
            exit=ExitInfo(exit_code=None, reason=ExitReason.ASSISTANT_LOST),
        ),
    ]
    broker.outcomes = [Reply(ok=True, containers=containers)]

    result = berth(runner, "ps")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "PID", "EXIT", "CREATED", "COMMAND"]
    assert lines[1].split()[:5] == ["web", "running", "4242", "-", "5s"]
    assert lines[2].split()[:5] == ["batch-job", "exited", "-", "4", "3h"]
    assert lines[3].split()[:5] == ["gone", "exited", "-", "?", "3d"]
    # Every column starts at the same offset in every line.
    for title in ["STATE", "PID", "EXIT", "CREATED", "COMMAND"]:
        column = lines[0].index(title)
        for line in lines[1:]:
            assert line[column - 2 : column] == "  ", (title, line)
            assert line[column] != " ", (title, line)
    assert lines[2].endswith("...")
    assert len(lines[2]) - lines[0].index("COMMAND") == cli.COMMAND_WIDTH


def test_ps_no_trunc_shows_whole_command(runner, broker):
    argv = ["sh", "-c", "x" * 100]
    broker.outcomes = [Reply(ok=True, containers=[make_info("web", argv=argv)])]

    result = berth(runner, "ps", "--no-trunc")

    assert result.stdout.splitlines()[1].endswith("x" * 100)


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (timedelta(seconds=-3), "0s ago"),
        (timedelta(seconds=5), "5s ago"),
        (timedelta(minutes=3, seconds=59), "3m ago"),
        (timedelta(hours=47), "47h ago"),
        (timedelta(days=4, hours=1), "4d ago"),
    ],
)
def test_format_age(age, expected):
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    assert cli.format_age(now - age, now) == expected


def test_json_option_before_or_after_command(runner, broker):
    reply = Reply(ok=True, containers=[make_info("web")])
    broker.outcomes = [reply, reply]

    before = berth(runner, "--json", "ps")
    after = berth(runner, "ps", "--json")

    for result in (before, after):
        assert result.exit_code == 0, result.output
        assert Reply.model_validate_json(result.stdout) == reply


def test_inspect_prints_indented_container(runner, broker):
    info = make_info("web", labels={"app": "web"})
    broker.outcomes = [Reply(ok=True, container=info)]

    result = berth(runner, "inspect", "web")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith('{\n  "id": "web",')
    assert ContainerInfo.model_validate_json(result.stdout) == info


def test_logs_splits_streams(runner, broker):
    now = datetime.now(timezone.utc)
    lines = [
        LogLine(stream="stdout", time=now, line="hello"),
        LogLine(stream="stderr", time=now, line="warning: x"),
        LogLine(stream="stdout", time=now, line=""),
    ]
    broker.outcomes = [Reply(ok=True, container=make_info("web"), logs=lines)]

    result = berth(runner, "logs", "web", "--tail", "3")

    assert result.exit_code == 0, result.output
    assert broker.commands[0].tail == 3
    assert result.stdout == "hello\n\n"
    assert result.stderr == "warning: x\n"


def test_logs_tail_out_of_range(runner, broker):
    result = berth(runner, "logs", "web", "--tail", "-1")

    assert_usage_error(result, "'--tail'", "-1")


# --- events ---------------------------------------------------------------------------


def make_events() -> list[Event]:
    time_of_event = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    common = {"manager_id": MANAGER_ID, "container_id": "web", "time": time_of_event}
    return [
        Event(sequence=1, event="created", state=ContainerState.CREATED, **common),
        Event(
            sequence=4,
            event="exited",
            state=ContainerState.EXITED,
            exit=ExitInfo(exit_code=137, signal="SIGKILL", oom_killed=True, reason=ExitReason.OOM),
            **common,
        ),
        Event(
            sequence=5,
            event="lost",
            state=ContainerState.LOST,
            message='no "heartbeat"',
            **common,
        ),
    ]


def test_events_human_format(runner, broker):
    broker.events = make_events()

    result = berth(runner, "events", "host-a.#")

    assert result.exit_code == 0, result.output
    assert broker.patterns == ["host-a.#"]
    assert result.stdout.splitlines() == [
        "2024-05-01T12:00:00.123Z host-a web created seq=1",
        "2024-05-01T12:00:00.123Z host-a web exited seq=4 exit_code=137 signal=SIGKILL"
        " oom_killed=true reason=oom",
        '2024-05-01T12:00:00.123Z host-a web lost seq=5 message="no \\"heartbeat\\""',
    ]
    assert "following events matching 'host-a.#'" in result.stderr


def test_events_count_and_json(runner, broker):
    broker.events = make_events()

    result = berth(runner, "events", "--count", "2", "--json")

    assert result.exit_code == 0, result.output
    assert broker.patterns == ["#"]
    received = [Event.model_validate_json(line) for line in result.stdout.splitlines()]
    assert received == broker.events[:2]
    assert broker.event_queues == [None]


def test_events_named_queue(runner, broker):
    broker.events = make_events()

    result = berth(runner, "events", "--queue", "audit", "--count", "1")

    assert result.exit_code == 0, result.output
    assert broker.event_queues == ["audit"]


@pytest.mark.parametrize("name", ["", "amq.mine", "berth.commands.host-a", "q" * 256])
def test_events_unusable_queue_name(runner, broker, name):
    result = berth(runner, "events", "--queue", name)

    assert result.exit_code == 2
    assert "--queue" in result.stderr
    assert "not a usable queue name" in result.stderr
    assert broker.patterns == []


# --- errors and global options -------------------------------------------------------


def test_command_failed_exits_1(runner, broker):
    broker.outcomes = [CommandFailed(ErrorCode.NOT_FOUND, "no container 'web' on this manager")]

    result = berth(runner, "inspect", "web")

    assert result.exit_code == 1
    assert result.stderr == "berth: error: not_found: no container 'web' on this manager\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    "error",
    [
        BrokerUnavailable("cannot connect to the broker at amqp://guest:***@127.0.0.1:5672"),
        NoManager("no manager serves id 'host-a'"),
        ReplyTimeout("manager 'host-a' sent no reply to request 1 within 60 s"),
        pika.exceptions.StreamLostError("Transport indicated EOF"),
    ],
)
def test_unreachable_errors_exit_3(runner, broker, error):
    broker.outcomes = [error]

    result = berth(runner, "ps")

    assert result.exit_code == 3
    assert result.stderr.startswith("berth: error: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_broker_unavailable_on_connect_exits_3(runner, monkeypatch):
    def refuse(*args, **kwargs):
        raise BrokerUnavailable("cannot connect to the broker at amqp://guest:***@127.0.0.1:5672")

    monkeypatch.setattr(cli, "Client", refuse)

    result = berth(runner, "ps")

    assert result.exit_code == 3
    assert "cannot connect to the broker" in result.stderr


def test_invalid_reply_exits_3(runner, broker):
    try:
        Reply.model_validate_json(b'{"ok": "maybe"}')
    except ValidationError as exc:
        broker.outcomes = [exc]

    result = berth(runner, "ps")

    assert result.exit_code == 3
    assert "sent an invalid reply to list" in result.stderr
    assert "Traceback" not in result.output


def test_missing_url_is_usage_error(runner, broker):
    result = runner.invoke(cli.cli, ["-m", MANAGER_ID, "ps"])

    assert_usage_error(result, "missing broker URL", "BERTH_AMQP_URL")
    assert broker.connections == []


def test_help_needs_no_url(runner, broker):
    result = runner.invoke(cli.cli, ["ps", "--help"])

    assert result.exit_code == 0
    assert "--state" in result.stdout


def test_url_environment_order(runner, broker):
    environment = {"BERTH_AMQP_URL": "amqp://first/", "AMQP_URL": "amqp://second/"}
    runner.invoke(cli.cli, ["-m", MANAGER_ID, "ps"], env=environment)
    runner.invoke(cli.cli, ["-m", MANAGER_ID, "ps"], env={"AMQP_URL": "amqp://second/"})

    urls = [connection["url"] for connection in broker.connections]
    assert urls == ["amqp://first/", "amqp://second/"]


def test_non_amqp_url_hides_password(runner, broker):
    result = runner.invoke(cli.cli, ["--url", "http://user:secret@example.org/", "ps"])

    assert_usage_error(result, "'--url'", "'http'")
    assert "secret" not in result.output
    assert broker.connections == []


def test_url_list_checks_every_url(runner, broker):
    valid = berth(runner, "--url", "amqp://node-1/,amqp://node-2/", "ps")
    invalid = berth(runner, "--url", "amqp://node-1/,http://node-2/", "ps")

    assert valid.exit_code == 0, valid.output
    assert broker.connections[0]["url"] == "amqp://node-1/,amqp://node-2/"
    assert_usage_error(invalid, "'--url'", "'node-2'")
    assert len(broker.connections) == 1


def test_url_invalid_query_option(runner, broker):
    result = berth(runner, "--url", "amqp://guest:secret@node-1/?heartbeat=x", "ps")

    assert_usage_error(result, "'--url'", "heartbeat")
    assert "secret" not in result.output
    assert broker.connections == []


def test_manager_from_option_environment_or_host(runner, broker, monkeypatch):
    monkeypatch.setattr(cli, "default_manager_id", lambda: "this-host")
    runner.invoke(cli.cli, ["--url", URL, "-m", "host-b", "ps"])
    runner.invoke(cli.cli, ["--url", URL, "ps"], env={"BERTH_MANAGER": "host-c"})
    runner.invoke(cli.cli, ["--url", URL, "ps"])

    managers = [connection["manager_id"] for connection in broker.connections]
    assert managers == ["host-b", "host-c", "this-host"]


def test_invalid_manager_id_is_usage_error(runner, broker):
    result = runner.invoke(cli.cli, ["--url", URL, "-m", "host.example.org", "ps"])

    assert_usage_error(result, "'--manager'", "'host.example.org'")


def test_timeout_reaches_client(runner, broker):
    berth(runner, "--timeout", "2.5", "ps")

    assert broker.connections[0]["timeout"] == 2.5


def test_timeout_must_be_positive(runner, broker):
    result = berth(runner, "--timeout", "0", "ps")

    assert_usage_error(result, "'--timeout'")


# --- against a real broker and manager --------------------------------------------------


def run_berth(
    environment: dict[str, str], *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "messages.cli", *args],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_events(followers: list[subprocess.Popen], environment: dict[str, str], *args: str) -> subprocess.Popen:
    """Start ``berth events`` and wait until it reports that its queue is bound.

    The process goes into ``followers``, which the test's fixture ends.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "messages.cli", "events", *args],
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    followers.append(process)
    ready, _, _ = select.select([process.stderr], [], [], 30.0)
    line = process.stderr.readline() if ready else ""
    if "following events" not in line:
        raise AssertionError(f"berth events did not subscribe: {line!r}")
    return process


@pytest.fixture
def manager_run(amqp_url, run_prefix, tmp_path):
    """A manager child process; the test itself waits until it replies."""
    process = ManagerProcess(amqp_url, f"{run_prefix}-cli", tmp_path)
    process.launch()
    yield process
    process.cleanup()


@pytest.fixture
def followers():
    """``berth events`` processes of one test, killed when it ends."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.root
def test_cli_against_manager(amqp_url, manager_run, followers):
    environment = dict(os.environ, BERTH_AMQP_URL=amqp_url, BERTH_MANAGER=manager_run.manager_id)
    manager_id = manager_run.manager_id
    container_id = "hello"

    # The manager is ready once it replies to a list command.
    deadline = time.monotonic() + 30
    while (listing := run_berth(environment, "ps")).returncode != 0:
        assert manager_run.process.poll() is None, manager_run.log_tail()
        assert time.monotonic() < deadline, listing.stderr + manager_run.log_tail()
        time.sleep(0.3)

    lifecycle_pattern = f"{manager_id}.{container_id}.*"
    lifecycle = start_events(followers, environment, "--json", "--count", "2", lifecycle_pattern)
    exits = start_events(followers, environment, "--count", "1", f"{manager_id}.*.exited")

    ran = run_berth(environment, "run", container_id, "--", "sh", "-c", "echo hello; exit 4")
    assert ran.returncode == 0, ran.stderr + manager_run.log_tail()
    assert ran.stdout == f"{container_id}\n"

    deadline = time.monotonic() + 30
    while True:
        listing = run_berth(environment, "ps", "--json")
        assert listing.returncode == 0, listing.stderr
        [info] = Reply.model_validate_json(listing.stdout).containers
        if info.state == ContainerState.EXITED or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert info.id == container_id
    assert info.state == ContainerState.EXITED
    assert info.exit.exit_code == 4

    logs = run_berth(environment, "logs", container_id)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout == "hello\n"

    removed = run_berth(environment, "rm", container_id)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == f"{container_id}\n"

    missing = run_berth(environment, "inspect", container_id)
    assert missing.returncode == 1
    assert missing.stderr.startswith("berth: error: not_found: ")
    assert f"'{container_id}'" in missing.stderr

    lifecycle_output, lifecycle_errors = lifecycle.communicate(timeout=30)
    assert lifecycle.returncode == 0, lifecycle_errors
    received = [Event.model_validate_json(line) for line in lifecycle_output.splitlines()]
    steps = [(event.event, event.sequence) for event in received]
    assert steps == [("created", 1), ("starting", 2)]
    assert {event.container_id for event in received} == {container_id}

    exits_output, exits_errors = exits.communicate(timeout=30)
    assert exits.returncode == 0, exits_errors
    fields = exits_output.split()
    assert fields[1:4] == [manager_id, container_id, "exited"]
    assert "exit_code=4" in fields


def test_run_sends_network_and_ports(runner, broker):
    result = berth(
        runner, "run", "api", "--network", "bridge", "-p", "8080:80", "--publish", "8443:443", "--", "true"
    )

    assert result.exit_code == 0, result.output
    [command] = broker.commands
    assert command.network == "bridge"
    assert [(port.host_port, port.container_port) for port in command.ports] == [(8080, 80), (8443, 443)]


def test_publish_without_colon_names_value(runner, broker):
    result = berth(runner, "run", "api", "--publish", "8080", "--", "true")

    assert_usage_error(result, "'--publish'", "'8080'", "HOST_PORT:CONTAINER_PORT")
    assert broker.commands == []


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("", "1 to 255 bytes"), ("x" * 256, "1 to 255 bytes"), ("host-a.web", "has 2 words")],
)
def test_events_rejects_patterns_matching_nothing(runner, broker, pattern, expected):
    result = berth(runner, "events", pattern)

    assert result.exit_code == 2
    assert expected in result.stderr
    assert broker.patterns == []
