"""A local mosquitto on free loopback ports, stopped by PID: the demo's store broker and the tests' (which
add a TLS listener, tests/support/mosquitto.py). Not for a store: deploy/mosquitto holds that config."""

from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """An ephemeral TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary, if installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None
    )


# What the broker needs in its config for BrokerLog: its log on stderr, with the "running" line.
LOG_TO_STDERR = "log_dest stderr\nlog_type information"


class BrokerLog:
    """Reads a broker's stderr on a thread (a full pipe would stall the broker) and notes its "mosquitto
    version X running" line, which it logs once every listener is open. Needs LOG_TO_STDERR."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._settled = threading.Event()  # running, or stderr closed (the broker exited)
        self.running = False
        self.tail: deque[str] = deque(maxlen=20)
        threading.Thread(target=self._read, name="mosquitto-log", daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stderr is not None
        try:
            for raw in self._proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                self.tail.append(line)
                if not self.running and line.endswith(" running"):
                    self.running = True
                    self._settled.set()
        except (OSError, ValueError):  # the owner closed the pipe after stopping the broker
            pass
        finally:
            self._settled.set()

    def wait_running(self, timeout_s: float) -> None:
        """Return once the broker runs; RuntimeError (with its last lines) if it exited, else TimeoutError."""
        if self._settled.wait(timeout_s) and self.running:
            return
        if self._proc.poll() is not None or self._settled.is_set():
            raise RuntimeError(f"mosquitto exited with {self._proc.wait(5)}: " + " | ".join(self.tail))
        raise TimeoutError(f"mosquitto did not say it was running within {timeout_s}s")


@dataclass
class Mosquitto:
    """One broker process. Ports stay fixed across restart() so clients can reconnect."""

    workdir: Path
    tls: bool = False  # a TLS listener on tls_port (needs a subclass with certificates: _tls_lines)
    websockets: bool = False
    acl: str | None = None  # acl_file text; enables password auth when given with passwords
    passwords: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    tls_port: int = 0
    ws_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_port = free_port()
        if self.websockets:
            self.ws_port = free_port()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _config(self) -> str:
        auth = "allow_anonymous true\n"
        if self.passwords:
            pw = self.workdir / "passwd"
            pw.write_text("".join(f"{u}:{p}\n" for u, p in self.passwords.items()))
            pw.chmod(0o600)
            subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
            auth = f"allow_anonymous false\npassword_file {pw}\n"
        if self.acl is not None:
            (self.workdir / "acl").write_text(self.acl)
            auth += f"acl_file {self.workdir / 'acl'}\n"
        lines = [
            f"user {getpass.getuser()}",  # as root mosquitto would drop to 'mosquitto' and lose our files
            "per_listener_settings false",
            auth,
            "persistence false",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error\nlog_type warning\nlog_type notice",
            LOG_TO_STDERR,
            f"listener {self.port} 127.0.0.1",
        ]
        lines += self._tls_lines()
        if self.websockets:
            lines += [f"listener {self.ws_port} 127.0.0.1", "protocol websockets"]
        return "\n".join(lines) + "\n"

    def _tls_lines(self) -> list[str]:
        """The TLS listener's config lines (none here: a subclass that holds certificates adds them)."""
        return []

    def start(self) -> Mosquitto:
        """Start the broker and wait until every listener accepts connections."""
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (make setup installs it)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self._config())
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        BrokerLog(self.proc).wait_running(_START_TIMEOUT_S)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop by PID (SIGKILL when ``kill``), and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same ports (retained messages are not persisted)."""
        self.stop()
        self.start()
