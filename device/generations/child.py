"""Compile an untrusted model in a child process with address-space, CPU and wall-clock limits.

The parent runs ``python -m device.generations.child`` with a JSON spec on stdin. The child lowers its own
limits (RLIMIT_AS, RLIMIT_CPU) before it imports OpenVINO or reads a model byte, verifies and compiles the
bundle, embeds the self-test images, writes the vectors as raw little-endian float32 and prints one JSON
line. A model that crashes the compiler, eats memory or loops only takes the child down.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from storelens.errors import ReasonError

_LOGGER = logging.getLogger(__name__)

MAX_STDOUT_BYTES = 64 << 10  # the child's one JSON line; anything more is a misbehaving child


class CompileFailed(ReasonError[str]):
    """The child did not produce a compiled, working model (reason: crash, timeout, memory, bad_model)."""


@dataclass(frozen=True, slots=True)
class ChildResult:
    model_id: str
    dim: int
    compile_ms: float
    vectors: npt.NDArray[np.float32]  # one row per self-test image, model space


def compile_in_child(
    bundle: Path,
    images: list[Path],
    out_dir: Path,
    *,
    timeout_s: float,
    mem_bytes: int,
    cache_dir: Path | None = None,
) -> ChildResult:
    """Run the child; CompileFailed when it dies, times out, or reports an error."""
    out = Path(out_dir) / "selftest.f32"
    out.unlink(missing_ok=True)
    spec = {
        "bundle": str(bundle),
        "images": [str(p) for p in images],
        "out": str(out),
        "mem_bytes": int(mem_bytes),
        "cpu_s": max(1, int(timeout_s) + 1),
        "cache_dir": str(cache_dir) if cache_dir else None,
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "device.generations.child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group: a timeout kills whatever it spawned too
    )
    try:
        stdout, stderr = proc.communicate(json.dumps(spec).encode(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        _LOGGER.error("compile child timed out; its stacks:\n%s", stderr.decode("utf-8", "replace")[-4000:])
        raise CompileFailed("timeout", f"compile took longer than {timeout_s:.0f} s") from None
    tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    if proc.returncode != 0:
        reason = "memory" if "MemoryError" in stderr.decode("utf-8", "replace") else "crash"
        if proc.returncode < 0:
            reason = f"signal_{-proc.returncode}"
        raise CompileFailed(reason, f"child exited {proc.returncode}: {tail[0][:300]}")
    try:
        reply = json.loads(stdout[:MAX_STDOUT_BYTES].decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise CompileFailed("crash", f"no result line from the child: {tail[0][:300]}") from exc
    if not reply.get("ok"):
        raise CompileFailed("bad_model", str(reply.get("error", "?"))[:500])
    dim = int(reply["dim"])
    raw = np.fromfile(out, dtype="<f4") if out.is_file() else np.empty(0, "<f4")
    if raw.size != dim * len(images):
        raise CompileFailed("bad_model", f"child wrote {raw.size} floats, want {dim * len(images)}")
    return ChildResult(
        str(reply["model_id"]),
        dim,
        float(reply["compile_ms"]),
        raw.reshape(len(images), dim).astype(np.float32),
    )


def _limit(mem_bytes: int, cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    _limit(int(spec["mem_bytes"]), int(spec["cpu_s"]))
    from models.embedder import Embedder  # after the limits: OpenVINO and the model are untrusted input
    from models.images import decode_image

    t0 = time.monotonic()
    cache = Path(spec["cache_dir"]) if spec.get("cache_dir") else None
    # Never closed: the process exits right after (Embedder.close after AsyncInferQueue use can hang).
    emb = Embedder(Path(spec["bundle"]), mode="latency", cache_dir=cache)
    compile_ms = (time.monotonic() - t0) * 1000
    crops = [decode_image(Path(p).read_bytes()) for p in spec["images"]]
    vecs = np.stack([emb.embed_one(c) for c in crops]) if crops else np.empty((0, emb.dim), np.float32)
    if not np.isfinite(vecs).all():
        return {"ok": False, "error": "model produced non-finite embeddings"}
    Path(spec["out"]).write_bytes(vecs.astype("<f4").tobytes())
    return {"ok": True, "model_id": emb.model_id, "dim": emb.dim, "compile_ms": round(compile_ms, 1)}


def main() -> int:
    """Child entry point: spec on stdin, one JSON line on stdout."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(sys.stdin.read())
    # A hang is killed by the parent; first leave every thread's stack on stderr for the kiosk log.
    faulthandler.dump_traceback_later(max(1.0, float(spec["cpu_s"]) - 1.5), exit=False)
    try:
        reply = _run(spec)
    except MemoryError:
        raise
    except Exception as exc:  # the model is untrusted: every failure is a reported result, not a trace
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown of OpenVINO objects: nothing left to save


if __name__ == "__main__":
    sys.exit(main())
