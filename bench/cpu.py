"""CPU time accounting for the benches: core-milliseconds per image, ours beside benchmark_app's.

A throughput ratio on this shared 2-core VM moves 5-10 points between runs of the same code: whatever
else runs on the host takes cycles from both sides, never in the same amounts. The CPU time a process was
given per image moves less, and it says where a pipeline's time goes: with both cores busy, ours
per frame over benchmark_app's per inference (``*_cpu_cost_ratio``) is about the inverse of the
throughput ratio, and the per-thread split names what the host work outside inference costs.
Linux only (``/proc``, ``getrusage``); elsewhere the figures are None.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_TASKS = Path("/proc/self/task")


def self_cpu_s() -> float:
    """CPU seconds (user + system) this process has used so far, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_measured(cmd: Sequence[str], timeout_s: float) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` to completion; its result and the CPU seconds it used (one child at a time)."""
    before = _children_cpu_s()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, check=False)
    return proc, _children_cpu_s() - before


def per_inference_ms(runs: Sequence[Mapping[str, Any]], short: Mapping[str, Any]) -> float | None:
    """benchmark_app's median CPU per inference over ``runs``, without its start-up (read, compile: ~1 core-s
    here): each run's ``cpu_s`` and ``count`` (iterations) less those of a ``short`` run of the same command,
    (cpu - cpu_short) / (count - count_short). None when no run can be told apart from the short one."""
    per = [
        1000.0 * (r["cpu_s"] - short["cpu_s"]) / (r["count"] - short["count"])
        for r in runs
        if r["count"] is not None and short["count"] is not None and r["count"] > short["count"]
    ]
    return statistics.median(per) if per else None


def thread_cpu_s() -> dict[int, tuple[str | None, float]]:
    """Each live thread of this process: native id -> (its Python name, or None for threads Python did
    not start, e.g. OpenVINO's; CPU seconds used so far, user + system), from /proc."""
    names: dict[int, str] = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str | None, float]] = {}
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return out
    for tid in tids:
        try:
            stat = (_TASKS / tid / "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (names.get(int(tid)), (int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    return out


def split_by_thread(
    before: dict[int, tuple[str | None, float]],
    after: dict[int, tuple[str | None, float]],
    group: Callable[[str | None], str],
    n: int,
) -> dict[str, float]:
    """Core-milliseconds per item (``n`` of them) between two ``thread_cpu_s`` readings, summed per
    ``group(thread name)``. Read both while the threads of interest live: an ended thread leaves /proc."""
    split: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        used = cpu - before.get(tid, (name, 0.0))[1]
        if used > 0:
            key = group(name)
            split[key] = split.get(key, 0.0) + used
    return {k: round(1000.0 * v / max(1, n), 3) for k, v in sorted(split.items())}
