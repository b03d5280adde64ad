"""`make bench`: run each benchmark, write build/bench/<name>.json, print every *_ratio (ours / reference).

``--quick`` (`make bench QUICK=1`): the model and featurize benches on MobileNetV2 only (``BENCH_QUICK=1``
tells each suite to skip its other models), a few minutes instead of the full run's 45 or so under load.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SUITES = ["models", "featurize", "index", "pipeline", "paint", "feedback", "loop", "scale"]
QUICK_SUITES = ["models", "featurize"]  # the pipeline and index benches take most of the full run's time
OUT = Path("build/bench")


def _ratios(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    found: list[tuple[str, float]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k.endswith("_ratio") and isinstance(v, int | float):
                found.append((key, float(v)))
            else:
                found.extend(_ratios(v, key))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found.extend(_ratios(v, f"{prefix}[{i}]"))
    return found


def suites(argv: list[str]) -> list[str]:
    """The suites to run: those named, QUICK_SUITES with --quick (which sets BENCH_QUICK), else all."""
    if "--quick" in argv:
        os.environ["BENCH_QUICK"] = "1"
        argv = [a for a in argv if a != "--quick"]
        return argv or QUICK_SUITES
    return argv or SUITES


def main(argv: list[str]) -> int:
    names = suites(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        try:
            mod = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"[{name}] not available: {exc}")
            continue
        print(f"[{name}] running ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = mod.run(OUT)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        result.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"[{name}] wrote {OUT / (name + '.json')} in {result['wall_s']} s")
        for key, value in _ratios(result):
            print(f"    {key:<60} {value:6.3f}")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
