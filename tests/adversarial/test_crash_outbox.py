"""The outbox commit killed at every write/fsync: every event reported committed is still there."""

from __future__ import annotations

from pathlib import Path

import pytest

from device.comms.outbox import Outbox
from tests.adversarial.conftest import Tally
from tests.adversarial.crash import crash_points, need_strace

pytestmark = pytest.mark.slow

# Puts 4 events, writing each id to a side file (O_APPEND, not fsynced: the kernel keeps it across a
# SIGKILL) only after put() returned, i.e. after the commit the kiosk relies on. The child loads the
# outbox module from its file: `device.comms` imports numpy and pydantic for its other modules (0.76 s
# a start, against 0.12), and this test starts one child per crash point (~70).
_CHILD = """
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("outbox", "device/comms/outbox.py")
outbox = sys.modules["outbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(outbox)
box = outbox.Outbox(Path(sys.argv[1]))
log = os.open(sys.argv[2], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
for i in range(4):
    row = box.put("t/events", b'{"seq":%d}' % i)
    os.write(log, b"%d\\n" % row)
box.close()
"""


def test_an_outbox_killed_at_any_step_keeps_every_committed_event(tmp_path: Path, tally: Tally) -> None:
    """Guards: an event acknowledged to the pipeline as committed and gone after a kill mid-commit."""
    strace = need_strace()
    db, log = tmp_path / "o.db", tmp_path / "committed.txt"
    seed = tmp_path / "seed.db"
    box = Outbox(seed)
    box.put("t/events", b'{"seq":-1}')  # a row from before the crash, replayed after it
    box.close()

    def prepare() -> None:
        for p in tmp_path.glob("o.db*"):
            p.unlink()
        log.unlink(missing_ok=True)
        db.write_bytes(seed.read_bytes())

    cases = 0
    for syscall, n, _rc in crash_points(strace, ["-c", _CHILD, str(db), str(log)], prepare):
        cases += 1
        committed = [int(x) for x in log.read_text().split()] if log.exists() else []
        box = Outbox(db)
        try:
            rows = box.peek(100)
            ids = {r.id for r in rows}
            ok = box.integrity_check() == "ok" and set(committed) <= ids and 1 in ids
        finally:
            box.close()
        tally.record("crash:outbox", "survived" if ok else "lost")
        assert ok, f"killed at {syscall} #{n}: committed {committed}, found {sorted(ids)}"
    assert cases > 10
