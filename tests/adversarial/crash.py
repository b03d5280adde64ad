"""Real kills at every step: a child run under ``strace -e inject=SYSCALL:signal=KILL:when=N``.

The kernel stops the child with SIGKILL on entry to its Nth call of one syscall (the call does not
happen), so each N is one crash point; N grows until the child finishes untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Every syscall that moves, flushes, writes or removes something on the way to a durable result.
STEPS = ("rename", "renameat", "renameat2", "fsync", "fdatasync", "write", "pwrite64", "unlink", "unlinkat")
KILLED = -9


def need_strace() -> str:
    """The strace binary, or skip with the reason (it must be able to ptrace its child)."""
    exe = shutil.which("strace")
    if exe is None:
        pytest.skip("crash injection needs strace (apt-get install strace)")
    probe = subprocess.run([exe, "-f", "-qq", "-e", "trace=none", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}")
    return exe


def run_killed(strace: str, syscall: str, n: int, args: list[str], *, timeout_s: float = 30.0) -> int:
    """Run ``python -c`` child ``args`` killed at its ``n``-th ``syscall``; its return code (-9 killed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    cmd = [strace, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
           "-e", f"inject={syscall}:signal=KILL:when={n}", sys.executable, *args]
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, timeout=timeout_s, check=False)
    return res.returncode


def crash_points(
    strace: str, args: list[str], prepare: Callable[[], None], *, limit: int = 200
) -> Iterator[tuple[str, int, int]]:
    """(syscall, n, returncode) for every n until the child completes (rc != -9): one per crash point.

    ``prepare`` sets the stage before each run; the caller checks the outcome at each yield.
    """
    for syscall in STEPS:
        for n in range(1, limit + 1):
            prepare()
            rc = run_killed(strace, syscall, n, args)
            yield syscall, n, rc
            if rc != KILLED:
                break
