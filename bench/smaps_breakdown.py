"""Split the memory of processes by mapping kind, from /proc/PID/smaps.

    python3 -m bench.smaps_breakdown [--parent PID] PID...

Prints, per kind of mapping, the mean PSS, private dirty, shared dirty
and RSS of the given processes in KiB, and their thread counts. With
``--parent`` (the fork server of forked assistants), anonymous mappings
with the same address range in the parent are marked "inherited". A
private dirty page in such a mapping is a page copied on write, or a
page where the child placed new objects in memory that the parent had
left free.

The kinds are guesses from size and name. An anonymous mapping of
8 MiB (or 8 MiB less one guard page) is taken for a thread stack, and
one of 1 MiB for an arena of CPython's object allocator. One aligned to
64 MiB, or one without access rights, is taken for a glibc malloc arena
of a thread. Adjacent anonymous mappings with equal rights are merged by the kernel,
so several object arenas can show up as one "anonymous, other" mapping.
"""

import argparse
import collections
import re
from pathlib import Path

FIELDS = ("Rss", "Pss", "Shared_Dirty", "Private_Dirty")
MAPPING_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
KIB_PER_MIB = 1024
GLIBC_ARENA_ALIGNMENT = 64 * 1024 * 1024
THREAD_STACK_KIB = (8192, 8188)


def read_mappings(pid: int) -> list[dict]:
    mappings = []
    current: dict = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = MAPPING_LINE.match(line)
        if match:
            current = {
                "start": int(match[1], 16),
                "end": int(match[2], 16),
                "permissions": match[3],
                "path": match[4],
            }
            mappings.append(current)
            continue
        key, _, rest = line.partition(":")
        if key in FIELDS:
            current[key] = int(rest.split()[0])
    return mappings


def mapping_kind(mapping: dict, parent_ranges: set[tuple[int, int]] | None) -> str:
    path = mapping["path"]
    if path == "[heap]":
        return "heap (brk, glibc main arena)"
    if path.startswith("["):
        return path
    if path:
        name = path.rsplit("/", 1)[-1]
        if "libpython" in name or name.startswith("python3"):
            return "file: python binary and libpython"
        return "file: other libraries and files"
    suffix = ""
    if parent_ranges is not None:
        inherited = (mapping["start"], mapping["end"]) in parent_ranges
        suffix = ", inherited" if inherited else ", new"
    size_kib = (mapping["end"] - mapping["start"]) // 1024
    if size_kib in THREAD_STACK_KIB:
        return "anonymous: thread stack" + suffix
    if mapping["start"] % GLIBC_ARENA_ALIGNMENT == 0 or mapping["permissions"] == "---p":
        return "anonymous: glibc thread arena" + suffix
    if size_kib == 1024:
        return "anonymous: object arena (1 MiB)" + suffix
    return "anonymous: other" + suffix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.smaps_breakdown", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--parent", type=int, help="pid of the process the others were forked from")
    parser.add_argument("pids", type=int, nargs="+", help="pids of the processes to measure")
    args = parser.parse_args(argv)

    parent_ranges = None
    if args.parent is not None:
        parent_ranges = {(m["start"], m["end"]) for m in read_mappings(args.parent)}
    totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    thread_counts = collections.Counter()
    for pid in args.pids:
        for mapping in read_mappings(pid):
            kind = mapping_kind(mapping, parent_ranges)
            totals[kind].update({field: mapping.get(field, 0) for field in FIELDS})
            totals[kind]["mappings"] += 1
        thread_counts[len(list(Path(f"/proc/{pid}/task").iterdir()))] += 1

    count = len(args.pids)
    threads = ", ".join(f"{n} threads: {processes}" for n, processes in sorted(thread_counts.items()))
    print(f"{count} processes ({threads}); mean KiB per process")
    print(f"{'kind':45} {'mappings':>8} {'Pss':>7} {'PrivDirty':>9} {'ShDirty':>7} {'Rss':>7}")
    grand = collections.Counter()
    for kind, values in sorted(totals.items(), key=lambda item: -item[1]["Pss"]):
        grand.update(values)
        print(
            f"{kind:45} {values['mappings'] / count:8.1f} {values['Pss'] / count:7.0f}"
            f" {values['Private_Dirty'] / count:9.0f} {values['Shared_Dirty'] / count:7.0f}"
            f" {values['Rss'] / count:7.0f}"
        )
    print(
        f"{'total':45} {grand['mappings'] / count:8.1f} {grand['Pss'] / count:7.0f}"
        f" {grand['Private_Dirty'] / count:9.0f} {grand['Shared_Dirty'] / count:7.0f}"
        f" {grand['Rss'] / count:7.0f}"
    )
    print(f"mean PSS {grand['Pss'] / count / KIB_PER_MIB:.2f} MiB per process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
