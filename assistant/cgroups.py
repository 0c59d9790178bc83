"""Read a container's cgroup on cgroup v1, hybrid and pure v2 hosts.

A container's cgroup is named by the ``cgroupsPath`` of its OCI config, an
absolute path such as ``/berth/<manager-id>/<container-id>``. runc's
cgroupfs driver (runc 1.1) joins that path below the mount point of every
hierarchy it uses, for example ``/sys/fs/cgroup/memory/berth/m/c`` on v1
and ``/sys/fs/cgroup/berth/m/c`` on v2. In hybrid mode it also creates the
path in the v2 tree mounted at ``/sys/fs/cgroup/unified``.

The layout is read from ``/proc/self/mountinfo`` on every call, so these
functions describe the mount namespace of the calling process. Every
function takes ``mountinfo`` so that tests can point it at a fake layout.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

MOUNTINFO = pathlib.Path("/proc/self/mountinfo")


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    mount_point: pathlib.Path
    version: int
    """1 for a ``cgroup`` mount, 2 for a ``cgroup2`` mount."""
    controllers: frozenset[str]
    """v1: the mount's super options except rw and ro, which are the attached
    controllers, ``name=<hierarchy>`` and flags such as ``clone_children``.
    v2: the controllers listed in the root's ``cgroup.controllers``."""

    def has_controller(self, name: str) -> bool:
        return name in self.controllers

    def cgroup_dir(self, cgroups_path: str) -> pathlib.Path:
        """Return the directory that runc uses for ``cgroups_path`` here.

        Like runc, this resolves ".." lexically so that the path stays
        below the mount point.
        """
        inner = os.path.normpath("/" + cgroups_path).lstrip("/")
        return self.mount_point / inner


OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field: str) -> str:
    """Decode the octal escapes of a mountinfo field, such as ``\\040`` for a space.

    The kernel escapes only space, tab, newline and backslash this way.
    """
    return OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def hierarchies(mountinfo: pathlib.Path = MOUNTINFO) -> list[Hierarchy]:
    """Parse the cgroup and cgroup2 mounts out of a mountinfo file.

    A hierarchy mounted at several places is listed once per mount point.
    Returns an empty list when the file cannot be read.
    """
    try:
        text = mountinfo.read_text()
    except OSError:
        return []

    found: list[Hierarchy] = []
    seen: set[pathlib.Path] = set()
    for line in text.splitlines():
        # Fields: id parent major:minor root mount-point options
        # [optional fields...] - fstype source super-options
        before, separator, after = line.partition(" - ")
        if not separator:
            continue
        mount_fields = before.split()
        type_fields = after.split()
        if len(mount_fields) < 5 or len(type_fields) < 3:
            continue
        fstype = type_fields[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue

        mount_point = pathlib.Path(unescape_mountinfo(mount_fields[4]))
        if mount_point in seen:
            continue
        seen.add(mount_point)

        if fstype == "cgroup":
            controllers = frozenset(type_fields[2].split(",")) - {"rw", "ro"}
            found.append(Hierarchy(mount_point, 1, controllers))
        else:
            found.append(Hierarchy(mount_point, 2, read_v2_controllers(mount_point)))
    return found


def read_v2_controllers(mount_point: pathlib.Path) -> frozenset[str]:
    try:
        return frozenset((mount_point / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def controller_hierarchy(
    controller: str, mountinfo: pathlib.Path = MOUNTINFO
) -> Hierarchy | None:
    """Return the hierarchy that ``controller`` is attached to, or None.

    A v1 mount wins over the v2 tree, because in hybrid mode a controller
    that is attached to a v1 hierarchy cannot be enabled in the v2 tree.
    """
    mounted = hierarchies(mountinfo)
    for version in (1, 2):
        for hierarchy in mounted:
            if hierarchy.version == version and hierarchy.has_controller(controller):
                return hierarchy
    return None


def swap_accounting_enabled(mountinfo: pathlib.Path = MOUNTINFO) -> bool:
    """Check whether the kernel can limit a cgroup's swap use.

    v1 needs ``memory.memsw.limit_in_bytes`` and v2 ``memory.swap.max``. The
    kernel creates both only with CONFIG_MEMCG_SWAP and without the
    ``swapaccount=0`` boot option. The v2 root cgroup has no memory files,
    so this looks at the caller's own cgroup and the root's children.
    """
    hierarchy = controller_hierarchy("memory", mountinfo)
    if hierarchy is None:
        return False
    if hierarchy.version == 1:
        return (hierarchy.mount_point / "memory.memsw.limit_in_bytes").exists()

    candidates = [hierarchy.cgroup_dir(own_v2_cgroup())]
    try:
        candidates += [path for path in hierarchy.mount_point.iterdir() if path.is_dir()]
    except OSError:
        pass
    for directory in candidates:
        if (directory / "memory.max").exists():
            return (directory / "memory.swap.max").exists()
    # NOTE: no child cgroup has the memory controller enabled, so swap
    # accounting cannot be seen and is reported as missing.
    return False


def own_v2_cgroup() -> str:
    """Return the calling process's cgroup v2 path from /proc/self/cgroup."""
    try:
        lines = pathlib.Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    for line in lines:
        if line.startswith("0::"):
            return line[3:] or "/"
    return "/"


def read_key_value(path: pathlib.Path, key: str) -> int | None:
    """Return the integer after ``key`` in a flat-keyed cgroup file, or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def oom_kill_count(cgroups_path: str, mountinfo: pathlib.Path = MOUNTINFO) -> int | None:
    """Return how many processes the OOM killer has killed in the cgroup.

    v1 reads the ``oom_kill`` line of ``memory.oom_control``, which older
    kernels lack. v2 reads it from ``memory.events``, which also counts
    descendant cgroups. Returns None when the cgroup or the counter cannot be read,
    for example after ``runc delete`` removed the cgroup.
    """
    hierarchy = controller_hierarchy("memory", mountinfo)
    if hierarchy is None:
        return None
    directory = hierarchy.cgroup_dir(cgroups_path)
    if hierarchy.version == 1:
        return read_key_value(directory / "memory.oom_control", "oom_kill")
    return read_key_value(directory / "memory.events", "oom_kill")


def cgroup_pids(cgroups_path: str, mountinfo: pathlib.Path = MOUNTINFO) -> list[int]:
    """Return every pid in the container's cgroup and its child cgroups, sorted.

    The pids are read from the hierarchy of the pids controller, else the
    memory controller, else the first hierarchy where the path exists. The
    pids are host pids, as seen from the caller's pid namespace. Returns an
    empty list when the cgroup does not exist.
    """
    directory = None
    for controller in ("pids", "memory"):
        hierarchy = controller_hierarchy(controller, mountinfo)
        if hierarchy is not None and hierarchy.cgroup_dir(cgroups_path).is_dir():
            directory = hierarchy.cgroup_dir(cgroups_path)
            break
    if directory is None:
        existing = cgroup_dirs(cgroups_path, mountinfo)
        if not existing:
            return []
        directory = existing[0]

    pids: set[int] = set()
    # A cgroup can vanish while it is walked, so every read tolerates OSError.
    for current, _, _ in os.walk(directory):
        try:
            text = (pathlib.Path(current) / "cgroup.procs").read_text()
        except OSError:
            continue
        pids.update(int(word) for word in text.split())
    return sorted(pids)


def cgroup_dirs(cgroups_path: str, mountinfo: pathlib.Path = MOUNTINFO) -> list[pathlib.Path]:
    """Return the directory of ``cgroups_path`` in every hierarchy where it exists.

    Parent directories such as ``/berth/<manager-id>`` are not included.
    """
    found = []
    for hierarchy in hierarchies(mountinfo):
        directory = hierarchy.cgroup_dir(cgroups_path)
        if directory.is_dir():
            found.append(directory)
    return found
