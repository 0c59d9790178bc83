"""Write and remove OCI bundles (config.json and a root directory) for runc.

A bundle is a directory with ``config.json`` as described by the OCI
runtime spec. It has a ``rootfs/`` directory too unless the request names
its own root. The config starts from what ``runc spec`` (runc 1.1.5)
generates. The main differences:

* The default root is built from the host: read-only bind mounts of /usr
  and of /bin, /lib, /lib64 and /sbin where those are real directories.
  Where they are symlinks (as on merged-/usr systems) the root gets the
  same symlink. No other host directory is mounted.
* /etc is not the host's. The default root gets a small generated /etc
  (passwd, group, hostname, hosts, nsswitch.conf) so that host secrets
  such as /etc/shadow, SSH host keys and service credentials stay hidden.
  glibc's loader finds libraries in its built-in directories without
  /etc/ld.so.cache, so ``sh``, coreutils and ``python3`` run. Libraries
  that only /etc/ld.so.conf.d points at are not found.
* /tmp is a tmpfs, so the read-only root still has a writable scratch
  directory.
* The container gets a new network namespace whose only interface is the
  loopback, which runc brings up.
"""

from __future__ import annotations

import json
import os
import pathlib
import posixpath
import resource
import stat

from assistant import cgroups
from messages.models import CreateSpec, Limits
from messages.names import ID_PATTERN, ID_RULE

OCI_VERSION = "1.0.2-dev"
"""The runtime spec version that runc 1.1.5 implements (``runc --version``)."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
"""The capability set of ``runc spec``: enough to signal processes of the
container and bind ports below 1024, and nothing that reaches the host."""

NOFILE_SOFT_LIMIT = 1024
"""Soft RLIMIT_NOFILE of the workload, the value ``runc spec`` uses."""

HOST_DIRECTORIES = ("usr", "bin", "lib", "lib64", "sbin")
"""Top-level host directories that make up the default root."""

MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "etc", "root")
"""Directories the default root needs before runc mounts over them.
/etc and /root are plain directories of the bundle."""

MASKED_PATHS = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]

READONLY_PATHS = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]

ALLOWED_CHAR_DEVICES = [
    (1, 3),  # /dev/null
    (1, 5),  # /dev/zero
    (1, 7),  # /dev/full
    (1, 8),  # /dev/random
    (1, 9),  # /dev/urandom
    (5, 0),  # /dev/tty
    (5, 2),  # /dev/ptmx
    (136, None),  # /dev/pts/*
]
"""Character devices (major, minor) the container may use, None for any minor.
runc 1.1 appends its own allow rules for these devices after the config's
rules, so listing them here makes the config complete for other runtimes."""

CPU_PERIOD_US = 100_000
MAX_CPU_PERIOD_US = 1_000_000
MIN_CPU_QUOTA_US = 1_000
"""The kernel rejects a CFS quota below 1 ms and a period above 1 s."""

DEV_SIZE = "65536k"
SHM_SIZE = "65536k"
TMP_SIZE = "262144k"
"""tmpfs sizes for /dev, /dev/shm and /tmp. Their pages are charged to the
container's memory cgroup, so a memory limit also bounds them."""


class BundleError(ValueError):
    """A container request that cannot be turned into a bundle."""


def cgroups_path(manager_id: str, container_id: str) -> str:
    """Return the cgroup path runc's cgroupfs driver uses for a container.

    The path is absolute, so runc places it below each hierarchy's mount
    point and not below the cgroup of the calling process.
    """
    for name, value in (("manager id", manager_id), ("container id", container_id)):
        if not ID_PATTERN.fullmatch(value):
            raise BundleError(f"invalid {name} {value!r}: expected {ID_RULE}")
    return f"/berth/{manager_id}/{container_id}"


MAX_ARG_BYTES = 131072
"""Linux's MAX_ARG_STRLEN: one argument or environment string, NUL included."""

INIT_DESTINATION = "/dev/init"
"""Path of the init binary in the container. /dev is runc's own tmpfs, so
the bind mount never writes to a caller's root directory."""


