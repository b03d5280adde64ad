"""The benches' CPU accounting (bench/cpu.py): what it reads is what the threads and children used."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from bench import cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and getrusage")


def _spin_then_wait(seconds: float, spun: threading.Event, release: threading.Event) -> None:
    end = time.thread_time() + seconds  # this thread's own CPU time
    while time.thread_time() < end:
        sum(range(1000))
    spun.set()
    release.wait(30.0)  # stay alive (and in /proc) until the test has read the counters


def test_a_busy_thread_is_charged_to_its_group_and_an_idle_one_is_not() -> None:
    spun, release = threading.Event(), threading.Event()
    busy = threading.Thread(target=_spin_then_wait, args=(0.3, spun, release), name="busy-worker")
    idle = threading.Thread(target=release.wait, args=(30.0,), name="idle-worker")
    idle.start()
    before = cpu.thread_cpu_s()
    busy.start()
    try:
        assert spun.wait(30.0)
        after = cpu.thread_cpu_s()
    finally:
        release.set()
        busy.join()
        idle.join()
    split = cpu.split_by_thread(before, after, lambda name: name or "native", n=10)
    assert split["busy-worker"] >= 25.0  # >= 0.25 s (clock ticks of 10 ms) over 10 items, in core-ms
    assert split.get("idle-worker", 0.0) < 5.0


def test_a_child_process_cpu_is_measured_and_startup_cancels() -> None:
    code = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass"
    long_proc, long_cpu = cpu.run_measured([sys.executable, "-c", code.format(s=0.6)], timeout_s=60)
    _, short_cpu = cpu.run_measured([sys.executable, "-c", code.format(s=0.1)], timeout_s=60)
    assert long_proc.returncode == 0 and long_cpu >= 0.6 and 0.1 <= short_cpu < long_cpu
    per = cpu.per_inference_ms([{"cpu_s": long_cpu, "count": 300}], {"cpu_s": short_cpu, "count": 50})
    assert per is not None and 1.6 <= per <= 2.6  # 0.5 s over 250 "inferences", the interpreter start-up gone


def test_runs_that_cannot_be_told_from_the_short_one_give_no_figure() -> None:
    short = {"cpu_s": 0.5, "count": 10}
    assert cpu.per_inference_ms([{"cpu_s": 1.0, "count": None}, {"cpu_s": 1.0, "count": 10}], short) is None
    assert cpu.per_inference_ms([{"cpu_s": 1.0, "count": 10}, {"cpu_s": 1.5, "count": 20}], short) == 100.0
