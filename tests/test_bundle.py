"""Tests of manager.bundle and assistant.cgroups.

The unit tests check config.json contents and parse fake cgroup layouts.
The integration tests run bundles through the real runc with a private
``--root`` state directory, and need root and a runc binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from assistant import cgroups
from manager import bundle
from messages.models import CreateSpec

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
RUNC_TIMEOUT = 60


def make_spec(**fields) -> CreateSpec:
    fields.setdefault("id", "c1")
    fields.setdefault("argv", ["sh", "-c", "true"])
    return CreateSpec(**fields)


def write_config(bundle_dir: pathlib.Path, **fields) -> dict:
    spec = make_spec(**fields)
    path = bundle.write_bundle(bundle_dir, spec, bundle.cgroups_path("m1", spec.id))
    return json.loads(path.read_text())


def env_dict(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config["process"]["env"])


# ---------------------------------------------------------------------------
# cgroups_path
# ---------------------------------------------------------------------------


def test_cgroups_path_format():
    assert bundle.cgroups_path("m1", "c-1") == "/berth/m1/c-1"


@pytest.mark.parametrize("manager_id, container_id", [("m/x", "c1"), ("m1", ".."), ("m1", "")])
def test_cgroups_path_rejects_bad_ids(manager_id, container_id):
    with pytest.raises(bundle.BundleError):
        bundle.cgroups_path(manager_id, container_id)


# ---------------------------------------------------------------------------
# config.json contents
# ---------------------------------------------------------------------------


def test_config_process_defaults(tmp_path):
    config = write_config(tmp_path / "b", argv=["sleep", "1"], cwd="/tmp")
    process = config["process"]

    assert process["args"] == ["sleep", "1"]
    assert process["cwd"] == "/tmp"
    assert process["terminal"] is False
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["noNewPrivileges"] is True
    for capability_set in ("bounding", "effective", "permitted"):
        assert process["capabilities"][capability_set] == bundle.CAPABILITIES
    assert "inheritable" not in process["capabilities"]


def test_config_nofile_within_hard_limit(tmp_path):
    config = write_config(tmp_path / "b")
    (rlimit,) = config["process"]["rlimits"]
    _, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)

    assert rlimit["type"] == "RLIMIT_NOFILE"
    assert rlimit["soft"] <= rlimit["hard"]
    assert rlimit["hard"] <= hard_limit


def test_env_default_path(tmp_path):
    config = write_config(tmp_path / "b", env={"A": "1"})
    env = env_dict(config)

    assert env["PATH"] == bundle.DEFAULT_PATH
    assert env["A"] == "1"


def test_env_keeps_spec_path(tmp_path):
    config = write_config(tmp_path / "b", env={"PATH": "/opt/bin:/usr/bin"})
    path_entries = [item for item in config["process"]["env"] if item.startswith("PATH=")]

    assert path_entries == ["PATH=/opt/bin:/usr/bin"]


@pytest.mark.parametrize("env", [{"A=B": "1"}, {"": "1"}, {"A": "x\0y"}])
def test_env_rejects_invalid_variables(tmp_path, env):
    with pytest.raises(bundle.BundleError):
        write_config(tmp_path / "b", env=env)


def test_hostname_defaults_to_container_id(tmp_path):
    assert write_config(tmp_path / "a", id="box-1")["hostname"] == "box-1"
    assert write_config(tmp_path / "b", hostname="web.lab")["hostname"] == "web.lab"


def test_oci_version_matches_runc(tmp_path):
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    output = subprocess.run([runc, "--version"], capture_output=True, text=True, check=True).stdout
    spec_lines = [line for line in output.splitlines() if line.startswith("spec:")]

    assert spec_lines == [f"spec: {bundle.OCI_VERSION}"]


def test_linux_namespaces_and_paths(tmp_path):
    config = write_config(tmp_path / "b", id="c7")
    linux = config["linux"]
    namespaces = sorted(item["type"] for item in linux["namespaces"])

    assert namespaces == ["ipc", "mount", "network", "pid", "uts"]
    assert all("path" not in item for item in linux["namespaces"])
    assert linux["cgroupsPath"] == "/berth/m1/c7"
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/proc/sys" in linux["readonlyPaths"]


def test_mounts_cover_standard_filesystems(tmp_path):
    config = write_config(tmp_path / "b")
    mounts = {item["destination"]: item for item in config["mounts"]}

    assert mounts["/proc"]["type"] == "proc"
    assert mounts["/dev"]["type"] == "tmpfs"
    assert mounts["/dev/pts"]["type"] == "devpts"
    assert mounts["/dev/shm"]["type"] == "tmpfs"
    assert mounts["/dev/mqueue"]["type"] == "mqueue"
    assert mounts["/tmp"]["type"] == "tmpfs"
    assert mounts["/sys"]["type"] == "sysfs"
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/sys/fs/cgroup"]["type"] == "cgroup"
    assert "ro" in mounts["/sys/fs/cgroup"]["options"]
    destinations = [item["destination"] for item in config["mounts"]]
    assert destinations.index("/dev") < destinations.index("/dev/pts")


def test_devices_deny_all_but_standard(tmp_path):
    devices = write_config(tmp_path / "b")["linux"]["resources"]["devices"]
    allowed = {(rule["major"], rule.get("minor")) for rule in devices[1:] if rule["allow"]}

    assert devices[0] == {"allow": False, "access": "rwm"}
    assert all(rule["type"] == "c" for rule in devices[1:])
    assert {(1, 3), (1, 5), (1, 8), (1, 9), (5, 0), (5, 2), (136, None)} <= allowed


def test_no_limits_no_resources(tmp_path):
    resources = write_config(tmp_path / "b")["linux"]["resources"]

    assert set(resources) == {"devices"}


def test_limits_in_resources(tmp_path):
    limits = {"memory_bytes": 16 * MIB, "cpus": 1.5, "pids": 32}
    resources = write_config(tmp_path / "b", limits=limits)["linux"]["resources"]

    assert resources["memory"]["limit"] == 16 * MIB
    assert resources["cpu"] == {"quota": 150_000, "period": 100_000}
    assert resources["pids"] == {"limit": 32}


def test_memory_swap_matches_host(tmp_path):
    resources = write_config(tmp_path / "b", limits={"memory_bytes": 32 * MIB})["linux"][
        "resources"
    ]
    hierarchy = cgroups.controller_hierarchy("memory")
    if hierarchy is None:
        pytest.skip("no memory cgroup controller is mounted")

    if cgroups.swap_accounting_enabled():
        assert resources["memory"]["swap"] == 32 * MIB
    else:
        assert "swap" not in resources["memory"]


@pytest.mark.parametrize(
    "version, swap_accounting, expected",
    [
        (1, True, {"limit": 64, "swap": 64}),
        (2, True, {"limit": 64, "swap": 64}),
        (1, False, {"limit": 64, "swappiness": 0}),
        (2, False, {"limit": 64}),
        (None, False, {"limit": 64}),
    ],
)
def test_memory_resources_by_layout(version, swap_accounting, expected):
    assert bundle.memory_resources(64, version, swap_accounting) == expected


@pytest.mark.parametrize(
    "cpus, quota, period",
    [
        (0.5, 50_000, 100_000),
        (2, 200_000, 100_000),
        (0.01, 1_000, 100_000),
        (0.005, 5_000, 1_000_000),
        (0.001, 1_000, 1_000_000),
    ],
)
def test_cpu_resources(cpus, quota, period):
    assert bundle.cpu_resources(cpus) == {"quota": quota, "period": period}


def test_cpu_resources_rejects_tiny_limit():
    with pytest.raises(bundle.BundleError, match="0.001"):
        bundle.cpu_resources(0.0001)


# ---------------------------------------------------------------------------
# root filesystem
# ---------------------------------------------------------------------------


def test_default_root_layout(tmp_path):
    bundle_dir = tmp_path / "b"
    config = write_config(bundle_dir, id="box")
    rootfs = bundle_dir / "rootfs"
    binds = {item["destination"]: item for item in config["mounts"] if item["type"] == "bind"}

    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert "/usr" in binds
    assert "/etc" not in binds
    for name in bundle.HOST_DIRECTORIES:
        host_path = pathlib.Path("/") / name
        if host_path.is_symlink():
            assert os.readlink(rootfs / name) == os.readlink(host_path), name
            assert f"/{name}" not in binds, name
        elif host_path.is_dir():
            assert (rootfs / name).is_dir(), name
            assert binds[f"/{name}"]["source"] == f"/{name}", name
            assert "ro" in binds[f"/{name}"]["options"], name
            assert "rbind" not in binds[f"/{name}"]["options"], name
    for name in ("proc", "dev", "sys", "tmp"):
        assert (rootfs / name).is_dir(), name
    assert (rootfs / "etc" / "hostname").read_text() == "box\n"
    assert not (rootfs / "etc" / "shadow").exists()


def test_write_bundle_twice(tmp_path):
    bundle_dir = tmp_path / "b"
    write_config(bundle_dir, argv=["true"])
    config = write_config(bundle_dir, argv=["false"])

    assert config["process"]["args"] == ["false"]
    assert not (bundle_dir / "config.json.partial").exists()


def make_image(root: pathlib.Path, program: str = "bin/tool") -> pathlib.Path:
    """Create a caller's root directory holding one executable file."""
    executable = root / program
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return root


