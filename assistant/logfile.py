"""Store a container's stdout and stderr as JSON lines with size-capped rotation.

Each record is one line ``{"stream": "stdout"|"stderr", "time": ISO-8601 UTC,
"line": str}``, the shape of ``messages.models.LogLine``. The assistant writes
records with ``drain`` and ``RotatingLog``. The manager reads them back with
``read_lines``.

Rotation renames ``path`` to ``path.1``, ``path.1`` to ``path.2`` and so on, so
a higher suffix is an older file.
"""

import errno
import json
import logging
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from json.encoder import encode_basestring
from typing import BinaryIO

logger = logging.getLogger(__name__)

STREAMS = ("stdout", "stderr")

SUMMARY_INTERVAL = 60.0
"""Minimum time in seconds between two warnings about the same write failure."""

READ_SIZE = 64 * 1024
"""Bytes requested per read from a pipe, the default Linux pipe capacity (pipe(7))."""

FILE_BLOCK_SIZE = 1024 * 1024
"""Bytes read per step when a log file is read from its end."""


def _format_time(moment: datetime) -> str:
    """Format a UTC time as ISO 8601 with microseconds and a Z suffix.

    For example 2024-05-01T12:00:00.123456Z, which pydantic parses as a UTC datetime.
    """
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class RotatingLog:
    """Append-only JSON lines file that rotates at ``max_bytes``.

    At most ``max_files`` files exist, the current one included. Each file
    stays at or below ``max_bytes`` unless it contains a single larger record,
    so while records are smaller than ``max_bytes`` the total stays at or below
    ``max_files * max_bytes``.

    All methods are thread-safe. Write failures such as ENOSPC or EIO never
    raise: the records are dropped, the failure is logged once, a summary with
    the number of dropped records follows at most every ``SUMMARY_INTERVAL``
    seconds of ``clock``, and recovery is logged at INFO.
    """

    def __init__(
        self,
        path: pathlib.Path,
        max_bytes: int = 10 * 1024 * 1024,
        max_files: int = 3,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open ``path`` for appending and create it if missing.

        Raises OSError when the file cannot be opened, for example because its
        directory does not exist. A torn last record left by an earlier
        process is cut off so that new records start on a line of their own.
        """
        if max_bytes < 1:
            raise ValueError(f"invalid max_bytes {max_bytes}: it must be at least 1")
        if max_files < 1:
            raise ValueError(f"invalid max_files {max_files}: it must be at least 1")

        self.path = pathlib.Path(path)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = False

        # File size after the last complete record. When a failed write left a
        # partial record behind and truncating it failed too, _torn is True and
        # the next write truncates to _size first.
        self._size = 0
        self._torn = False

        # State of the current run of failed writes.
        self._failing = False
        self._dropped = 0
        self._last_warning_at = 0.0

        self._fd: int | None = None
        self._open_current()
        self._remove_excess_rotated()

    def write_line(self, stream: str, line: bytes) -> None:
        """Append one record for ``line``, timestamped now.

        ``line`` is without its trailing newline and is decoded as UTF-8, with invalid
        bytes replaced by U+FFFD. Raises ValueError for an unknown stream.
        """
        self.write_lines(stream, [line])

    def write_lines(self, stream: str, lines: Iterable[bytes]) -> None:
        """Append one record per line, all with the same timestamp, in one write where possible.

        The lock is held for the whole call, so another thread's records never
        land between these records.
        """
        if stream not in STREAMS:
            raise ValueError(f"invalid stream {stream!r}: expected one of {', '.join(STREAMS)}")

        lines = list(lines)
        if not lines:
            return
        texts = _decode_lines(lines)
        now = _format_time(datetime.now(timezone.utc))
        head = f'{{"stream": "{stream}", "time": "{now}", "line": '
        # encode_basestring is the str encoder of json.dumps(ensure_ascii=False),
        # so non-ASCII text stays UTF-8 in the file instead of \uXXXX escapes.
        # It escapes every newline, so each b"\n" in data ends a record.
        separator = "}\n" + head
        data = (head + separator.join(map(encode_basestring, texts)) + "}\n").encode("utf-8")

        with self._lock:
            if self._closed:
                return
            self._write_records(data)

    def close(self) -> None:
        """Close the file. Later writes are dropped without a log message."""
        with self._lock:
            self._closed = True
            self._close_fd()
            if self._failing:
                logger.warning(
                    "closed container log %s after dropping %d records because writes failed",
                    self.path,
                    self._dropped,
                )

    # --- writing, called with the lock held -----------------------------

    def _write_records(self, data: bytes) -> None:
        """Write ``data``, rotating as needed. Every b"\n" in ``data`` ends a record."""
        position = 0
        while position < len(data):
            first_end = data.index(b"\n", position) + 1
            try:
                self._prepare_for(first_end - position)
            except OSError as error:
                self._note_failure(data.count(b"\n", position), error)
                return

            # Take as many records as fit in the current file, and always the first.
            room = self.max_bytes - self._size
            end = data.rfind(b"\n", position, position + room) + 1
            end = max(end, first_end)

            written, error = self._write_batch(data[position:end])
            if error is not None:
                self._note_failure(data.count(b"\n", position + written), error)
                return
            position = end

        self._note_success()

    def _prepare_for(self, record_size: int) -> None:
        """Reopen, repair or rotate the current file so that a ``record_size`` record fits."""
        if self._fd is None:
            self._open_current()
        if self._torn:
            os.ftruncate(self._fd, self._size)
            self._torn = False
        if self._size > 0 and self._size + record_size > self.max_bytes:
            self._rotate()

    def _write_batch(self, batch: bytes) -> tuple[int, OSError | None]:
        """Write ``batch`` and return the bytes of complete records written and the error, if any.

        After a short write, the file is truncated back to the end of the last
        complete record, so that a reader never sees a torn record in the middle.
        """
        view = memoryview(batch)
        start = self._size
        offset = 0
        try:
            while offset < len(batch):
                count = os.write(self._fd, view[offset:])
                if count == 0:
                    raise OSError(errno.EIO, "write returned 0 bytes")
                offset += count
        except OSError as error:
            complete_size = batch.rfind(b"\n", 0, offset) + 1
            self._size = start + complete_size
            if offset > complete_size:
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    self._torn = True
            return complete_size, error

        self._size = start + len(batch)
        return len(batch), None

    def _rotate(self) -> None:
        """Shift path.N to path.N+1, drop the file beyond ``max_files`` and start an empty file."""
        self._close_fd()
        if self.max_files == 1:
            self.path.unlink(missing_ok=True)
        else:
            for number in range(self.max_files - 1, 0, -1):
                source = self._rotated_path(number - 1) if number > 1 else self.path
                target = self._rotated_path(number)
                # rename replaces the oldest file, so no unlink is needed first.
                try:
                    os.rename(source, target)
                except FileNotFoundError:
                    pass
        self._open_current()

    def _rotated_path(self, number: int) -> pathlib.Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def _open_current(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            with open(self.path, "rb") as file:
                complete_size = _complete_size(file, size)
            if complete_size < size:
                os.ftruncate(fd, complete_size)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        self._size = complete_size
        self._torn = False

    def _close_fd(self) -> None:
        if self._fd is None:
            return
        fd = self._fd
        self._fd = None
        try:
            os.close(fd)
        except OSError as error:
            logger.warning("failed to close container log %s: %s", self.path, error)

    def _remove_excess_rotated(self) -> None:
        """Delete rotated files that a larger ``max_files`` of an earlier run left behind."""
        for number, rotated in _rotated_files(self.path):
            if number >= self.max_files:
                rotated.unlink(missing_ok=True)

    # --- failure reporting ---------------------------------------------

    def _note_failure(self, dropped: int, error: OSError) -> None:
        now = self._clock()
        if not self._failing:
            self._failing = True
            self._dropped = dropped
            self._last_warning_at = now
            logger.warning(
                "failed to write container log %s: %s. Dropping output until a write succeeds",
                self.path,
                error,
            )
            return

        self._dropped += dropped
        if now - self._last_warning_at >= SUMMARY_INTERVAL:
            self._last_warning_at = now
            logger.warning(
                "still failing to write container log %s: %s. %d records dropped so far",
                self.path,
                error,
                self._dropped,
            )

    def _note_success(self) -> None:
        if not self._failing:
            return
        logger.info(
            "writing container log %s again after dropping %d records",
            self.path,
            self._dropped,
        )
        self._failing = False
        self._dropped = 0


def _complete_size(file: BinaryIO, size: int) -> int:
    """Return the offset just past the last newline in the first ``size`` bytes of ``file``."""
    end = size
    while end > 0:
        start = max(0, end - FILE_BLOCK_SIZE)
        file.seek(start)
        newline = file.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def _decode_lines(lines: list[bytes]) -> list[str]:
    """Decode each line as UTF-8 with invalid bytes replaced by U+FFFD."""
    # One decode of the joined lines is faster than one per line for short lines. It
    # gives the same text as decoding each line alone because b"\n" is never
    # part of a multi-byte sequence, so the decoder ends a truncated sequence there.
    texts = b"\n".join(lines).decode("utf-8", "replace").split("\n")
    if len(texts) != len(lines):
        # A line contains b"\n" itself.
        texts = [line.decode("utf-8", "replace") for line in lines]
    return texts


def drain(fd: int, stream: str, log: RotatingLog, max_line: int = 16 * 1024) -> None:
    """Read ``fd`` until EOF and write each line to ``log``, then close ``fd``.

    Meant as a thread target for the read end of a workload's pipe. A final
    line without a newline is written at EOF. A line longer than ``max_line``
    bytes becomes several records of ``max_line`` bytes, which may cut a
    multi-byte character in two.

    Reading continues while writes fail, so a full disk does not block the
    workload. NOTE: a workload that writes faster than records can be stored
    still waits on the full pipe. The cost is per record, so short lines are
    the slowest case.
    """
    if stream not in STREAMS:
        raise ValueError(f"invalid stream {stream!r}: expected one of {', '.join(STREAMS)}")
    if max_line < 1:
        raise ValueError(f"invalid max_line {max_line}: it must be at least 1")

    pending = b""
    try:
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except OSError as error:
                # Closing the read end makes the workload's next write fail with EPIPE.
                logger.error(
                    "failed to read %s of the workload from fd %d, stopping: %s", stream, fd, error
                )
                break
            if not chunk:
                break

            data = pending + chunk
            last_newline = data.rfind(b"\n")
            if last_newline < 0:
                lines: list[bytes] = []
                pending = data
            else:
                lines = _split_long(data[:last_newline].split(b"\n"), max_line)
                pending = data[last_newline + 1 :]

            # Emit the head of an unfinished line once it exceeds max_line, so that
            # memory stays bounded. Keeping up to max_line bytes gives the same
            # records as splitting the complete line would.
            while len(pending) > max_line:
                lines.append(pending[:max_line])
                pending = pending[max_line:]

            _write_safely(log, stream, lines)

        if pending:
            _write_safely(log, stream, [pending])
    finally:
        os.close(fd)


def _split_long(lines: list[bytes], max_line: int) -> list[bytes]:
    if max(map(len, lines)) <= max_line:
        return lines
    pieces = []
    for line in lines:
        if len(line) <= max_line:
            pieces.append(line)
            continue
        for start in range(0, len(line), max_line):
            pieces.append(line[start : start + max_line])
    return pieces


def _write_safely(log: RotatingLog, stream: str, lines: list[bytes]) -> None:
    if not lines:
        return
    try:
        log.write_lines(stream, lines)
    except Exception:
        # write_lines handles OSError itself, so this is a bug. Draining goes on
        # because a workload blocked on a full pipe is worse than lost output.
        logger.exception(
            "dropped %d %s records of %s after an unexpected error", len(lines), stream, log.path
        )


def read_lines(path: pathlib.Path, tail: int | None = None) -> list[dict]:
    """Read the records of ``path`` and its rotated files, oldest first.

    ``tail`` keeps only the last ``tail`` records. A torn last line, such as a
    record that is still being written, is skipped. Another line that is not
    a JSON object is skipped with a warning.

    NOTE: a rotation while this runs can drop the oldest file from the result.
    Opening the current file first and skipping files already opened (by
    inode) keeps records from appearing twice.
    """
    if tail is not None and tail < 0:
        raise ValueError(f"invalid tail {tail}: it must be at least 0")
    if tail == 0:
        return []

    path = pathlib.Path(path)
    candidates = [path] + [rotated for _, rotated in _rotated_files(path)]
    files = []  # newest first
    seen: set[tuple[int, int]] = set()
    try:
        for candidate in candidates:
            try:
                file = open(candidate, "rb")
            except FileNotFoundError:
                continue
            status = os.fstat(file.fileno())
            if (status.st_dev, status.st_ino) in seen:
                file.close()
                continue
            seen.add((status.st_dev, status.st_ino))
            files.append(file)

        records: list[dict] = []
        for file in files:
            needed = None if tail is None else tail - len(records)
            # Records of newer files are already in the list, so these go in front.
            records[:0] = _read_file_records(file, needed)
            if tail is not None and len(records) >= tail:
                break
    finally:
        for file in files:
            file.close()

    if tail is not None:
        return records[-tail:]
    return records


def _read_file_records(file: BinaryIO, needed: int | None) -> list[dict]:
    """Return the valid records of ``file``, or only its last ``needed`` ones."""
    lines: Iterable[bytes]
    if needed is None:
        lines = file.read().split(b"\n")
        # The part after the last newline is a torn or unfinished record.
        lines.pop()
    else:
        lines = _reversed_lines(file)

    records = []
    invalid = 0
    for line in lines:
        record = _parse_record(line)
        if record is None:
            invalid += 1
            continue
        records.append(record)
        if len(records) == needed:
            break
    if invalid:
        logger.warning("skipped %d invalid lines in container log %s", invalid, file.name)

    if needed is not None:
        records.reverse()
    return records


def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    return record


def _reversed_lines(file: BinaryIO) -> Iterator[bytes]:
    """Yield the complete lines of ``file`` from last to first, without the newline."""
    end = _complete_size(file, os.fstat(file.fileno()).st_size)
    if end == 0:
        return
    # Start of the earliest line read so far, which may continue in earlier bytes.
    pending = b""
    first_block = True
    while end > 0:
        start = max(0, end - FILE_BLOCK_SIZE)
        file.seek(start)
        parts = (file.read(end - start) + pending).split(b"\n")
        end = start
        if first_block:
            # The data ends with a newline, so the last part is empty.
            parts.pop()
            first_block = False
        pending = parts[0]
        for line in reversed(parts[1:]):
            yield line
    yield pending


def _rotated_files(path: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """Return the rotated files of ``path`` as (number, path), newest first."""
    prefix = path.name + "."
    found = []
    try:
        entries = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    for name in entries:
        if not name.startswith(prefix):
            continue
        suffix = name[len(prefix) :]
        if suffix.isdigit() and suffix.isascii():
            found.append((int(suffix), path.with_name(name)))
    found.sort()
    return found


def remove_logs(path: pathlib.Path) -> None:
    """Delete ``path`` and every rotated file of it. Missing files are ignored."""
    path = pathlib.Path(path)
    path.unlink(missing_ok=True)
    for _, rotated in _rotated_files(path):
        rotated.unlink(missing_ok=True)
