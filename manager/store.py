"""Persistent manager state in SQLite: container records and the event outbox.

A state change and the event announcing it are written in one
transaction, so an event is never published for a change that was not
stored, and a stored change always has its event waiting in the outbox.
"""

import logging
import sqlite3
import threading
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
"""


class ContainerRecord(BaseModel):
    """What the manager stores about one container."""

    info: ContainerInfo
    spec: CreateSpec
    sequence: int = Field(default=0, description="sequence number of the last event")
    stop_grace: float | None = Field(
        default=None, description="set while a stop is requested, in seconds"
    )


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