def test_own_rootfs_used_as_is(tmp_path):
    rootfs = make_image(tmp_path / "image")
    bundle_dir = tmp_path / "b"
    config = write_config(bundle_dir, rootfs=str(rootfs), argv=["/bin/tool"])

    assert config["root"] == {"path": str(rootfs), "readonly": False}
    assert not any(item["type"] == "bind" for item in config["mounts"])
    assert not (bundle_dir / "rootfs").exists()
    assert [path.name for path in rootfs.iterdir()] == ["bin"]


def test_program_searched_in_path_of_own_rootfs(tmp_path):
    rootfs = make_image(tmp_path / "image", "opt/app/run")
    config = write_config(
        tmp_path / "b", rootfs=str(rootfs), argv=["run"], env={"PATH": "/usr/bin:/opt/app"}
    )

    assert config["process"]["args"] == ["run"]


@pytest.mark.parametrize("argv0", ["/no/such/program", "no-such-program", "/bin/tool/.."])
def test_missing_program_raises_naming_it(tmp_path, argv0):
    rootfs = make_image(tmp_path / "image")
    with pytest.raises(bundle.BundleError, match="not found in the container's root") as error:
        write_config(tmp_path / "b", rootfs=str(rootfs), argv=[argv0])

    assert repr(argv0) in str(error.value)