def write_bundle(
    bundle_dir: pathlib.Path,
    spec: CreateSpec,
    cgroups_path: str,
    init_binary: str | None = None,
) -> pathlib.Path:
    """Create the bundle directory for ``spec`` and return the path of its config.json.

    Without ``spec.rootfs`` the bundle gets the default read-only root in
    ``rootfs/``. Writing into an existing bundle directory replaces its
    config. runc creates a missing ``spec.cwd`` at start, which fails for
    a path below the read-only /usr. Raises BundleError when the request
    names a root that is not a directory or contains a value runc cannot
    pass to the kernel.

    With ``init_binary`` (a statically linked init such as tini-static)
    the workload runs as that init's child: the init forwards signals and
    reaps zombies, because a program running as pid 1 ignores SIGTERM
    unless it installs a handler.
    """
    validate_process(spec)
    if init_binary is not None and not os.access(init_binary, os.X_OK):
        raise BundleError(
            f"init binary {init_binary} is missing or not executable: install it"
            " (apt-get install tini) or create the container with init false"
        )
    bundle_dir = pathlib.Path(bundle_dir)
    hostname = spec.hostname or spec.id

    if spec.rootfs is not None:
        check_rootfs(spec.rootfs)
    bundle_dir.mkdir(parents=True, exist_ok=True)

    if spec.rootfs is not None:
        # The caller's own root is used as it is, writable.
        root = {"path": spec.rootfs, "readonly": False}
        bind_sources: list[str] = []
        check_executable(spec, pathlib.Path(spec.rootfs), default_root=False)
    else:
        check_executable(spec, bundle_dir / "rootfs", default_root=True)
        bind_sources = create_default_root(bundle_dir / "rootfs", hostname)
        root = {"path": "rootfs", "readonly": True}

    config = {
        "ociVersion": OCI_VERSION,
        "process": process_config(spec),
        "root": root,
        "hostname": hostname,
        "mounts": mount_list(bind_sources),
        "linux": linux_config(spec.limits, cgroups_path),
    }
    if init_binary is not None:
        config["process"]["args"] = [INIT_DESTINATION, "--", *spec.argv]
        config["mounts"].append(
            mount(INIT_DESTINATION, "bind", init_binary, ["bind", "ro", "nosuid", "nodev"])
        )

    config_path = bundle_dir / "config.json"
    partial_path = bundle_dir / "config.json.partial"
    partial_path.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial_path, config_path)
    return config_path


def validate_process(spec: CreateSpec) -> None:
    """Raise BundleError for argv or env values that execve cannot take."""
    for index, arg in enumerate(spec.argv):
        if "\0" in arg:
            raise BundleError(f"argv[{index}] {arg!r} contains a NUL byte. Remove it.")
        if len(arg.encode()) >= MAX_ARG_BYTES:
            raise BundleError(
                f"argv[{index}] is {len(arg.encode())} bytes long; Linux takes at most"
                f" {MAX_ARG_BYTES - 1} bytes per argument: pass the data in a file instead"
            )
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key:
            raise BundleError(
                f"invalid environment variable name {key!r}: it must be non-empty"
                " and contain neither '=' nor a NUL byte"
            )
        if "\0" in value:
            raise BundleError(f"environment variable {key} contains a NUL byte. Remove it.")
        if len(f"{key}={value}".encode()) >= MAX_ARG_BYTES:
            raise BundleError(
                f"environment variable {key} is longer than {MAX_ARG_BYTES - 1} bytes,"
                " the Linux limit per variable: pass the data in a file instead"
            )


def check_executable(spec: CreateSpec, root_dir: pathlib.Path, default_root: bool) -> None:
    """Raise BundleError unless argv[0] is an executable file in the container's root.

    runc makes the same check at create, but under an init it moves to
    start, where the only trace left is the init's exit status 127.
    """
    program = spec.argv[0]
    if "/" in program:
        candidates = [program]
    else:
        search_path = spec.env.get("PATH", DEFAULT_PATH)
        candidates = [f"{folder}/{program}" for folder in search_path.split(":") if folder]
        if not candidates:
            raise BundleError(
                f"executable {program!r} cannot be found: PATH in env is empty;"
                " set PATH or give the program's absolute path"
            )
    for candidate in candidates:
        inside = posixpath.normpath(posixpath.join(spec.cwd, candidate))
        first = inside.lstrip("/").split("/", 1)[0]
        if default_root and first in HOST_DIRECTORIES:
            # The default root shows these host directories unchanged.
            on_host = pathlib.Path(inside)
        else:
            # NOTE: an absolute symlink in a caller's root resolves against
            # the host here, so such an entry may pass this check wrongly.
            on_host = root_dir / inside.lstrip("/")
        if on_host.is_file() and os.access(on_host, os.X_OK):
            return
    raise BundleError(
        f"executable {program!r} not found in the container's root (looked at"
        f" {', '.join(candidates)}): give the path of a program that exists in the"
        " root, or set PATH in env"
    )


def check_rootfs(rootfs: str) -> None:
    path = pathlib.Path(rootfs)
    if not path.exists():
        raise BundleError(
            f"rootfs {rootfs} does not exist on the manager's host: create that"
            " directory with the container's files, or omit rootfs to use the"
            " default read-only root built from the host's /usr"
        )
    if not path.is_dir():
        raise BundleError(
            f"rootfs {rootfs} is not a directory: give the path of a directory"
            " that contains the container's files, or omit rootfs"
        )
    if path.resolve() == pathlib.Path("/"):
        raise BundleError(
            f"rootfs {rootfs} is the host's own root: give a directory that contains"
            " only the container's files, or omit rootfs"
        )


