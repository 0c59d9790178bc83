import errno
import logging
import os
import pathlib
import random
import subprocess
import sys
import threading

import pytest

from assistant.logfile import SUMMARY_INTERVAL, RotatingLog, drain, read_lines, remove_logs
from messages.models import LogLine

LOGGER_NAME = "assistant.logfile"


class FakeClock:
    """Monotonic clock that moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain_bytes(
    chunks: list[bytes], log: RotatingLog, stream: str = "stdout", max_line: int = 16 * 1024
) -> None:
    """Feed ``chunks`` through a real pipe, one write each, and drain it into ``log``."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        try:
            for chunk in chunks:
                os.write(write_end, chunk)
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed)
    feeder.start()
    drain(read_end, stream, log, max_line=max_line)
    feeder.join()


def texts(records: list[dict]) -> list[str]:
    return [record["line"] for record in records]


def file_sizes(directory: pathlib.Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in directory.iterdir()}


def log_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == LOGGER_NAME and record.levelno == level
    ]


# --- records and ordering ---------------------------------------------------


def test_record_matches_logline(tmp_path):
    log = RotatingLog(tmp_path / "log")
    log.write_line("stderr", b"hello")
    log.close()

    [record] = read_lines(tmp_path / "log")

    assert set(record) == {"stream", "time", "line"}
    parsed = LogLine.model_validate(record)
    assert parsed.stream == "stderr"
    assert parsed.line == "hello"
    assert parsed.time.utcoffset().total_seconds() == 0
    assert record["time"].endswith("Z")


def test_order_kept_across_streams(tmp_path):
    log = RotatingLog(tmp_path / "log")
    expected = []
    for number in range(200):
        stream = "stdout" if number % 3 else "stderr"
        log.write_line(stream, f"line {number}".encode())
        expected.append((stream, f"line {number}"))
    log.close()

    records = read_lines(tmp_path / "log")

    assert [(record["stream"], record["line"]) for record in records] == expected
    times = [record["time"] for record in records]
    assert times == sorted(times)


