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
    code = (
        "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"
        "print('Count: {n} iterations')"
    )
    long_proc, long_cpu = cpu.run_measured([sys.executable, "-c", code.format(s=0.6, n=300)], timeout_s=60)
    short_proc, short_cpu = cpu.run_measured([sys.executable, "-c", code.format(s=0.1, n=50)], timeout_s=60)
    assert long_proc.returncode == 0 and long_cpu >= 0.6 and 0.1 <= short_cpu < long_cpu
    runs = (long_cpu, cpu.iterations(long_proc.stdout)), (short_cpu, cpu.iterations(short_proc.stdout))
    per = cpu.per_inference_ms(*runs)
    assert per is not None and 1.6 <= per <= 2.6  # 0.5 s over 250 "inferences", the interpreter start-up gone


def test_unparsable_or_inconsistent_runs_give_no_figure() -> None:
    assert cpu.iterations("no count here") is None
    assert cpu.per_inference_ms((1.0, None), (0.5, 10)) is None
    assert cpu.per_inference_ms((1.0, 10), (0.5, 10)) is None
