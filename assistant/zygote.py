"""A fork server for assistants: one process that imported everything once.

Starting an assistant with exec costs an interpreter start and the
imports of pika and pydantic, hundreds of milliseconds of CPU and about
20 MiB of private memory per container. The manager instead starts this
process once. It imports the assistant's modules, does their first-use
work (``warm_up``), freezes the garbage collector's objects so that forked
children do not copy those pages, and forks one child per container. The
children share the imported code with the zygote copy-on-write.

Protocol on the zygote's stdin and stdout, one line each way:
the manager writes a container directory, the zygote answers with the
new assistant's pid, or ``error <message>``.

The zygote is the parent of every assistant it forks and reaps them.
When the manager goes away (EOF on stdin) it stops forking but stays
until its last child exited, so the assistants are reaped after a manager
crash too.
"""

import gc
import logging
import os
import signal
import sys
import time

import setproctitle

import assistant.__main__ as assistant_main
from assistant.config import AssistantConfig
from messages.brokers import connection_parameters
from messages.models import (
    AssistantStatus,
    ControlOrder,
    ExitInfo,
    ExitReason,
    Heartbeat,
    HeartbeatReply,
)

log = logging.getLogger(__name__)


def run_child(container_dir: str) -> None:
    """Become the assistant of ``container_dir``; never returns."""
    status = 1
    try:
        os.setsid()  # signals to the zygote's or the manager's group stay there
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        # The same command line as an exec'd assistant, which is what the
        # manager checks to recognise an assistant by its pid.
        setproctitle.setproctitle(f"{sys.executable} -m assistant {container_dir}")
        log_path = os.path.join(container_dir, "assistant.log")
        output = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(devnull)
        os.close(output)
        logging.root.handlers.clear()
        status = assistant_main.main([container_dir])
    except BaseException:  # the child must end here whatever happens
        logging.getLogger("assistant").exception("assistant for %s failed to start", container_dir)
    finally:
        os._exit(status)


def warm_up() -> None:
    """Do once, before any fork, the first-use work that every assistant repeats.

    A forked child copies each page that it writes to, and the first use
    of a module or a model writes to many objects: it imports, fills caches
    and specializes bytecode. Done here, those pages stay shared by all
    children. docs/benchmarks.md has the measured effect.

    NOTE: pika's connection code still runs for the first time in each
    assistant, because warming it up would need a broker connection.
    """
    # socket.getaddrinfo encodes a host name given as str with the idna
    # codec, whose first use imports encodings.idna, stringprep and
    # unicodedata. pika resolves the broker's host in every assistant.
    "localhost".encode("idna")
    config = AssistantConfig(
        manager_id="warm-up",
        container_id="warm-up",
        token="warm-up",
        container_dir="/nonexistent",
        amqp_url="amqp://guest:guest@localhost:5672/%2F",
        runc_root="/nonexistent",
        heartbeat_interval=1.0,
        heartbeat_timeout=30.0,
    )
    AssistantConfig.model_validate_json(config.model_dump_json())
    connection_parameters(config.amqp_url, connection_attempts=1)
    heartbeat = Heartbeat(
        container_id=config.container_id,
        assistant_pid=os.getpid(),
        token=config.token,
        status=AssistantStatus.EXITED,
        pid=1,
        exit=ExitInfo(exit_code=0, reason=ExitReason.EXITED),
    )
    heartbeat.model_dump_json()
    HeartbeatReply.model_validate_json('{"verdict": "ack", "exit_recorded": true}')
    ControlOrder.model_validate_json('{"action": "stop", "grace": 1.0}')


def reap_children() -> bool:
    """Collect exited children; return whether any child is still running."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False  # no children at all
        if pid == 0:
            return True


def serve(requests, replies) -> None:
    """Fork an assistant for every directory read from ``requests``."""
    gc.freeze()  # keep the shared pages shared: the collector would write to them
    for line in requests:
        container_dir = line.strip()
        if not container_dir:
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            replies.write(f"error {exc}\n")
            replies.flush()
            continue
        if pid == 0:
            run_child(container_dir)
        replies.write(f"{pid}\n")
        replies.flush()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    # The manager's own signals are not the zygote's business: it ends when
    # its children have ended.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Reap as soon as an assistant ends, also while waiting for a request.
    signal.signal(signal.SIGCHLD, lambda signum, frame: reap_children())
    try:
        warm_up()
    except Exception:  # without it every assistant does this work itself, which costs only memory
        log.exception("assistant zygote %d: warm-up failed, forking without it", os.getpid())
    log.info("assistant zygote %d ready", os.getpid())
    serve(sys.stdin, sys.stdout)
    log.info("assistant zygote %d: manager gone, waiting for its assistants", os.getpid())
    while reap_children():
        time.sleep(1.0)
    log.info("assistant zygote %d stops", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
