"""Tests of the scale benchmark's helpers that compute figures from replies, logs and /proc."""

import os
import resource

from bench.common import summarize
from bench.scale import (
    count_log_problems,
    count_states,
    heartbeat_lag,
    open_files_limit,
    parse_time,
    schedule,
)


def container(container_id: str, state: str = "running", heartbeat: str | None = None) -> dict:
    return {"id": container_id, "state": state, "last_heartbeat_at": heartbeat}


def test_parse_time_reads_utc_offsets():
    assert parse_time("1970-01-01T00:00:10Z") == 10.0
    assert parse_time("1970-01-01T00:00:10.5+00:00") == 10.5


def test_heartbeat_lag_against_newest():
    containers = [
        container("a", heartbeat="1970-01-01T00:01:39Z"),
        container("b", heartbeat="1970-01-01T00:01:37Z"),
        container("canary", heartbeat="1970-01-01T00:01:40Z"),
        container("new"),
    ]
    assert heartbeat_lag(containers, excluded={"canary"}) == 3.0


def test_heartbeat_lag_ignores_excluded_oldest():
    containers = [
        container("a", heartbeat="1970-01-01T00:01:39Z"),
        container("canary", heartbeat="1970-01-01T00:00:00Z"),
    ]
    assert heartbeat_lag(containers, excluded={"canary"}) == 0.0


def test_heartbeat_lag_without_heartbeats_is_none():
    assert heartbeat_lag([container("new")], excluded=set()) is None
    assert heartbeat_lag([container("canary", heartbeat="1970-01-01T00:00:00Z")], excluded={"canary"}) is None


def test_count_states_per_state():
    containers = [container("a"), container("b"), container("c", state="lost")]
    assert count_states(containers) == {"running": 2, "lost": 1}


def test_count_log_problems_counts_each_kind():
    lines = [
        "2026-12-04 18:00:00,000 INFO assistant.supervisor: container scale-1: connected to the broker",
        "2026-12-04 18:00:01,000 ERROR assistant.supervisor: container scale-1: no heartbeat reply"
        " from manager m for 10.2 s (timeout 10.0 s); killing the workload",
        "2026-12-04 18:00:02,000 WARNING assistant.supervisor: container scale-2: heartbeat"
        " unroutable, queue berth.heartbeats.m missing",
        "2026-12-04 18:00:03,000 WARNING assistant.supervisor: container scale-2: heartbeat"
        " unroutable, queue berth.heartbeats.m missing",
    ]
    counts = count_log_problems(lines)
    assert counts["heartbeat timeout"] == 1
    assert counts["heartbeat unroutable"] == 2
    assert counts["connection lost"] == 0
    assert sum(counts.values()) == 3


def test_schedule_is_steady():
    offsets = schedule(rate=4.0, duration=2.0)
    assert len(offsets) == 8
    assert offsets[0] == 0.0
    assert offsets[-1] == 1.75
    assert all(later - earlier == 0.25 for earlier, later in zip(offsets, offsets[1:]))


def test_open_files_limit_of_this_process():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = None if soft == resource.RLIM_INFINITY else soft
    assert open_files_limit(os.getpid()) == expected


def test_summarize_nearest_rank_percentiles():
    figures = summarize([float(value) for value in range(1, 201)])
    assert figures["n"] == 200
    assert figures["median"] == 100.5
    assert figures["p90"] == 180.0
    assert figures["p99"] == 198.0
