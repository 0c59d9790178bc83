"""IPv4 address management for one manager's bridge, persisted in SQLite.

Allocations live in their own database file in the manager's state
directory, next to the state database, so they survive a manager restart.
Before handing out an address the pool also calls back for the addresses
configured in namespaces it has no record of, so a lost database does not
lead to an address being handed out twice.
"""

import ipaddress
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS allocations (
    container_id TEXT PRIMARY KEY,
    address TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class PoolExhausted(RuntimeError):
    """Every host address of the subnet is allocated or in use."""


class AddressPool:
    """Thread-safe allocator of the host addresses of one subnet.

    The subnet's first host address belongs to the bridge (the gateway).
    Allocation walks the subnet from the address after the last one handed
    out, so a released address is reused as late as possible and stale ARP
    entries of other containers have time to expire.
    """

    def __init__(self, database: Path):
        database.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL syncs at checkpoints, not at every commit. An allocation
        # still survives a manager crash. One lost with a power failure does
        # no harm, because no network namespace survives a power failure.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.path = database

    # --- settings ---------------------------------------------------------

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value)
            )

    # --- allocations ------------------------------------------------------

    def allocations(self) -> dict[str, ipaddress.IPv4Address]:
        """Return every recorded allocation by container id."""
        with self._lock:
            rows = self._db.execute("SELECT container_id, address FROM allocations").fetchall()
        return {container_id: ipaddress.IPv4Address(address) for container_id, address in rows}

    def allocate(
        self,
        container_id: str,
        subnet: ipaddress.IPv4Network,
        configured: Callable[[set[str]], set[ipaddress.IPv4Address]],
    ) -> ipaddress.IPv4Address:
        """Allocate a free address of ``subnet`` to a container and store it.

        A container that already has an address in the subnet keeps it.
        ``configured`` receives the container ids with a record and returns
        addresses in use on the host by other containers. It runs under the
        pool's lock, so it must not call the pool. Raises PoolExhausted.
        """
        with self._lock:
            row = self._db.execute(
                "SELECT address FROM allocations WHERE container_id = ?", (container_id,)
            ).fetchone()
            if row is not None:
                address = ipaddress.IPv4Address(row[0])
                if address in subnet:
                    return address
                self._db.execute("DELETE FROM allocations WHERE container_id = ?", (container_id,))

            rows = self._db.execute("SELECT container_id, address FROM allocations").fetchall()
            recorded = {ipaddress.IPv4Address(address) for _, address in rows}
            in_use = recorded | configured({container_id for container_id, _ in rows})
            hosts = list(subnet.hosts())[1:]  # the first host address is the gateway
            if not hosts:
                raise PoolExhausted(f"subnet {subnet} has no host address for containers")
            start = self._cursor(subnet, hosts)
            for step in range(len(hosts)):
                candidate = hosts[(start + step) % len(hosts)]
                if candidate in in_use:
                    continue
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.execute(
                        "INSERT INTO allocations (container_id, address) VALUES (?, ?)",
                        (container_id, str(candidate)),
                    )
                    self._db.execute(
                        "INSERT OR REPLACE INTO settings (key, value) VALUES ('last_address', ?)",
                        (str(candidate),),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                return candidate
        raise PoolExhausted(
            f"no free address left in subnet {subnet} ({len(hosts)} container addresses,"
            f" {len(in_use)} in use); delete containers or configure a larger subnet"
        )

    def _cursor(self, subnet: ipaddress.IPv4Network, hosts: list[ipaddress.IPv4Address]) -> int:
        """Return the index in ``hosts`` after the last address handed out."""
        row = self._db.execute("SELECT value FROM settings WHERE key = 'last_address'").fetchone()
        if row is None:
            return 0
        last = ipaddress.IPv4Address(row[0])
        if last not in subnet or last <= hosts[0]:
            return 0
        return (int(last) - int(hosts[0]) + 1) % len(hosts)

    def release(self, container_id: str) -> ipaddress.IPv4Address | None:
        """Forget a container's address; return it, or None when it had none."""
        with self._lock:
            row = self._db.execute(
                "SELECT address FROM allocations WHERE container_id = ?", (container_id,)
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM allocations WHERE container_id = ?", (container_id,))
        return ipaddress.IPv4Address(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
