"""The ``berth`` command line: send commands to a manager and follow events.

Every command except ``events`` sends one command to one manager through
:class:`messages.client.Client` and prints the reply. ``--json`` prints the
reply itself as one JSON object, or one event object per line.

Exit codes:

- 0: success.
- 1: the manager replied with an error, whose code and message are printed.
- 2: invalid usage, such as a missing option or a malformed value.
- 3: the broker could not be reached, no manager serves the id, the reply
  timed out, the connection was lost, or the reply was not valid.
- 130: interrupted with Ctrl-C. ``events`` exits with 0 instead.
"""

import decimal
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import click
import pika.exceptions
from pydantic import ValidationError

from messages.brokers import check_urls
from messages.client import (
    DEFAULT_TIMEOUT,
    Client,
    ClientError,
    CommandFailed,
    NoManager,
    check_queue_name,
    default_manager_id,
)
from messages.models import (
    MAX_LOG_LINES,
    ContainerInfo,
    ContainerState,
    CreateCommand,
    DeleteCommand,
    Event,
    InspectCommand,
    KillCommand,
    ListCommand,
    LogsCommand,
    Reply,
    RunCommand,
    StartCommand,
    StopCommand,
    signal_name,
)
from messages.names import ID_PATTERN, ID_RULE

EXIT_COMMAND_FAILED = 1
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

COMMAND_WIDTH = 40
"""Characters of the COMMAND column that ``ps`` shows unless --no-trunc is given."""

PID_STATES = frozenset(
    {
        ContainerState.CREATED,
        ContainerState.STARTING,
        ContainerState.RUNNING,
        ContainerState.STOPPING,
    }
)
"""States in which ``ps`` shows the workload pid."""

SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
SIZE_PATTERN = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?:(?P<unit>[kmgt])i?)?b?", re.IGNORECASE)
SIZE_FORM = "a number of bytes with an optional unit k, m, g or t (powers of 1024), e.g. 64m or 1g"

# Wire fields of a command and the command-line parameter that sets each,
# so that a value the wire models reject is reported under its option name.
PARAMETER_OF_FIELD = {
    "id": "ID",
    "argv": "COMMAND",
    "env": "--env",
    "cwd": "--cwd",
    "rootfs": "--rootfs",
    "hostname": "--hostname",
    "labels": "--label",
    "heartbeat_timeout": "--heartbeat-timeout",
    "network": "--network",
    "ports": "--publish",
    "limits.memory_bytes": "--memory",
    "limits.cpus": "--cpus",
    "limits.pids": "--pids",
    "grace": "--grace",
    "signal": "--signal",
    "state": "--state",
    "tail": "--tail",
}

log = logging.getLogger(__name__)


class ReplyInvalid(click.ClickException):
    """A reply that does not match the wire model ``Reply``."""

    exit_code = EXIT_UNAVAILABLE


@dataclass
class Settings:
    """Global options, shared by every command through the click context."""

    url: str | None
    manager_id: str
    timeout: float
    json_output: bool


# --- parameter parsing -------------------------------------------------------


def parse_size(text: str) -> int:
    """Parse a size such as ``64m``, ``1.5g`` or ``4194304`` into bytes.

    Units are powers of 1024 and case-insensitive, and an ``i`` or ``b``
    suffix is accepted (``64MiB``, ``64mb``). A fractional byte count is
    rounded down. Raises ValueError for any other text.
    """
    match = SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a valid size: use {SIZE_FORM}")
    number = decimal.Decimal(match["number"])
    unit = (match["unit"] or "").lower()
    return int(number * SIZE_UNITS[unit])


class SizeType(click.ParamType):
    """A byte count written with an optional unit, parsed by :func:`parse_size`."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def parse_pairs(items: Sequence[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` items into a dict; a later key wins.

    The value may be empty and may contain "=". Raises ValueError naming the
    first item without "=" or with an empty key.
    """
    pairs: dict[str, str] = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"{item!r} is not in the form KEY=VALUE")
        if not key:
            raise ValueError(f"{item!r} has an empty key: use KEY=VALUE")
        pairs[key] = value
    return pairs