def test_default_root_finds_host_programs(tmp_path):
    config = write_config(tmp_path / "b", argv=["sh", "-c", "true"])

    assert config["process"]["args"][0] == "sh"
    with pytest.raises(bundle.BundleError, match="'berth-no-such-program'"):
        write_config(tmp_path / "c", argv=["berth-no-such-program"])


def test_init_wraps_argv_and_mounts_binary(tmp_path):
    init = make_image(tmp_path / "host", "tini") / "tini"
    spec = make_spec(argv=["sleep", "1"])
    path = bundle.write_bundle(tmp_path / "b", spec, "/berth/m1/c1", init_binary=str(init))
    config = json.loads(path.read_text())

    assert config["process"]["args"] == [bundle.INIT_DESTINATION, "--", "sleep", "1"]
    init_mount = config["mounts"][-1]
    assert init_mount["destination"] == bundle.INIT_DESTINATION
    assert init_mount["source"] == str(init)
    assert "ro" in init_mount["options"]


def test_missing_init_binary_raises(tmp_path):
    spec = make_spec(argv=["sleep", "1"])
    with pytest.raises(bundle.BundleError, match="apt-get install tini"):
        bundle.write_bundle(tmp_path / "b", spec, "/berth/m1/c1", init_binary="/no/such/tini")


def test_missing_rootfs_raises(tmp_path):
    missing = tmp_path / "no-such-root"
    with pytest.raises(bundle.BundleError, match=str(missing)) as error:
        write_config(tmp_path / "b", rootfs=str(missing))

    assert isinstance(error.value, ValueError)
    assert "omit rootfs" in str(error.value)
    assert not (tmp_path / "b").exists()


