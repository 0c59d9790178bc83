"""Shared pytest fixtures and markers for berth's tests.

Sections:

- Markers: ``@pytest.mark.root`` skips a test with the reason "requires root"
  unless it runs with effective uid 0 (runc, cgroups, network namespaces).
- Session identity: ``run_prefix``, a short string unique to the test session.
- RabbitMQ: ``amqp_url``, ``rabbitmq_node`` and ``private_node_dir``.

The broker behind ``amqp_url`` is chosen once per session, in this order:

1. The ``AMQP_URL`` environment variable. If that broker does not accept a
   connection within 5 s, every test that uses the fixture is skipped.
2. A RabbitMQ container from testcontainers, when a Docker engine responds.
3. A ``deploy.rabbitmq.PrivateNode`` in a temporary directory, stopped at the
   end of the session. Only in this case ``rabbitmq_node`` returns the node,
   so that tests can run ``rabbitmqctl`` against it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import secrets
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pika
import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from deploy.rabbitmq import PrivateNode, RabbitMQNotInstalledError

if TYPE_CHECKING:
    from testcontainers.community.rabbitmq import RabbitMqContainer

logger = logging.getLogger(__name__)

AMQP_URL_VARIABLE = "AMQP_URL"
AMQP_URL_CONNECT_TIMEOUT = 5.0
DOCKER_SOCKET = pathlib.Path("/var/run/docker.sock")
DOCKER_PING_TIMEOUT = 3
# Same release series as the Debian 12 rabbitmq-server package (3.10.8).
RABBITMQ_IMAGE = "rabbitmq:3.10"


# ---------------------------------------------------------------------------
# Markers
# ---------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.skip("requires root")


# ---------------------------------------------------------------------------
# Session identity
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Return "t" and 6 random hex digits, for naming manager ids, queues and containers.

    With 24 random bits, names built from it are unlikely to collide with
    those of an earlier or a concurrent session on the same broker or host.
    """
    return "t" + secrets.token_hex(3)


def berth_host_resources() -> set[str]:
    """Name every network namespace, link and manager cgroup berth may leave behind."""
    found = set()
    netns_dir = pathlib.Path("/run/netns")
    if netns_dir.is_dir():
        found.update(f"netns {entry.name}" for entry in netns_dir.iterdir() if entry.name.startswith("berth-"))
    for link in pathlib.Path("/sys/class/net").iterdir():
        if link.name.startswith(("berth-", "bv")):
            found.add(f"link {link.name}")
    for hierarchy in pathlib.Path("/sys/fs/cgroup").glob("*/berth"):
        found.update(f"cgroup {entry}" for entry in hierarchy.iterdir() if entry.is_dir())
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """Fail the session when the tests leave a namespace, link or cgroup behind."""
    if os.geteuid() != 0:
        yield
        return
    before = berth_host_resources()
    yield
    left = sorted(berth_host_resources() - before)
    assert not left, f"the tests left {len(left)} host resources behind: {left[:10]}"


# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """The RabbitMQ broker that this test session uses."""

    url: str
    source: str
    """One of "AMQP_URL", "testcontainers" or "private node"."""
    node: PrivateNode | None = None


def redact_password(url: str) -> str:
    """Return ``url`` with the password replaced by "***", for skip reasons and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _connect_error(url: str, timeout: float) -> str | None:
    """Open and close a pika connection to ``url``. Return the error text, or None on success."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    try:
        connection = pika.BlockingConnection(parameters)
    # A handshake timeout raises AMQPConnectorStackTimeout, which is no AMQPError.
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError, ValueError) as error:
        return repr(error)
    connection.close()
    return None


