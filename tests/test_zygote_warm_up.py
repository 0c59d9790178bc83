"""The fork server's warm-up: work that assistants would otherwise repeat after the fork.

Each test runs a new interpreter, because this test process has already
imported and used the modules in question.
"""

import subprocess
import sys
import textwrap

from tests.helpers import PROJECT_ROOT


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_warm_up_leaves_nothing_to_import():
    """After the warm-up, resolving a host name and parsing a reply import no module.

    A module imported after the fork would be private to each assistant.
    """
    result = run_python(
        """
        import socket
        import sys

        import assistant.zygote
        from messages.models import HeartbeatReply

        assistant.zygote.warm_up()
        before = set(sys.modules)
        socket.getaddrinfo("localhost", 5672)
        HeartbeatReply.model_validate_json('{"verdict": "nack", "epoch": 2}')
        print(" ".join(sorted(set(sys.modules) - before)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_failed_warm_up_still_serves():
    """A warm-up that raises is logged, and the fork server starts anyway."""
    # stdin is empty, so the server gets no fork request and ends at once.
    result = run_python(
        """
        import sys

        import assistant.zygote

        def broken_warm_up():
            raise RuntimeError("broken on purpose")

        assistant.zygote.warm_up = broken_warm_up
        sys.exit(assistant.zygote.main())
        """
    )
    assert result.returncode == 0, result.stderr
    assert "warm-up failed, forking without it" in result.stderr
    assert "broken on purpose" in result.stderr
    assert "ready" in result.stderr
