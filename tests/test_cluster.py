"""Failover of the manager between the nodes of a 3-node RabbitMQ cluster.

The cluster runs on 127.0.0.1 (deploy.rabbitmq.PrivateCluster). The manager
gets all three URLs with node 1 first, so it connects to node 1, and the
test then stops RabbitMQ on node 1 with ``rabbitmqctl stop_app``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator

import pytest

from deploy.rabbitmq import PrivateCluster, RabbitMQNotInstalledError
from messages.client import Client
from messages.models import ContainerState
from tests.conftest import make_node_dir
from tests.helpers import ManagerProcess, pid_alive, wait_until

pytestmark = pytest.mark.root

logger = logging.getLogger(__name__)

CONTAINER_COUNT = 3
# How long the workloads must survive after node 1 stops.
OUTAGE_SECONDS = 10.0
# Time for the manager to reconnect and reply, and for each expected event to arrive.
FAILOVER_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    base_dir = make_node_dir()
    cluster = PrivateCluster(base_dir, size=3)
    try:
        try:
            started_at = time.monotonic()
            cluster.start()
            logger.info("cluster started in %.1f s", time.monotonic() - started_at)
        except RabbitMQNotInstalledError as error:
            if os.environ.get("CI"):
                raise
            pytest.skip(str(error))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def wait_for_event(subscription, container_id: str, name: str, received: list) -> bool:
    """Read events into ``received`` until ``name`` arrives for ``container_id``."""
    deadline = time.monotonic() + FAILOVER_TIMEOUT
    while time.monotonic() < deadline:
        event = subscription.get(1.0)
        if event is None:
            continue
        received.append(event)
        if event.container_id == container_id and event.event == name:
            return True
    return False


def drain_events(subscription, received: list, quiet: float = 2.0) -> None:
    """Read events into ``received`` until none arrives for ``quiet`` seconds."""
    while (event := subscription.get(quiet)) is not None:
        received.append(event)


def test_manager_fails_over_on_node_stop(cluster, run_prefix, tmp_path):
    node_1, node_2, node_3 = cluster.urls
    manager = ManagerProcess(
        f"{node_1},{node_2},{node_3}",
        f"{run_prefix}-{uuid.uuid4().hex[:6]}",
        tmp_path / "manager",
        heartbeat_timeout=20.0,
    )
    node_1_stopped = False
    try:
        manager.start()
        # The subscriber and this client never connect to node 1, so they
        # keep their connection and their event queue through the outage.
        with Client(f"{node_2},{node_3}", manager.manager_id, timeout=FAILOVER_TIMEOUT) as client:
            events = client.subscribe(f"{manager.manager_id}.#")
            pids = {}
            for number in range(CONTAINER_COUNT):
                container_id = f"fail{number}"
                reply = client.request(
                    {"command": "run", "id": container_id, "argv": ["sleep", "infinity"]}
                )
                pids[container_id] = reply.container.pid
            received: list = []
            drain_events(events, received)

            cluster.stop_app(0)
            node_1_stopped = True
            stopped_at = time.monotonic()

            listed = {info.id: info for info in client.request({"command": "list"}).containers}
            logger.info("list replied %.1f s after node 1 stopped", time.monotonic() - stopped_at)
            for container_id, pid in pids.items():
                assert listed[container_id].state == ContainerState.RUNNING, container_id
                assert listed[container_id].pid == pid, container_id

            client.request({"command": "stop", "id": "fail0", "grace": 5})
            assert wait_for_event(events, "fail0", "stopping", received), manager.log_tail()
            assert wait_for_event(events, "fail0", "exited", received), manager.log_tail()

            remaining = OUTAGE_SECONDS - (time.monotonic() - stopped_at)
            if remaining > 0:
                time.sleep(remaining)
            assert manager.process.poll() is None, manager.log_tail()
            for container_id in ("fail1", "fail2"):
                assert pid_alive(pids[container_id]), container_id
            assert not pid_alive(pids["fail0"])

            cluster.start_app(0)
            node_1_stopped = False
            cluster.wait_for_running_nodes(3)

            # Heartbeats may have paused long enough for lost; once every
            # assistant has reconnected, both containers are running again.
            def both_running() -> bool:
                listed = {info.id: info.state for info in client.request({"command": "list"}).containers}
                return all(listed.get(cid) == ContainerState.RUNNING for cid in ("fail1", "fail2"))

            assert wait_until(both_running, 30), manager.log_tail()
            drain_events(events, received)

        ids = [event.event_id for event in received]
        assert len(ids) == len(set(ids)), "an event was published twice"
        for container_id in ("fail1", "fail2"):
            names_seen = [event.event for event in received if event.container_id == container_id]
            assert names_seen[:3] == ["created", "starting", "running"], container_id
            # While the assistants reconnect, heartbeats may pause longer than
            # lost_after: lost, then running again, but never exited.
            assert set(names_seen[3:]) <= {"lost", "running"}, container_id
            assert names_seen[-1] == "running", container_id
    finally:
        manager.cleanup()
        if node_1_stopped:
            cluster.start_app(0)