def test_concurrent_writers_keep_stream_order(tmp_path):
    log = RotatingLog(tmp_path / "log", max_bytes=64 * 1024, max_files=100)
    count = 5000

    def write(stream: str) -> None:
        for number in range(count):
            log.write_line(stream, f"{stream} {number}".encode())

    threads = [threading.Thread(target=write, args=(stream,)) for stream in ("stdout", "stderr")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()

    records = read_lines(tmp_path / "log")

    assert len(records) == 2 * count
    for stream in ("stdout", "stderr"):
        lines = [record["line"] for record in records if record["stream"] == stream]
        assert lines == [f"{stream} {number}" for number in range(count)]


def test_write_lines_shares_one_timestamp(tmp_path):
    log = RotatingLog(tmp_path / "log")
    log.write_lines("stdout", [b"a", b"", b"c"])
    log.close()

    records = read_lines(tmp_path / "log")

    assert texts(records) == ["a", "", "c"]
    assert len({record["time"] for record in records}) == 1


def test_unknown_stream_rejected(tmp_path):
    log = RotatingLog(tmp_path / "log")

    with pytest.raises(ValueError, match="invalid stream 'stdin'"):
        log.write_line("stdin", b"x")
    log.close()


def test_special_characters_round_trip(tmp_path):
    log = RotatingLog(tmp_path / "log")
    lines = [
        'quote " backslash \\ tab \t',
        "nul \x00 escape \x1b[0m",
        "é ü 漢字 🚀",
        "cr\r",
        "\u2028",
    ]
    for line in lines:
        log.write_line("stdout", line.encode())
    log.write_line("stdout", b"embedded\nnewline")
    log.close()

    records = read_lines(tmp_path / "log")

    assert texts(records) == lines + ["embedded\nnewline"]
    raw = (tmp_path / "log").read_bytes()
    assert raw.count(b"\n") == len(lines) + 1
    assert "漢字".encode() in raw


# --- decoding ---------------------------------------------------------------


def test_invalid_utf8_replaced(tmp_path):
    log = RotatingLog(tmp_path / "log")
    log.write_line("stdout", b"bad \xff\xfe end")
    log.write_line("stdout", b"truncated \xe2\x82")
    log.write_line("stdout", b"\xc3")
    log.close()

    records = read_lines(tmp_path / "log")

    assert texts(records) == ["bad \ufffd\ufffd end", "truncated \ufffd", "\ufffd"]


def test_batch_decode_matches_per_line(tmp_path):
    # write_lines decodes the joined lines at once. Each line must still get
    # the text that decoding it alone gives.
    generator = random.Random(7)
    alphabet = [b"a", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xf0\x9f", b"\x98\x80", b"\xff"]
    lines = []
    for _ in range(2000):
        length = generator.randrange(0, 8)
        lines.append(b"".join(generator.choice(alphabet) for _ in range(length)))
    log = RotatingLog(tmp_path / "log")
    log.write_lines("stdout", lines)
    log.close()

    records = read_lines(tmp_path / "log")

    assert texts(records) == [line.decode("utf-8", "replace") for line in lines]


# --- draining ---------------------------------------------------------------


def test_drain_writes_final_partial_line(tmp_path):
    log = RotatingLog(tmp_path / "log")

    drain_bytes([b"first\nsecond\n\nno newline"], log)
    log.close()

    assert texts(read_lines(tmp_path / "log")) == ["first", "second", "", "no newline"]


def test_drain_splits_overlong_lines(tmp_path):
    log = RotatingLog(tmp_path / "log")
    data = b"a" * 25 + b"\n" + b"b" * 10 + b"\n" + b"c" * 20 + b"\n" + b"d" * 13

    drain_bytes([data], log, max_line=10)
    log.close()

    assert texts(read_lines(tmp_path / "log")) == [
        "a" * 10,
        "a" * 10,
        "a" * 5,
        "b" * 10,
        "c" * 10,
        "c" * 10,
        "d" * 10,
        "d" * 3,
    ]


def test_drain_records_independent_of_chunking(tmp_path):
    data = b"a" * 25 + b"\n" + b"b" * 10 + b"\n\n" + b"c" * 20 + b"\nshort\n" + b"d" * 13
    results = []
    for piece_size in (1, 3, 10, 11, len(data)):
        path = tmp_path / f"log-{piece_size}"
        log = RotatingLog(path)
        chunks = [data[start : start + piece_size] for start in range(0, len(data), piece_size)]

        drain_bytes(chunks, log, max_line=10)
        log.close()

        results.append(texts(read_lines(path)))

    for result in results[1:]:
        assert result == results[0]
    assert "".join(results[0]) == data.replace(b"\n", b"").decode()


def test_drain_closes_fd(tmp_path):
    log = RotatingLog(tmp_path / "log")
    read_end, write_end = os.pipe()
    os.close(write_end)

    drain(read_end, "stdout", log)
    log.close()

    with pytest.raises(OSError) as raised:
        os.fstat(read_end)
    assert raised.value.errno == errno.EBADF


def test_drain_from_subprocess(tmp_path):
    log = RotatingLog(tmp_path / "log", max_bytes=64 * 1024 * 1024)
    read_end, write_end = os.pipe()
    process = subprocess.Popen(["sh", "-c", "yes berth | head -c 3000000"], stdout=write_end)
    os.close(write_end)

    drain(read_end, "stdout", log)
    assert process.wait(timeout=60) == 0
    log.close()

    records = read_lines(tmp_path / "log")
    assert len(records) == 3_000_000 // len(b"berth\n")
    assert {record["line"] for record in records} == {"berth"}
    assert {record["stream"] for record in records} == {"stdout"}


def test_drain_two_streams_from_subprocess(tmp_path):
    script = (
        "import sys\n"
        "for number in range(20000):\n"
        "    stream = sys.stdout if number % 2 else sys.stderr\n"
        "    stream.write(f'{number}\\n')\n"
        "sys.stdout.write('tail without newline')\n"
    )
    log = RotatingLog(tmp_path / "log", max_bytes=128 * 1024, max_files=100)
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=stdout_write, stderr=stderr_write
    )
    os.close(stdout_write)
    os.close(stderr_write)
    threads = [
        threading.Thread(target=drain, args=(stdout_read, "stdout", log)),
        threading.Thread(target=drain, args=(stderr_read, "stderr", log)),
    ]
    for thread in threads:
        thread.start()

    assert process.wait(timeout=60) == 0
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    log.close()

    records = read_lines(tmp_path / "log")
    stdout_lines = [record["line"] for record in records if record["stream"] == "stdout"]
    stderr_lines = [record["line"] for record in records if record["stream"] == "stderr"]
    assert stdout_lines == [str(number) for number in range(1, 20000, 2)] + ["tail without newline"]
    assert stderr_lines == [str(number) for number in range(0, 20000, 2)]


# --- rotation -----------------------------------------------------------------


def test_rotation_caps_total_size(tmp_path):
    max_bytes = 256 * 1024
    max_files = 3
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=max_bytes, max_files=max_files)
    written = 0
    number = 0
    while written < 5 * 1024 * 1024:
        line = f"{number:08d} ".encode() + b"x" * 100
        log.write_line("stdout", line)
        written += len(line) + 1
        number += 1
    last_number = number - 1
    log.close()

    sizes = file_sizes(tmp_path)
    record_size = len(path.read_bytes().split(b"\n")[0]) + 1
    assert set(sizes) == {"log", "log.1", "log.2"}
    assert sum(sizes.values()) <= max_files * max_bytes + record_size
    for name, size in sizes.items():
        assert size <= max_bytes, name
    assert sizes["log.1"] > max_bytes - record_size
    assert sizes["log.2"] > max_bytes - record_size

    records = read_lines(path)
    numbers = [int(record["line"][:8]) for record in records]
    assert numbers[-1] == last_number
    assert numbers == list(range(numbers[0], last_number + 1))
    assert len(records) * record_size > (max_files - 1) * max_bytes