def process_config(spec: CreateSpec) -> dict:
    env = [f"{key}={value}" for key, value in spec.env.items()]
    if "PATH" not in spec.env:
        env.insert(0, f"PATH={DEFAULT_PATH}")

    # Raising a hard limit needs CAP_SYS_RESOURCE, which root lacks on some
    # hosts, so the workload keeps the hard limit of the caller.
    # NOTE: this reads the limit of the process writing the bundle. It
    # matches runc's limit only if runc is started with the same limits.
    _, nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile_hard == resource.RLIM_INFINITY:
        nofile_hard = NOFILE_SOFT_LIMIT
    nofile_soft = min(NOFILE_SOFT_LIMIT, nofile_hard)

    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": list(spec.argv),
        "env": env,
        "cwd": spec.cwd,
        # The inheritable and ambient sets stay empty, because uid 0 gets
        # the permitted set on every exec without them.
        "capabilities": {
            "bounding": list(CAPABILITIES),
            "effective": list(CAPABILITIES),
            "permitted": list(CAPABILITIES),
        },
        "rlimits": [
            {"type": "RLIMIT_NOFILE", "hard": nofile_hard, "soft": nofile_soft}
        ],
        "noNewPrivileges": True,
    }


def mount_list(bind_sources: list[str]) -> list[dict]:
    """Return the mounts of config.json, with read-only binds of ``bind_sources``."""
    mounts = [
        mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", f"size={DEV_SIZE}"]),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_SIZE}"],
        ),
        mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            ["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount("/tmp", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=1777", f"size={TMP_SIZE}"]),
    ]
    # A plain "bind" and not "rbind": runc 1.1 applies "ro" only to the top
    # mount, so submounts of an rbind would stay writable.
    for source in bind_sources:
        mount_options = ["bind", "ro", "nosuid", "nodev"]
        mounts.append(mount(source, "bind", source, mount_options))
    return mounts


def mount(destination: str, fstype: str, source: str, options: list[str]) -> dict:
    return {"destination": destination, "type": fstype, "source": source, "options": options}


