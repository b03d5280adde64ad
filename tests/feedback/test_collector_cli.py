"""`storelens feedback collect` as a process: SIGKILL between receipt and ack loses nothing; SIGTERM stops
cleanly with a summary; bad flags are one line and exit 2."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cloud.cli import feedback_app
from cloud.feedback.collector import FAULT_ENV
from cloud.feedback.store import FeedbackStore, record_id_of
from storelens.feedback import feedback_topic
from tests.deploy.mqtt_peer import Peer
from tests.feedback.conftest import MODEL, STORE, feedback
from tests.support.mosquitto import Mosquitto, free_port

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 20.0  # a cold interpreter start on a loaded 2-core box; every wait ends early on its line


class CollectorProcess:
    """The real CLI in a subprocess; its stderr read line by line on a thread, waited on by content."""

    def __init__(self, args: list[str], fault: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = fault
        code = "import sys; from storelens.cli import main; sys.argv[0] = 'storelens'; main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "feedback", "collect", *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, name="collector-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.lines.put(raw.decode(errors="replace").rstrip())
        self.lines.put(None)

    def wait_line(self, needle: str, timeout_s: float = WAIT_S) -> str:
        """The first stderr line containing ``needle``; AssertionError with the log if it never comes."""
        while True:
            try:
                line = self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"no {needle!r} in {timeout_s}s:\n" + "\n".join(self.seen)) from None
            if line is None:
                rc = self.proc.wait(10)
                raise AssertionError(f"exited ({rc}) before {needle!r}:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if needle in line:
                return line

    def finish(self, sig: int) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(WAIT_S)
        self._reader.join(WAIT_S)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return rc


@pytest.mark.integration
@pytest.mark.parametrize("point", ["before_store", "before_ack"])
def test_sigkill_between_receipt_and_ack_loses_nothing(
    point: str, broker: Mosquitto, publisher: Peer, snapshots: Path, tmp_path: Path
) -> None:
    """A collector killed after receiving a message but before acknowledging it must get it again on
    restart (persistent session) and keep exactly one record of it."""
    root = tmp_path / "fb"
    args = ["--store", STORE, "--feedback-dir", str(root), "--broker", broker.url,
            "--snapshots", str(snapshots), "--client-id", f"t-cli-{uuid.uuid4().hex[:8]}"]  # fmt: skip
    msg = feedback("kA", 1)
    first = CollectorProcess(args, fault=point)
    try:
        first.wait_line("collecting feedback")
        assert publisher.publish(feedback_topic(STORE, "kA"), msg.to_bytes()).value < 128
        first.wait_line(f"holding a message {point}")
    finally:
        first.finish(signal.SIGKILL)
    stored_before = len(FeedbackStore(root).records())
    assert stored_before == (1 if point == "before_ack" else 0)

    second = CollectorProcess(args)
    try:
        rid = record_id_of(STORE, "kA", msg.id)
        line = second.wait_line(rid)
        assert f"{'duplicate' if stored_before else 'stored'} {rid} from {STORE}/kA" in line, line
    finally:
        rc = second.finish(signal.SIGTERM)
    assert rc == 0, "\n".join(second.seen)
    summary = second.wait_line("feedback collector stopped")
    assert ("duplicate 1" if stored_before else "stored 1") in summary
    assert [r.record_id for r in FeedbackStore(root).records()] == [rid]
    assert FeedbackStore(root).crop_path(rid).is_file()


runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(feedback_app, name="feedback")
    return app


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "--snapshots DIR"),
        (["--model", "XYZ"], "not a model id"),
        (["--snapshots", "/nonexistent/published"], "does not exist"),
        (["--model", MODEL, "--store", "bad/store"], "store id"),
        (["--model", MODEL, "--ca", "/nonexistent/ca.pem"], "--ca"),
        (["--model", MODEL, "--broker", "http://127.0.0.1:1"], "mqtt://host:port"),
        (["--model", MODEL], "cannot reach broker"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(extra: list[str], needle: str, tmp_path: Path) -> None:
    """Operator mistakes must be one line naming the problem (exit 2), never a traceback."""
    args = ["feedback", "collect", "--store", STORE, "--feedback-dir", str(tmp_path / "fb"),
            "--broker", f"mqtt://127.0.0.1:{free_port()}", *extra]  # fmt: skip
    r = runner.invoke(_app(), args)
    assert r.exit_code == 2, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert r.output.strip().startswith("error:") and r.output.strip().count("\n") == 0, r.output
