"""Persistent manager state in SQLite: container records and the event outbox.

A state change and the event announcing it are written in one
transaction, so an event is never published for a change that was not
stored, and a stored change always has its event waiting in the outbox.
"""

import logging
import sqlite3
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from messages.models import ContainerInfo, CreateSpec, Event

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    routing_key TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    request_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    reply TEXT NOT NULL,
    stored_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

REPLY_RETENTION = 7 * 24 * 3600.0
"""Seconds a command's reply is kept for redeliveries and client retries."""


class ContainerRecord(BaseModel):
    """The manager's stored data about one container."""

    info: ContainerInfo
    spec: CreateSpec
    sequence: int = Field(default=0, description="sequence number of the last event")
    stop_grace: float | None = Field(
        default=None, description="set while a stop is requested, in seconds"
    )
    assistant_token: str = Field(default="", description="id of the container's assistant")


class Store:
    """Thread-safe: every method takes the store's own lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL lets the outbox be read while a change is written; NORMAL
        # syncs at checkpoints, which survives a process crash (not a power
        # loss of the last transactions).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        log.info("state database %s opened", path)

    def load(self) -> list[ContainerRecord]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM containers").fetchall()
        return [ContainerRecord.model_validate_json(row[0]) for row in rows]

    def save(self, record: ContainerRecord, event: Event | None = None, routing_key: str = "") -> None:
        """Store the record and, in the same transaction, its event."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO containers (id, record) VALUES (?, ?)",
                    (record.info.id, record.model_dump_json()),
                )
                if event is not None:
                    self._db.execute(
                        "INSERT INTO outbox (routing_key, body) VALUES (?, ?)",
                        (routing_key, event.model_dump_json()),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def next_epoch(self) -> int:
        """Return the epoch of this manager run: the start time in milliseconds.

        Time-based, so that a manager started with an empty state directory
        still has a newer epoch than the run before it; one more than the
        stored epoch when the clock went back.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            previous = int(row[0]) if row else 0
            epoch = max(previous + 1, int(time.time() * 1000))
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('epoch', ?)", (str(epoch),)
            )
            self._db.execute("COMMIT")
        return epoch

    def save_event(self, event: Event, routing_key: str) -> None:
        """Queue an event that changes no container record."""
        with self._lock:
            self._db.execute(
                "INSERT INTO outbox (routing_key, body) VALUES (?, ?)",
                (routing_key, event.model_dump_json()),
            )

    def find_reply(self, request_id: str) -> tuple[str, str] | None:
        """Return (command fingerprint, reply JSON) of a request id already handled."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, reply FROM replies WHERE request_id = ?", (request_id,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def save_reply(self, request_id: str, fingerprint: str, reply_json: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replies (request_id, fingerprint, reply, stored_at)"
                " VALUES (?, ?, ?, ?)",
                (request_id, fingerprint, reply_json, time.time()),
            )

    def prune_replies(self) -> int:
        """Forget replies older than REPLY_RETENTION; return how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM replies WHERE stored_at < ?", (time.time() - REPLY_RETENTION,)
            )
        return cursor.rowcount

    def pending_events(self, limit: int = 100) -> list[tuple[int, str, str]]:
        """Return up to ``limit`` unpublished events as (position, key, body)."""
        with self._lock:
            return self._db.execute(
                "SELECT position, routing_key, body FROM outbox ORDER BY position LIMIT ?",
                (limit,),
            ).fetchall()

    def remove_events(self, up_to_position: int) -> None:
        """Drop published events, all of them up to and including the position."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE position <= ?", (up_to_position,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
