"""Child-subreaper duties: adopt the container's init and collect its status.

``runc create`` exits as soon as the container exists, so the container's
init is re-parented to the nearest subreaper. The assistant marks itself
one, so that init and every orphan of the container become its children.
"""

import ctypes
import logging
import os
import select
import signal

from assistant.runtime import children_lock

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36  # from <linux/prctl.h>


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(errno)}")


def decode_status(status: int) -> tuple[int, str | None]:
    """Turn a waitpid status into (exit code, signal name), shell style."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return 128 + number, signal.Signals(number).name
    return os.WEXITSTATUS(status), None


class InitWatcher:
    """Waits for one pid (the container's init) and reaps every other orphan."""

    def __init__(self, init_pid: int):
        self.init_pid = init_pid
        # A pidfd becomes readable when the process exits, which lets the
        # wait time out without polling waitpid.
        self._pidfd = os.pidfd_open(init_pid)

    def wait(self, timeout: float | None = None) -> int | None:
        """Return init's raw wait status once it exited, or None on timeout."""
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        status = self.reap_orphans()
        if status is None and readable:
            # NOTE: only a waiter outside children_lock could have taken the
            # status; then the pidfd stays readable and this loop spins.
            log.debug("pidfd of %d readable but its status was not collected", self.init_pid)
        return status

    def reap_orphans(self) -> int | None:
        """Collect every exited child; return init's status if it was one of them."""
        init_status = None
        with children_lock:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid == self.init_pid:
                    init_status = status
                else:
                    log.debug("reaped orphan %d with status %d", pid, status)
        return init_status

    def close(self) -> None:
        os.close(self._pidfd)