def test_rotation_with_one_file(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=1000, max_files=1)
    for number in range(100):
        log.write_line("stdout", f"line {number}".encode())
    log.close()

    assert set(file_sizes(tmp_path)) == {"log"}
    assert path.stat().st_size <= 1000
    assert texts(read_lines(path))[-1] == "line 99"


def test_record_larger_than_max_bytes_kept(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=100, max_files=2)
    log.write_line("stdout", b"small")
    log.write_line("stdout", b"x" * 500)
    log.write_line("stdout", b"after")
    log.close()

    assert texts(read_lines(path)) == ["x" * 500, "after"]


def test_excess_rotated_files_removed_on_open(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=100, max_files=5)
    for number in range(50):
        log.write_line("stdout", f"line {number}".encode())
    log.close()
    assert (tmp_path / "log.4").exists()

    RotatingLog(path, max_bytes=100, max_files=2).close()

    assert set(file_sizes(tmp_path)) == {"log", "log.1"}


# --- reading ------------------------------------------------------------------


def test_tail_returns_last_records(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=2000, max_files=4)
    for number in range(100):
        log.write_line("stdout", f"line {number}".encode())
    log.close()
    all_lines = texts(read_lines(path))
    assert len(file_sizes(tmp_path)) == 4

    assert texts(read_lines(path, tail=5)) == all_lines[-5:]
    assert texts(read_lines(path, tail=1)) == all_lines[-1:]
    # The current file is small after rotation, so this tail spans several files.
    assert texts(read_lines(path, tail=40)) == all_lines[-40:]
    assert texts(read_lines(path, tail=len(all_lines) + 10)) == all_lines
    assert read_lines(path, tail=0) == []
    with pytest.raises(ValueError, match="invalid tail -1"):
        read_lines(path, tail=-1)


def test_tail_on_large_file(tmp_path):
    # Lines long enough that the tail spans several read blocks.
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=64 * 1024 * 1024)
    for number in range(300):
        log.write_line("stdout", f"{number} ".encode() + b"y" * 20000)
    log.close()

    records = read_lines(path, tail=150)

    assert [int(line.split()[0]) for line in texts(records)] == list(range(150, 300))


def test_missing_log_reads_empty(tmp_path):
    assert read_lines(tmp_path / "log") == []
    assert read_lines(tmp_path / "missing-directory" / "log", tail=10) == []


def test_torn_last_line_skipped(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path)
    log.write_line("stdout", b"one")
    log.write_line("stdout", b"two")
    log.close()
    with open(path, "ab") as file:
        file.write(b'{"stream": "stdout", "ti')

    assert texts(read_lines(path)) == ["one", "two"]
    assert texts(read_lines(path, tail=1)) == ["two"]


def test_reopen_cuts_torn_last_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    path = tmp_path / "log"
    log = RotatingLog(path)
    log.write_line("stdout", b"one")
    log.close()
    with open(path, "ab") as file:
        file.write(b'{"stream": "stdout", "ti')

    log = RotatingLog(path)
    log.write_line("stdout", b"two")
    log.close()

    assert texts(read_lines(path)) == ["one", "two"]
    assert path.read_bytes().endswith(b'"line": "two"}\n')
    assert log_messages(caplog, logging.WARNING) == []