def pairs_callback(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> dict[str, str]:
    try:
        return parse_pairs(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def publish_callback(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> list[dict[str, int]]:
    """Parse HOST_PORT:CONTAINER_PORT items into ``ports`` entries of a create."""
    ports = []
    for item in value:
        host_port, _, container_port = item.partition(":")
        if not (host_port.isdigit() and container_port.isdigit()):
            raise click.BadParameter(
                f"invalid port mapping {item!r}: expected HOST_PORT:CONTAINER_PORT, such as 8080:80",
                ctx,
                param,
            )
        ports.append({"host_port": int(host_port), "container_port": int(container_port)})
    return ports


def container_id_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        message = f"{value!r} is not a valid container id: use {ID_RULE}"
        raise click.BadParameter(message, ctx, param)
    return value


def signal_callback(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return signal_name(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def validate_urls(urls: str) -> None:
    """Raise click.BadParameter unless ``urls`` lists amqp:// or amqps:// URLs with a host."""
    try:
        check_urls(urls)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--url'") from None


def build_command(model: type, **fields: Any) -> Any:
    """Build and validate a wire command.

    Raises click.UsageError that names the command-line option of each rejected field.
    """
    try:
        return model(**fields)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = [str(item) for item in error["loc"]] or ["command"]
            field = ".".join(location[:2]) if location[0] == "limits" else location[0]
            parameter = PARAMETER_OF_FIELD.get(field, field)
            problems.append(f"'{parameter}' ({field}={error.get('input')!r}): {error['msg']}")
        raise click.UsageError("Invalid value for " + "; ".join(problems)) from None


# --- output formatting -------------------------------------------------------


def format_time(moment: datetime) -> str:
    """Format a time as ISO 8601 UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    text = moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    return text[:-3] + "Z"


def format_age(moment: datetime, now: datetime) -> str:
    """Format the time from ``moment`` to ``now`` as "5s ago", "3m ago", "2h ago" or "4d ago".

    A moment in the future, from clock skew between hosts, shows as "0s ago".
    """
    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h ago"
    return f"{seconds // 86400}d ago"


def truncate(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: width - 3] + "..."


def format_exit_code(info: ContainerInfo) -> str:
    """Return the exit code, "-" before an exit, or "?" when the code was not collected."""
    if info.exit is None:
        return "-"
    if info.exit.exit_code is None:
        return "?"
    return str(info.exit.exit_code)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Align columns two spaces apart. The last column is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths)]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def format_pid(info: ContainerInfo) -> str:
    """Return the workload pid while the workload may be alive, otherwise "-".

    The pid of an ended workload may already belong to another process.
    """
    if info.pid is None or info.state not in PID_STATES:
        return "-"
    return str(info.pid)


def format_containers(containers: Sequence[ContainerInfo], now: datetime, no_trunc: bool) -> str:
    header = ["ID", "STATE", "PID", "EXIT", "CREATED", "COMMAND"]
    rows = []
    for info in containers:
        command = shlex.join(info.argv)
        if not no_trunc:
            command = truncate(command, COMMAND_WIDTH)
        rows.append(
            [
                info.id,
                info.state.value,
                format_pid(info),
                format_exit_code(info),
                format_age(info.created_at, now),
                command,
            ]
        )
    return format_table(header, rows)


def format_event(event: Event) -> str:
    """Format an event as one line: time, manager, container, event, sequence, exit details."""
    parts = [
        format_time(event.time),
        event.manager_id,
        event.container_id,
        event.event,
        f"seq={event.sequence}",
    ]
    if event.exit is not None:
        code = event.exit.exit_code
        parts.append(f"exit_code={'unknown' if code is None else code}")
        if event.exit.signal:
            parts.append(f"signal={event.exit.signal}")
        if event.exit.oom_killed:
            parts.append("oom_killed=true")
        parts.append(f"reason={event.exit.reason.value}")
    if event.message:
        parts.append(f"message={json.dumps(event.message)}")
    return " ".join(parts)


# --- talking to the manager --------------------------------------------------


def open_client(ctx: click.Context) -> Client:
    """Connect to the broker and close the connection when the command ends."""
    settings = ctx.find_object(Settings)
    if not settings.url:
        raise click.UsageError(
            "missing broker URL: pass --url or set BERTH_AMQP_URL or AMQP_URL", ctx
        )
    client = Client(settings.url, settings.manager_id, settings.timeout)
    ctx.call_on_close(lambda: close_client(client))
    return client


def close_client(client: Client) -> None:
    try:
        client.close()
    except pika.exceptions.AMQPError as exc:
        # The command already printed its result, or the error that matters.
        log.debug("closing the broker connection failed: %r", exc)


def send(ctx: click.Context, command: Any) -> Reply:
    """Send ``command`` and return the manager's ok reply.

    Raises CommandFailed for an error reply and ReplyInvalid for a reply that does not parse.
    """
    client = open_client(ctx)
    try:
        return client.request(command)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(item) for item in error["loc"])
            problems.append(f"{location}: {error['msg']}")
        details = "; ".join(problems)
        raise ReplyInvalid(
            f"manager {client.manager_id!r} sent an invalid reply to {command.command}: {details}"
        ) from None


def print_reply(ctx: click.Context, reply: Reply, human: Callable[[], None]) -> None:
    """Print the reply as JSON with --json, otherwise call ``human`` to print it."""
    if ctx.find_object(Settings).json_output:
        click.echo(reply.model_dump_json())
    else:
        human()


def print_container_id(ctx: click.Context, reply: Reply, container_id: str) -> None:
    print_reply(ctx, reply, lambda: click.echo(container_id))


# --- error reporting ---------------------------------------------------------


def print_error(message: str) -> None:
    click.echo(f"berth: error: {message}", err=True)


def exit_code_of(error: BaseException) -> int:
    """Print ``error`` as a ``berth: error:`` line and return the exit code for its kind.

    A usage error is preceded by the command's usage line and a hint to run --help.
    """
    if isinstance(error, click.exceptions.NoArgsIsHelpError):
        error.show()
        return error.exit_code
    if isinstance(error, click.UsageError):
        if error.ctx is not None:
            click.echo(error.ctx.get_usage(), err=True)
            click.echo(f"Try '{error.ctx.command_path} --help' for help.", err=True)
        print_error(error.format_message())
        return error.exit_code
    if isinstance(error, click.ClickException):
        print_error(error.format_message())
        return error.exit_code
    if isinstance(error, CommandFailed):
        print_error(str(error))
        return EXIT_COMMAND_FAILED
    if isinstance(error, NoManager):
        print_error(f"{error}; choose the manager with --manager or BERTH_MANAGER")
        return EXIT_UNAVAILABLE
    if isinstance(error, ClientError):
        print_error(str(error))
        return EXIT_UNAVAILABLE
    if isinstance(error, pika.exceptions.AMQPError):
        print_error(
            f"the broker connection failed: {error!r}; check that the broker is running and retry"
        )
        return EXIT_UNAVAILABLE
    if isinstance(error, click.Abort):
        print_error("interrupted")
        return EXIT_INTERRUPTED
    raise error  # not one of the types that BerthGroup.main catches


class BerthGroup(click.Group):
    """Group whose main() prints expected errors as ``berth: error:`` lines.

    It exits with the code of each kind of error, listed in the module docstring.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except (click.ClickException, click.Abort, ClientError, pika.exceptions.AMQPError) as error:
            sys.exit(exit_code_of(error))
        # Without standalone mode, click returns the code of a ctx.exit() such as --help's.
        sys.exit(result if isinstance(result, int) else 0)


# --- commands ----------------------------------------------------------------


@click.group(
    cls=BerthGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--url",
    envvar=["BERTH_AMQP_URL", "AMQP_URL"],
    metavar="URL",
    help="Broker URL, e.g. amqp://user:password@host:5672/%2F, or several separated by commas,"
    " tried in order (env BERTH_AMQP_URL, then AMQP_URL).",
)
@click.option(
    "--manager",
    "-m",
    "manager_id",
    envvar="BERTH_MANAGER",
    metavar="ID",
    help="Id of the manager to send commands to (env BERTH_MANAGER); default: this host's name.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for a reply; stop adds its grace period.",
)
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="Print replies and events as JSON, one object per line.",
)
@click.pass_context
def cli(
    ctx: click.Context,
    url: str | None,
    manager_id: str | None,
    timeout: float,
    json_output: bool,
) -> None:
    """Manage containers through berth managers over RabbitMQ."""
    if url:
        validate_urls(url)
    if manager_id is None:
        manager_id = default_manager_id()
        if not ID_PATTERN.fullmatch(manager_id):
            raise click.UsageError(
                f"the host name {manager_id!r} is not a valid manager id ({ID_RULE});"
                " pass --manager or set BERTH_MANAGER"
            )
    elif not ID_PATTERN.fullmatch(manager_id):
        raise click.BadParameter(
            f"{manager_id!r} is not a valid manager id: use {ID_RULE}", param_hint="'--manager'"
        )
    ctx.obj = Settings(url=url, manager_id=manager_id, timeout=timeout, json_output=json_output)


def json_callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Settings).json_output = True


def json_option(function: Callable) -> Callable:
    """Accept --json after the command name too, as in ``berth ps --json``."""
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=json_callback,
        help="Print the reply, or each event, as one JSON object per line; same as berth --json.",
    )(function)


def container_id_argument(function: Callable) -> Callable:
    return click.argument("container_id", metavar="ID", callback=container_id_callback)(function)


CREATE_OPTIONS = [
    click.option(
        "--env",
        "-e",
        multiple=True,
        callback=pairs_callback,
        metavar="KEY=VALUE",
        help="Environment variable; repeatable.",
    ),
    click.option("--cwd", help="Absolute working directory inside the container; default: /."),
    click.option(
        "--rootfs",
        help="Absolute path of a root directory on the manager's host;"
        " default: a read-only root made of the host's /usr, /bin, /lib and /sbin.",
    ),
    click.option("--hostname", help="Host name inside the container."),
    click.option(
        "--memory",
        type=SizeType(),
        help="Memory limit in bytes, with an optional unit: 64m, 1g; at least 4m.",
    ),
    click.option("--cpus", type=float, help="CPU time limit as a number of cores, e.g. 0.5."),
    click.option("--pids", type=int, help="Maximum number of processes."),
    click.option(
        "--label",
        "-l",
        multiple=True,
        callback=pairs_callback,
        metavar="KEY=VALUE",
        help="Label; repeatable.",
    ),
    click.option(
        "--heartbeat-timeout",
        type=float,
        help="Seconds without a reply from the manager after which the workload is killed;"
        " 0: never; default: the manager's setting.",
    ),
    click.option(
        "--init/--no-init",
        default=True,
        show_default=True,
        help="Run the workload under tini, which forwards signals and reaps zombies.",
    ),
    click.option(
        "--network",
        type=click.Choice(["bridge", "none", "host"]),
        help="bridge: an address on the manager's bridge; none: loopback only;"
        " host: the host's network; default: bridge.",
    ),
    click.option(
        "--publish",
        "-p",
        multiple=True,
        callback=publish_callback,
        metavar="HOST_PORT:CONTAINER_PORT",
        help="Publish a TCP port of the container on 127.0.0.1 of the manager's host; repeatable.",
    ),
]


def create_options(function: Callable) -> Callable:
    for option in reversed(CREATE_OPTIONS):
        function = option(function)
    return function


def build_create(
    model: type, name: str, container_id: str, argv: tuple[str, ...], options: dict[str, Any]
) -> Any:
    """Build a create or run command from the options of :data:`CREATE_OPTIONS`."""
    limits = {
        "memory_bytes": options["memory"],
        "cpus": options["cpus"],
        "pids": options["pids"],
    }
    fields: dict[str, Any] = {
        "command": name,
        "id": container_id,
        "argv": list(argv),
        "env": options["env"],
        "labels": options["label"],
        "limits": {key: value for key, value in limits.items() if value is not None},
        "init": options["init"],
        "ports": options["publish"],
    }
    for field in ("cwd", "rootfs", "hostname", "heartbeat_timeout", "network"):
        if options[field] is not None:
            fields[field] = options[field]
    return build_command(model, **fields)


COMMAND_ARGUMENT = click.argument("argv", metavar="-- COMMAND [ARG]...", nargs=-1, required=True)


@cli.command()
@container_id_argument
@COMMAND_ARGUMENT
@create_options
@json_option
@click.pass_context
def run(ctx: click.Context, container_id: str, argv: tuple[str, ...], **options: Any) -> None:
    """Create and start a container; print its id.

    The container ID runs COMMAND. Put "--" before COMMAND so that its
    options are not read as berth's.
    """
    reply = send(ctx, build_create(RunCommand, "run", container_id, argv, options))
    print_container_id(ctx, reply, container_id)


@cli.command()
@container_id_argument
@COMMAND_ARGUMENT
@create_options
@json_option
@click.pass_context
def create(ctx: click.Context, container_id: str, argv: tuple[str, ...], **options: Any) -> None:
    """Create a container without starting it; print its id.

    The container ID will run COMMAND once started. Put "--" before COMMAND
    so that its options are not read as berth's.
    """
    reply = send(ctx, build_create(CreateCommand, "create", container_id, argv, options))
    print_container_id(ctx, reply, container_id)


@cli.command()
@container_id_argument
@json_option
@click.pass_context
def start(ctx: click.Context, container_id: str) -> None:
    """Start a created container."""
    command = build_command(StartCommand, command="start", id=container_id)
    print_container_id(ctx, send(ctx, command), container_id)


@cli.command()
@container_id_argument
@click.option(
    "--grace",
    "-t",
    type=float,
    help="Seconds between SIGTERM and SIGKILL;"
    f" default: {StopCommand.model_fields['grace'].default:g}.",
)
@json_option
@click.pass_context
def stop(ctx: click.Context, container_id: str, grace: float | None) -> None:
    """Stop a container and wait for its exit.

    The workload gets SIGTERM, then SIGKILL once the grace period ends.
    """
    fields: dict[str, Any] = {"command": "stop", "id": container_id}
    if grace is not None:
        fields["grace"] = grace
    print_container_id(ctx, send(ctx, build_command(StopCommand, **fields)), container_id)


@cli.command()
@container_id_argument
@click.option(
    "--signal",
    "-s",
    "signal",
    default=KillCommand.model_fields["signal"].default,
    show_default=True,
    callback=signal_callback,
    help="Signal name or number, e.g. TERM, SIGHUP or 9.",
)
@json_option
@click.pass_context
def kill(ctx: click.Context, container_id: str, signal: str) -> None:
    """Send a signal to a container's workload."""
    command = build_command(KillCommand, command="kill", id=container_id, signal=signal)
    print_container_id(ctx, send(ctx, command), container_id)


@cli.command()
@container_id_argument
@click.option("--force", "-f", is_flag=True, help="Kill the workload first if it is still running.")
@json_option
@click.pass_context
def rm(ctx: click.Context, container_id: str, force: bool) -> None:
    """Delete a container, its bundle and its logs."""
    command = build_command(DeleteCommand, command="delete", id=container_id, force=force)
    print_container_id(ctx, send(ctx, command), container_id)


@cli.command()
@click.option("--all", "-a", "show_all", is_flag=True, help="Include deleted containers.")
@click.option(
    "--state",
    type=click.Choice([state.value for state in ContainerState], case_sensitive=False),
    help="Show only containers in this state.",
)
@click.option(
    "--label",
    "-l",
    multiple=True,
    callback=pairs_callback,
    metavar="KEY=VALUE",
    help="Show only containers with this label; repeatable, all must match.",
)
@click.option("--no-trunc", is_flag=True, help="Show the whole command.")
@json_option
@click.pass_context
def ps(
    ctx: click.Context,
    show_all: bool,
    state: str | None,
    label: dict[str, str],
    no_trunc: bool,
) -> None:
    """List the manager's containers, oldest first."""
    command = build_command(ListCommand, command="list", all=show_all, state=state, labels=label)
    reply = send(ctx, command)
    now = datetime.now(timezone.utc)

    def print_table() -> None:
        click.echo(format_containers(reply.containers or [], now, no_trunc))

    print_reply(ctx, reply, print_table)


@cli.command()
@container_id_argument
@json_option
@click.pass_context
def inspect(ctx: click.Context, container_id: str) -> None:
    """Print a container's stored details as indented JSON."""
    reply = send(ctx, build_command(InspectCommand, command="inspect", id=container_id))
    if reply.container is None:
        manager_id = ctx.find_object(Settings).manager_id
        raise ReplyInvalid(
            f"manager {manager_id!r} sent an ok reply to inspect {container_id!r} without a container"
        )
    print_reply(ctx, reply, lambda: click.echo(reply.container.model_dump_json(indent=2)))


@cli.command()
@container_id_argument
@click.option(
    "--tail",
    type=click.IntRange(0, MAX_LOG_LINES),
    help=f"Print only the last N lines; at most {MAX_LOG_LINES}.",
)
@json_option
@click.pass_context
def logs(ctx: click.Context, container_id: str, tail: int | None) -> None:
    """Print a container's output lines.

    Lines the workload wrote to stderr go to stderr, the others to stdout.
    """
    reply = send(ctx, build_command(LogsCommand, command="logs", id=container_id, tail=tail))

    def print_lines() -> None:
        for line in reply.logs or []:
            click.echo(line.line, err=line.stream == "stderr")
        if reply.logs_omitted:
            click.echo(
                f"berth: {reply.logs_omitted} older lines left out to keep the reply under"
                " its size limit; use --tail to choose fewer lines",
                err=True,
            )

    print_reply(ctx, reply, print_lines)


def check_pattern(pattern: str) -> None:
    """Reject binding patterns that the broker refuses or that match no event."""
    if not pattern or len(pattern.encode()) > 255:
        raise click.BadParameter(
            f"{pattern!r} is not a binding pattern: give 1 to 255 bytes, e.g. 'host-a.#'",
            param_hint="PATTERN",
        )
    words = pattern.split(".")
    if "#" not in words and len(words) != 3:
        raise click.BadParameter(
            f"{pattern!r} has {len(words)} words but routing keys have 3"
            " (MANAGER.CONTAINER.EVENT), so it would match nothing; e.g. 'host-a.web.*'",
            param_hint="PATTERN",
        )


@cli.command()
@click.argument("pattern", default="#")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    help="Exit after N events; default: follow until Ctrl-C.",
)
@click.option(
    "--queue",
    metavar="NAME",
    help="Read from a durable queue of this name, which keeps events while"
    " nobody reads them (between runs, during a broker outage). The queue keeps"
    " the patterns of earlier runs too; delete it to change the pattern.",
)
@json_option
@click.pass_context
def events(ctx: click.Context, pattern: str, count: int | None, queue: str | None) -> None:
    """Follow container events and print them as they arrive.

    Only events whose routing key matches PATTERN are shown.

    Routing keys are MANAGER.CONTAINER.EVENT. In PATTERN, "*" matches one
    word and "#" matches zero or more, e.g. "host-a.#" or "*.*.exited".
    Without --queue, events published before this command subscribes, or
    while its connection is down, are not shown.
    """
    check_pattern(pattern)
    if queue is not None:
        try:
            check_queue_name(queue)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--queue") from None
    client = open_client(ctx)
    subscription = client.subscribe(pattern, queue=queue)
    json_output = ctx.find_object(Settings).json_output
    # Printed once the queue is bound, so scripts may start the events they wait for.
    click.echo(f"berth: following events matching {pattern!r}; press Ctrl-C to stop", err=True)
    received = 0
    try:
        for event in subscription:
            click.echo(event.model_dump_json() if json_output else format_event(event))
            received += 1
            if count is not None and received >= count:
                break
    except KeyboardInterrupt:
        pass
    # Acknowledges the last event printed, which a named queue would
    # otherwise deliver again to the next reader.
    subscription.close()


def main() -> None:
    """Run the ``berth`` console script."""
    logging.basicConfig(level=logging.WARNING, format="berth: %(levelname)s: %(name)s: %(message)s")
    # pika logs each connection failure that the client then raises and the CLI reports.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    cli.main(prog_name="berth")


if __name__ == "__main__":
    main()
