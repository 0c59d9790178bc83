"""Named network namespaces, created and entered by a thread instead of a child process.

pyroute2 0.9 creates a namespace, and a netlink socket inside one, in a
forked child process. Forking the manager, a process of tens of MiB with
many threads, took most of the CPU of a container's network setup. The
network namespace is a property of each thread: unshare(2) and setns(2)
with CLONE_NEWNET change only the calling thread. So a short-lived thread
can move into a namespace and do the work there, while every other
thread of the manager stays in the host's namespace. The thread ends
right after, so no pooled thread is ever left in a container's namespace.
"""

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import netns

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
"""The unshare(2) and setns(2) flag of network namespaces (linux/sched.h)."""

_libc = ctypes.CDLL(None, use_errno=True)


def create_namespace(name: str) -> None:
    """Create the named namespace /run/netns/NAME, as ``ip netns add`` does.

    Raises OSError when the namespace cannot be created or mounted. A
    failed mount may leave an empty /run/netns/NAME file behind, as
    pyroute2's own create does; removing the namespace removes it.
    """
    _on_new_thread(_unshare_and_mount, name)


def run_in_namespace(name: str, function: Callable[[], T]) -> T:
    """Call ``function`` on a new thread inside the named namespace and return its result.

    Netlink sockets that ``function`` opens, such as pyroute2's IPRoute,
    belong to that namespace. Its exceptions are raised here; OSError
    when the namespace does not exist.
    """
    def enter_and_call() -> T:
        netns.setns(name, flags=0)  # flags 0: open the namespace, never create it
        return function()

    return _on_new_thread(enter_and_call)


def _unshare_and_mount(name: str) -> None:
    if _libc.unshare(CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"unshare of a network namespace failed: {os.strerror(error)}", name)
    # pyroute2 makes /run/netns a shared mount point when needed and
    # bind-mounts this thread's new namespace onto /run/netns/NAME.
    netns.attach(name, "thread-self")


def _on_new_thread(function: Callable[..., T], *args: object) -> T:
    """Run ``function(*args)`` on a thread of its own, wait, and return or raise its outcome."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = function(*args)
        except BaseException as exc:  # raised again in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