def test_invalid_middle_line_skipped_with_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    path = tmp_path / "log"
    log = RotatingLog(path)
    log.write_line("stdout", b"one")
    log.close()
    with open(path, "ab") as file:
        file.write(b"not json\n[1, 2]\n")
    log = RotatingLog(path)
    log.write_line("stdout", b"two")
    log.close()

    assert texts(read_lines(path)) == ["one", "two"]
    assert texts(read_lines(path, tail=2)) == ["one", "two"]
    warnings = log_messages(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert "skipped 2 invalid lines" in warnings[0]
    assert str(path) in warnings[0]


def test_remove_logs_deletes_rotated_files(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path, max_bytes=100, max_files=3)
    for number in range(20):
        log.write_line("stdout", f"line {number}".encode())
    log.close()
    (tmp_path / "log.txt").write_text("unrelated")
    (tmp_path / "log.1.bak").write_text("unrelated")
    (tmp_path / "other.1").write_text("unrelated")
    assert {"log", "log.1", "log.2"} <= set(file_sizes(tmp_path))

    remove_logs(path)

    assert set(file_sizes(tmp_path)) == {"log.txt", "log.1.bak", "other.1"}
    assert read_lines(path) == []
    remove_logs(path)


# --- write failures -------------------------------------------------------------


def test_write_after_close_dropped(tmp_path):
    path = tmp_path / "log"
    log = RotatingLog(path)
    log.write_line("stdout", b"kept")
    log.close()

    log.write_line("stdout", b"dropped")

    assert texts(read_lines(path)) == ["kept"]


def test_io_error_logs_once_then_summary(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    path = tmp_path / "log"
    clock = FakeClock()
    log = RotatingLog(path, clock=clock)
    log.write_line("stdout", b"before")
    real_write = os.write
    failing = True

    def write(fd: int, data: bytes) -> int:
        # Fail only writes to this log, not pytest's own output.
        if failing and os.readlink(f"/proc/self/fd/{fd}") == str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)

    for number in range(10):
        log.write_line("stdout", f"lost {number}".encode())
        clock.now += 1
    warnings = log_messages(caplog, logging.WARNING)
    assert len(warnings) == 1
    assert str(path) in warnings[0]
    assert "Input/output error" in warnings[0]

    clock.now += SUMMARY_INTERVAL
    log.write_line("stdout", b"lost 10")
    log.write_line("stdout", b"lost 11")
    warnings = log_messages(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert "11 records dropped" in warnings[1]

    failing = False
    log.write_line("stdout", b"after")
    log.close()

    infos = log_messages(caplog, logging.INFO)
    assert len(infos) == 1
    assert "after dropping 12 records" in infos[0]
    assert str(path) in infos[0]
    assert len(log_messages(caplog, logging.WARNING)) == 2
    assert texts(read_lines(path)) == ["before", "after"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a 1 MiB tmpfs and unmount it after the test."""
    if os.geteuid() != 0:
        pytest.skip("requires root")
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill_filesystem(directory: pathlib.Path) -> pathlib.Path:
    """Write a file in ``directory`` until the filesystem returns ENOSPC, and return its path."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as file:
        while True:
            try:
                file.write(block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                return filler


@pytest.mark.root
def test_full_disk_drain_keeps_reading(small_tmpfs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    path = small_tmpfs / "log"
    clock = FakeClock()
    log = RotatingLog(path, clock=clock)
    try:
        # The log stays empty, because a tmpfs file with a partly used page
        # would accept writes into that page even when the filesystem is full.
        filler = fill_filesystem(small_tmpfs)

        # The workload writes 3 MB, 3 times the filesystem, and must exit on its own.
        read_end, write_end = os.pipe()
        process = subprocess.Popen(["sh", "-c", "yes berth | head -c 3000000"], stdout=write_end)
        os.close(write_end)
        drainer = threading.Thread(target=drain, args=(read_end, "stdout", log))
        drainer.start()
        assert process.wait(timeout=60) == 0
        drainer.join(timeout=60)
        assert not drainer.is_alive()

        warnings = log_messages(caplog, logging.WARNING)
        assert len(warnings) == 1
        assert str(path) in warnings[0]
        assert "No space left on device" in warnings[0]
        assert read_lines(path) == []

        clock.now += SUMMARY_INTERVAL
        log.write_line("stdout", b"lost")
        assert len(log_messages(caplog, logging.WARNING)) == 2

        filler.unlink()
        log.write_line("stdout", b"after")

        dropped = 3_000_000 // len(b"berth\n") + 1
        infos = log_messages(caplog, logging.INFO)
        assert len(infos) == 1
        assert f"after dropping {dropped} records" in infos[0]
        assert texts(read_lines(path)) == ["after"]
    finally:
        log.close()


@pytest.mark.root
def test_short_write_keeps_whole_records(small_tmpfs, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    path = small_tmpfs / "log"
    log = RotatingLog(path)
    try:
        filler = fill_filesystem(small_tmpfs)
        # Free 3 pages, so a batch of 100 records of about 280 bytes stops part way.
        os.truncate(filler, filler.stat().st_size - 3 * 4096)
        lines = [f"{number:03d} ".encode() + b"z" * 200 for number in range(100)]

        log.write_lines("stdout", lines)

        raw = path.read_bytes()
        assert raw.endswith(b"\n")
        records = read_lines(path)
        assert 0 < len(records) < len(lines)
        assert texts(records) == [line.decode() for line in lines[: len(records)]]
        assert raw.count(b"\n") == len(records)
        [warning] = log_messages(caplog, logging.WARNING)
        assert "No space left on device" in warning

        filler.unlink()
        log.write_line("stdout", b"after")

        [info] = log_messages(caplog, logging.INFO)
        assert f"after dropping {len(lines) - len(records)} records" in info
        assert texts(read_lines(path))[-1] == "after"
        assert len(read_lines(path)) == len(records) + 1
    finally:
        log.close()