def _docker_engine_responds() -> bool:
    """Return True when a Docker engine responds to a ping, without importing testcontainers.

    Checks DOCKER_HOST and the default socket first, so on a machine without
    Docker this neither imports the docker package nor logs anything.
    """
    if not os.environ.get("DOCKER_HOST") and not DOCKER_SOCKET.exists():
        return False
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env(timeout=DOCKER_PING_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as error:  # noqa: BLE001 - any failure means "no usable engine"
        logger.info("Docker engine did not respond, using a private RabbitMQ node: %r", error)
        return False
    return True


def _start_container() -> RabbitMqContainer | None:
    """Start a RabbitMQ container and return it, or None when it does not start."""
    try:
        from testcontainers.community.rabbitmq import RabbitMqContainer  # noqa: PLC0415
    except ImportError:
        # Older releases have the class only here. 4.15 keeps it as a deprecated alias.
        from testcontainers.rabbitmq import RabbitMqContainer  # noqa: PLC0415

    container = RabbitMqContainer(RABBITMQ_IMAGE)
    try:
        container.start()
    except Exception:  # for example, the image cannot be pulled
        logger.exception(
            "RabbitMQ container %s did not start, using a private node", RABBITMQ_IMAGE
        )
        with contextlib.suppress(Exception):
            container.stop()
        return None
    return container


def _container_url(container: RabbitMqContainer) -> str:
    host = container.get_container_host_ip()
    port = container.get_exposed_port(container.port)
    user = urllib.parse.quote(container.username, safe="")
    password = urllib.parse.quote(container.password, safe="")
    vhost = urllib.parse.quote(container.vhost, safe="")
    return f"amqp://{user}:{password}@{host}:{port}/{vhost}"


def make_node_dir() -> pathlib.Path:
    """Create a directory for a PrivateNode that the rabbitmq user can reach.

    pytest's tmp_path lies under /tmp/pytest-of-USER, which has mode 0700,
    so a server running as the rabbitmq user could not enter it.
    """
    return pathlib.Path(tempfile.mkdtemp(prefix="berth-rabbitmq-", dir="/tmp"))


@contextlib.contextmanager
def _private_node_broker() -> Iterator[Broker]:
    base_dir = make_node_dir()
    node = PrivateNode(base_dir)
    try:
        try:
            url = node.start()
        except RabbitMQNotInstalledError as error:
            # CI installs the package, so a missing server there is a failure.
            if os.environ.get("CI"):
                raise
            pytest.skip(str(error))
        yield Broker(url, "private node", node)
    finally:
        node.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def rabbitmq_broker() -> Iterator[Broker]:
    """Return the session's broker, chosen as the module docstring describes."""
    url = os.environ.get(AMQP_URL_VARIABLE)
    if url:
        error = _connect_error(url, AMQP_URL_CONNECT_TIMEOUT)
        if error is not None:
            pytest.skip(
                f"broker at {AMQP_URL_VARIABLE}={redact_password(url)} did not accept a connection "
                f"within {AMQP_URL_CONNECT_TIMEOUT:.0f} s: {error}"
            )
        yield Broker(url, AMQP_URL_VARIABLE)
        return

    container = _start_container() if _docker_engine_responds() else None
    if container is not None:
        try:
            yield Broker(_container_url(container), "testcontainers")
        finally:
            container.stop()
        return

    with _private_node_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def amqp_url(rabbitmq_broker: Broker) -> str:
    """Return the AMQP URL of the session's broker."""
    return rabbitmq_broker.url


@pytest.fixture(scope="session")
def rabbitmq_node(rabbitmq_broker: Broker) -> PrivateNode:
    """Return the PrivateNode behind ``amqp_url``, or skip when the broker came from elsewhere."""
    if rabbitmq_broker.node is None:
        pytest.skip(f"rabbitmqctl is not available for the broker from {rabbitmq_broker.source}")
    return rabbitmq_broker.node


@pytest.fixture
def private_node_dir() -> Iterator[pathlib.Path]:
    """Return an empty directory for a PrivateNode of the test's own, removed afterwards."""
    base_dir = make_node_dir()
    yield base_dir
    shutil.rmtree(base_dir, ignore_errors=True)


# pika logs every connection step at INFO; keep test output to berth's own lines.
logging.getLogger("pika").setLevel(logging.WARNING)