def test_file_rootfs_raises(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(bundle.BundleError, match=f"{not_a_directory} is not a directory"):
        write_config(tmp_path / "b", rootfs=str(not_a_directory))


# ---------------------------------------------------------------------------
# remove_bundle
# ---------------------------------------------------------------------------


def test_remove_bundle_whole_tree(tmp_path):
    bundle_dir = tmp_path / "b"
    write_config(bundle_dir)
    (bundle_dir / "rootfs" / "work" / "deep").mkdir(parents=True)
    (bundle_dir / "runc.log").write_text("log")

    bundle.remove_bundle(bundle_dir)

    assert not bundle_dir.exists()
    assert tmp_path.exists()


def test_remove_bundle_keeps_symlink_targets(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    bundle_dir = tmp_path / "b"
    (bundle_dir / "rootfs").mkdir(parents=True)
    os.symlink(outside, bundle_dir / "rootfs" / "link-dir")
    os.symlink(outside / "keep", bundle_dir / "link-file")
    link_to_bundle = tmp_path / "link-to-outside"
    os.symlink(outside, link_to_bundle)

    bundle.remove_bundle(bundle_dir)
    bundle.remove_bundle(link_to_bundle)

    assert not bundle_dir.exists()
    assert not link_to_bundle.is_symlink()
    assert (outside / "keep").read_text() == "keep"


def test_remove_bundle_missing_or_partial(tmp_path):
    bundle.remove_bundle(tmp_path / "never-written")
    partial = tmp_path / "partial"
    (partial / "rootfs" / "usr").mkdir(parents=True)

    bundle.remove_bundle(partial)

    assert not partial.exists()


def run_in_private_mount_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a Python script in a new mount namespace, so its mounts vanish with it."""
    if os.geteuid() != 0:
        pytest.skip("requires root")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    command = [unshare, "--mount", "--propagation", "private", sys.executable, "-c", script, *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUNC_TIMEOUT,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


BIND_HOST_DIR_SCRIPT = """
import pathlib, subprocess, sys
from manager import bundle
bundle_dir, host_dir = map(pathlib.Path, sys.argv[1:3])
subprocess.run(["mount", "--bind", str(host_dir), str(bundle_dir / "rootfs" / "usr")], check=True)
"""


def make_bundle_and_host_dir(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    bundle_dir = tmp_path / "b"
    write_config(bundle_dir)
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "sentinel").write_text("host data")
    return bundle_dir, host_dir


def test_remove_bundle_refuses_mounted(tmp_path):
    bundle_dir, host_dir = make_bundle_and_host_dir(tmp_path)
    script = BIND_HOST_DIR_SCRIPT + textwrap.dedent(
        """
        try:
            bundle.remove_bundle(bundle_dir)
        except bundle.BundleError as error:
            print(error)
        """
    )

    result = run_in_private_mount_namespace(script, str(bundle_dir), str(host_dir))

    assert result.returncode == 0, result.stderr
    assert "is still mounted" in result.stdout
    assert str(bundle_dir / "rootfs" / "usr") in result.stdout
    assert (host_dir / "sentinel").read_text() == "host data"
    assert (bundle_dir / "config.json").exists()
    bundle.remove_bundle(bundle_dir)


def test_remove_walk_stops_at_mount(tmp_path):
    """The mount id check inside the walk works even without the mountinfo check."""
    bundle_dir, host_dir = make_bundle_and_host_dir(tmp_path)
    script = BIND_HOST_DIR_SCRIPT + textwrap.dedent(
        """
        import os
        fd = os.open(bundle_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            bundle.empty_directory(fd, bundle_dir, bundle.mount_id(fd))
        except bundle.BundleError as error:
            print(error)
        """
    )

    result = run_in_private_mount_namespace(script, str(bundle_dir), str(host_dir))

    assert result.returncode == 0, result.stderr
    assert "is a mount point" in result.stdout
    assert (host_dir / "sentinel").read_text() == "host data"
    bundle.remove_bundle(bundle_dir)


# ---------------------------------------------------------------------------
# assistant.cgroups on fake layouts
# ---------------------------------------------------------------------------


def write_mountinfo(
    tmp_path: pathlib.Path, mounts: list[tuple[str, pathlib.Path, str]]
) -> pathlib.Path:
    """Write a mountinfo file with one line per (fstype, mount point, super options)."""
    lines = ["22 1 254:0 / / rw,relatime - ext4 /dev/vda rw"]
    for number, (fstype, mount_point, super_options) in enumerate(mounts, start=30):
        escaped = str(mount_point).replace(" ", "\\040")
        lines.append(
            f"{number} 22 0:{number} / {escaped} rw,relatime - {fstype} {fstype} {super_options}"
        )
        mount_point.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cgroups_hybrid_layout(tmp_path):
    base = tmp_path / "cg root"
    mountinfo = write_mountinfo(
        tmp_path,
        [
            ("cgroup", base / "memory", "rw,memory"),
            ("cgroup", base / "pids", "rw,pids"),
            ("cgroup", base / "systemd", "rw,name=systemd"),
            ("cgroup2", base / "unified", "rw"),
        ],
    )
    memory_dir = base / "memory" / "berth" / "m" / "c"
    pids_dir = base / "pids" / "berth" / "m" / "c"
    (pids_dir / "child").mkdir(parents=True)
    memory_dir.mkdir(parents=True)
    (memory_dir / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (pids_dir / "cgroup.procs").write_text("12\n7\n")
    (pids_dir / "child" / "cgroup.procs").write_text("30\n")

    assert cgroups.oom_kill_count("/berth/m/c", mountinfo) == 2
    assert cgroups.cgroup_pids("/berth/m/c", mountinfo) == [7, 12, 30]
    assert cgroups.cgroup_dirs("/berth/m/c", mountinfo) == [memory_dir, pids_dir]
    assert cgroups.controller_hierarchy("memory", mountinfo).version == 1
    assert cgroups.controller_hierarchy("memory", mountinfo).mount_point == base / "memory"


def test_cgroups_pure_v2_layout(tmp_path):
    mount_point = tmp_path / "cgroup"
    mountinfo = write_mountinfo(tmp_path, [("cgroup2", mount_point, "rw,nsdelegate")])
    (mount_point / "cgroup.controllers").write_text("cpu memory pids\n")
    directory = mount_point / "berth" / "m" / "c"
    directory.mkdir(parents=True)
    (directory / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    (directory / "cgroup.procs").write_text("5\n")

    assert cgroups.oom_kill_count("/berth/m/c", mountinfo) == 1
    assert cgroups.cgroup_pids("/berth/m/c", mountinfo) == [5]
    assert cgroups.cgroup_dirs("/berth/m/c", mountinfo) == [directory]
    assert cgroups.controller_hierarchy("memory", mountinfo).version == 2


def test_cgroups_missing_cgroup(tmp_path):
    mount_point = tmp_path / "cgroup"
    mountinfo = write_mountinfo(tmp_path, [("cgroup2", mount_point, "rw")])
    (mount_point / "cgroup.controllers").write_text("memory pids\n")

    assert cgroups.oom_kill_count("/berth/m/gone", mountinfo) is None
    assert cgroups.cgroup_pids("/berth/m/gone", mountinfo) == []
    assert cgroups.cgroup_dirs("/berth/m/gone", mountinfo) == []
    assert cgroups.oom_kill_count("/x", tmp_path / "no-mountinfo") is None


def test_cgroup_dir_stays_below_mount(tmp_path):
    hierarchy = cgroups.Hierarchy(tmp_path / "memory", 1, frozenset({"memory"}))

    assert hierarchy.cgroup_dir("/../../etc") == tmp_path / "memory" / "etc"


@pytest.mark.parametrize("has_memsw", [True, False])
def test_swap_accounting_v1(tmp_path, has_memsw):
    mount_point = tmp_path / "memory"
    mountinfo = write_mountinfo(tmp_path, [("cgroup", mount_point, "rw,memory")])
    if has_memsw:
        (mount_point / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")

    assert cgroups.swap_accounting_enabled(mountinfo) is has_memsw


@pytest.mark.parametrize("has_swap_max", [True, False])
def test_swap_accounting_v2(tmp_path, has_swap_max):
    mount_point = tmp_path / "cgroup"
    mountinfo = write_mountinfo(tmp_path, [("cgroup2", mount_point, "rw")])
    (mount_point / "cgroup.controllers").write_text("memory\n")
    child = mount_point / "system.slice"
    child.mkdir()
    (child / "memory.max").write_text("max\n")
    if has_swap_max:
        (child / "memory.swap.max").write_text("max\n")

    assert cgroups.swap_accounting_enabled(mountinfo) is has_swap_max


# ---------------------------------------------------------------------------
# Integration with runc
# ---------------------------------------------------------------------------


class RuncHost:
    """Runs bundles through runc with a private state directory and cleans up after them."""

    def __init__(self, runc: str, work_dir: pathlib.Path):
        self.runc = runc
        self.work_dir = work_dir
        self.state_dir = work_dir / "runc-state"
        self.manager_id = "test-" + uuid.uuid4().hex[:12]
        self.container_ids: list[str] = []

    def runc_command(self, *args: str) -> list[str]:
        return [self.runc, "--root", str(self.state_dir), *args]

    def bundle_dir(self, container_id: str) -> pathlib.Path:
        return self.work_dir / "bundles" / container_id

    def cgroups_path(self, container_id: str) -> str:
        return bundle.cgroups_path(self.manager_id, container_id)

    def prepare(self, **fields) -> CreateSpec:
        spec = make_spec(**fields)
        self.container_ids.append(spec.id)
        bundle.write_bundle(self.bundle_dir(spec.id), spec, self.cgroups_path(spec.id))
        return spec

    def run(self, *runc_options: str, **fields) -> tuple[int, str, str]:
        """Run a container in the foreground; return its exit status, stdout and stderr.

        runc gets files for stdout and stderr because a pipe reaches EOF only
        after every process of the container has closed it, which a detached
        container does not do.
        """
        spec = self.prepare(**fields)
        stdout_path = self.work_dir / f"{spec.id}.stdout"
        stderr_path = self.work_dir / f"{spec.id}.stderr"
        command = self.runc_command(
            "run", *runc_options, "--bundle", str(self.bundle_dir(spec.id)), spec.id
        )
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            returncode = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                timeout=RUNC_TIMEOUT,
            ).returncode
        return returncode, stdout_path.read_text(), stderr_path.read_text()

    def delete(self, container_id: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.runc_command("delete", "--force", container_id),
            capture_output=True,
            text=True,
            timeout=RUNC_TIMEOUT,
        )

    def state(self, container_id: str) -> dict:
        result = subprocess.run(
            self.runc_command("state", container_id),
            capture_output=True,
            text=True,
            timeout=RUNC_TIMEOUT,
            check=True,
        )
        return json.loads(result.stdout)

    def clean_up(self) -> None:
        for container_id in self.container_ids:
            self.delete(container_id)
            for directory in cgroups.cgroup_dirs(self.cgroups_path(container_id)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
        # runc leaves the parent cgroup /berth/<manager-id> in every hierarchy.
        for directory in cgroups.cgroup_dirs(f"/berth/{self.manager_id}"):
            with contextlib.suppress(OSError):
                directory.rmdir()
        bundle.remove_bundle(self.work_dir)


@pytest.fixture
def runc_host() -> Iterator[RuncHost]:
    if os.geteuid() != 0:
        pytest.skip("requires root")
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    host = RuncHost(runc, pathlib.Path(tempfile.mkdtemp(prefix="berth-bundle-test-")))
    try:
        yield host
    finally:
        host.clean_up()


def test_runc_exit_status_and_output(runc_host):
    returncode, stdout, stderr = runc_host.run(id="echo", argv=["sh", "-c", "echo hi; exit 3"])

    assert stdout == "hi\n"
    assert returncode == 3, stderr


def test_runc_delete_leaves_nothing(runc_host):
    returncode, _, stderr = runc_host.run("--keep", id="kept", argv=["true"])
    assert returncode == 0, stderr
    assert runc_host.state("kept")["status"] == "stopped"
    assert cgroups.cgroup_dirs(runc_host.cgroups_path("kept")) != []

    deleted = runc_host.delete("kept")

    assert deleted.returncode == 0, deleted.stderr
    assert cgroups.cgroup_dirs(runc_host.cgroups_path("kept")) == []
    bundle.remove_bundle(runc_host.bundle_dir("kept"))
    assert not runc_host.bundle_dir("kept").exists()


def test_runc_default_root(runc_host):
    script = textwrap.dedent(
        """
        cat /proc/sys/kernel/hostname
        test -w / && echo root-writable
        test -w /usr && echo usr-writable
        touch /tmp/scratch && echo tmp-writable
        test -e /etc/shadow && echo shadow-visible
        python3 -c 'print("python", 6 * 7)'
        grep CapEff /proc/self/status
        """
    )
    returncode, stdout, stderr = runc_host.run(id="root-check", argv=["sh", "-c", script])
    lines = stdout.splitlines()

    assert returncode == 0, stderr
    assert lines[0] == "root-check"
    assert "root-writable" not in lines
    assert "usr-writable" not in lines
    assert "tmp-writable" in lines
    assert "shadow-visible" not in lines
    assert "python 42" in lines
    # CAP_KILL (5), CAP_NET_BIND_SERVICE (10) and CAP_AUDIT_WRITE (29).
    assert "CapEff:\t0000000020000420" in lines


def test_runc_memory_limit_oom_kills(runc_host):
    container_id = "oom"
    returncode, _, stderr = runc_host.run(
        "--keep",
        id=container_id,
        argv=["python3", "-c", "data = b'x' * (200 * 1024 * 1024)"],
        limits={"memory_bytes": 16 * MIB},
    )
    # runc delete removes the cgroup, so the counter is read before it.
    oom_kills = cgroups.oom_kill_count(runc_host.cgroups_path(container_id))

    assert returncode == 128 + signal.SIGKILL, stderr
    assert oom_kills is not None
    assert oom_kills >= 1


def test_runc_limits_reach_cgroup(runc_host):
    container_id = "limits"
    returncode, _, stderr = runc_host.run(
        "--keep",
        id=container_id,
        argv=["true"],
        limits={"memory_bytes": 48 * MIB, "cpus": 0.5, "pids": 20},
    )
    assert returncode == 0, stderr
    path = runc_host.cgroups_path(container_id)
    memory = cgroups.controller_hierarchy("memory")
    pids = cgroups.controller_hierarchy("pids")
    if memory is None or memory.version != 1 or pids is None or pids.version != 1:
        pytest.skip("the cgroup file checks are written for cgroup v1 controllers")

    limit_file = memory.cgroup_dir(path) / "memory.limit_in_bytes"
    assert int(limit_file.read_text()) == 48 * MIB
    if cgroups.swap_accounting_enabled():
        memsw_file = memory.cgroup_dir(path) / "memory.memsw.limit_in_bytes"
        assert int(memsw_file.read_text()) == 48 * MIB
    assert (pids.cgroup_dir(path) / "pids.max").read_text().strip() == "20"
    cpu = cgroups.controller_hierarchy("cpu")
    assert cpu is not None
    assert (cpu.cgroup_dir(path) / "cpu.cfs_quota_us").read_text().strip() == "50000"


PIDS_SCRIPT = """
import os, signal
children = 0
try:
    while children < 50:
        if os.fork() == 0:
            signal.pause()
            os._exit(0)
        children += 1
except BlockingIOError:
    pass
print(children)
"""


def test_runc_pids_limit(runc_host):
    returncode, stdout, stderr = runc_host.run(
        id="pids", argv=["python3", "-c", PIDS_SCRIPT], limits={"pids": 8}
    )

    assert returncode == 0, stderr
    # The python3 process itself is the eighth pid of the cgroup.
    assert stdout.strip() == "7"


def test_cgroup_pids_running_container(runc_host):
    container_id = "sleeper"
    returncode, _, stderr = runc_host.run("--detach", id=container_id, argv=["sleep", "300"])
    assert returncode == 0, stderr
    init_pid = runc_host.state(container_id)["pid"]

    assert init_pid in cgroups.cgroup_pids(runc_host.cgroups_path(container_id))

    deleted = runc_host.delete(container_id)
    assert deleted.returncode == 0, deleted.stderr
    assert cgroups.cgroup_pids(runc_host.cgroups_path(container_id)) == []
    assert cgroups.cgroup_dirs(runc_host.cgroups_path(container_id)) == []


def test_host_root_as_rootfs_raises(tmp_path):
    with pytest.raises(bundle.BundleError, match="host's own root"):
        write_config(tmp_path / "b", rootfs="/")


def test_overlong_argument_raises(tmp_path):
    with pytest.raises(bundle.BundleError, match=r"argv\[2\] is 200000 bytes"):
        write_config(tmp_path / "b", argv=["sh", "-c", "x" * 200_000])


def test_empty_path_names_the_cause(tmp_path):
    with pytest.raises(bundle.BundleError, match="PATH in env is empty"):
        write_config(tmp_path / "b", argv=["sh"], env={"PATH": ""})