def linux_config(limits: Limits, cgroups_path: str) -> dict:
    return {
        "namespaces": [
            {"type": "pid"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
            {"type": "network"},
        ],
        "cgroupsPath": cgroups_path,
        "resources": resources_config(limits),
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }


def resources_config(limits: Limits) -> dict:
    resources: dict = {"devices": device_rules()}
    if limits.memory_bytes is not None:
        memory_hierarchy = cgroups.controller_hierarchy("memory")
        resources["memory"] = memory_resources(
            limits.memory_bytes,
            cgroup_version=memory_hierarchy.version if memory_hierarchy else None,
            swap_accounting=cgroups.swap_accounting_enabled(),
        )
    if limits.cpus is not None:
        resources["cpu"] = cpu_resources(limits.cpus)
    if limits.pids is not None:
        resources["pids"] = {"limit": limits.pids}
    return resources


def device_rules() -> list[dict]:
    """Return device cgroup rules: deny all, then allow the standard char devices."""
    rules = [{"allow": False, "access": "rwm"}]
    for major, minor in ALLOWED_CHAR_DEVICES:
        rule = {"allow": True, "type": "c", "major": major, "access": "rwm"}
        if minor is not None:
            rule["minor"] = minor
        rules.append(rule)
    return rules


def memory_resources(
    limit_bytes: int, cgroup_version: int | None, swap_accounting: bool
) -> dict:
    """Return ``linux.resources.memory`` for a limit that must end in an OOM kill.

    The runtime spec's ``swap`` is the limit of memory plus swap, so setting
    it equal to ``limit`` allows no swap at all. runc writes it to
    memory.memsw.limit_in_bytes on v1 and as ``memory.swap.max`` 0 on v2.
    A host without swap accounting lacks memory.memsw.limit_in_bytes, and
    runc 1.1 fails the container when it cannot write that file, so
    ``swap`` is left out there. On v1, swappiness 0 then stops the cgroup
    from swapping anonymous memory.
    """
    memory: dict = {"limit": limit_bytes}
    if swap_accounting:
        memory["swap"] = limit_bytes
    elif cgroup_version == 1:
        memory["swappiness"] = 0
    # NOTE: on v2 without swap accounting nothing stops the cgroup from
    # swapping when the host has swap. The OOM killer then acts only after
    # the cgroup has also filled its share of swap.
    return memory


def cpu_resources(cpus: float) -> dict:
    """Return ``linux.resources.cpu`` giving ``cpus`` cores of CFS bandwidth.

    The period is 100 ms, stretched up to 1 s for limits below 0.01 cores
    so that the quota stays at or above the kernel's 1 ms minimum.
    """
    period = CPU_PERIOD_US
    quota = round(cpus * period)
    if quota < MIN_CPU_QUOTA_US:
        period = MAX_CPU_PERIOD_US
        quota = round(cpus * period)
    if quota < MIN_CPU_QUOTA_US:
        smallest = MIN_CPU_QUOTA_US / MAX_CPU_PERIOD_US
        raise BundleError(
            f"cpus={cpus} is below {smallest}, the smallest CPU limit the kernel's"
            f" CFS bandwidth control can enforce; request at least {smallest}"
        )
    return {"quota": quota, "period": period}


def create_default_root(rootfs: pathlib.Path, hostname: str) -> list[str]:
    """Create the default root's directories and return the host paths to bind-mount.

    Host directories that are symlinks are copied as symlinks, so that they
    resolve inside the container the way they do on the host.
    """
    rootfs.mkdir(exist_ok=True)
    for name in MOUNT_POINTS:
        (rootfs / name).mkdir(exist_ok=True)

    bind_sources = []
    for name in HOST_DIRECTORIES:
        host_path = pathlib.Path("/") / name
        target = rootfs / name
        if host_path.is_symlink():
            remove_entry(target)
            os.symlink(os.readlink(host_path), target)
        elif host_path.is_dir():
            if target.is_symlink():
                target.unlink()
            target.mkdir(exist_ok=True)
            bind_sources.append(str(host_path))

    write_etc(rootfs / "etc", hostname)
    return bind_sources


def remove_entry(path: pathlib.Path) -> None:
    """Remove a symlink, file or empty directory left by an earlier write."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        path.rmdir()


def write_etc(etc: pathlib.Path, hostname: str) -> None:
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": "root:x:0:\nnogroup:x:65534:\n",
        "hostname": f"{hostname}\n",
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text)


def remove_bundle(bundle_dir: pathlib.Path) -> None:
    """Delete a bundle directory and everything in it without crossing into a mount.

    A missing directory is not an error. A symlink at ``bundle_dir`` is
    removed without touching its target, and symlinks inside are removed
    as links. Raises BundleError, and deletes nothing, when a mount point
    of the caller's mount namespace lies at or below ``bundle_dir``. A
    mount that appears during the walk is detected by its mount id and
    stops the walk with BundleError before anything inside it is deleted.
    """
    path = pathlib.Path(bundle_dir)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        path.unlink()
        return
    if not stat.S_ISDIR(info.st_mode):
        raise BundleError(f"cannot remove bundle {path}: it is not a directory")

    mounted = mount_points_below(path)
    if mounted:
        raise BundleError(
            f"cannot remove bundle {path}: {', '.join(mounted)} is still mounted."
            " Run `runc delete` for its container or unmount it, then retry."
        )

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        empty_directory(fd, path, mount_id(fd))
    finally:
        os.close(fd)
    os.rmdir(path)


def mount_points_below(path: pathlib.Path) -> list[str]:
    """Return the mount points at or below ``path`` in /proc/self/mountinfo."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    try:
        lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        mount_point = cgroups.unescape_mountinfo(fields[4])
        if mount_point == real or mount_point.startswith(prefix):
            found.append(mount_point)
    return found


def mount_id(fd: int) -> tuple[str, int]:
    """Return an identifier of the mount that the open file ``fd`` is on.

    The mount id from /proc/self/fdinfo distinguishes a bind mount from its
    source. Without it this falls back to the device number, which does not.
    """
    try:
        text = pathlib.Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("mnt_id:"):
            return ("mnt_id", int(line.split()[1]))
    return ("st_dev", os.fstat(fd).st_dev)


def empty_directory(fd: int, path: pathlib.Path, parent_mount: tuple[str, int]) -> None:
    """Delete everything in the open directory ``fd``, depth first.

    Every step goes through directory file descriptors opened with
    O_NOFOLLOW, so a symlink swapped in during the walk is never followed.
    """
    with os.scandir(fd) as entries:
        children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]

    for name, is_directory in children:
        if not is_directory:
            os.unlink(name, dir_fd=fd)
            continue
        child_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            if mount_id(child_fd) != parent_mount:
                raise BundleError(
                    f"cannot remove bundle directory {path / name}: it is a mount"
                    " point. Unmount it, then retry."
                )
            empty_directory(child_fd, path / name, parent_mount)
        finally:
            os.close(child_fd)
        os.rmdir(name, dir_fd=fd)
