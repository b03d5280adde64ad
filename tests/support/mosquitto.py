"""A real Debian mosquitto started on free loopback ports for tests, stopped by PID: the product's dev
broker (storelens.devbroker) with the tests' TLS listener (TestPKI certificates)."""

from __future__ import annotations

from dataclasses import dataclass

from storelens.devbroker import LOG_TO_STDERR, BrokerLog, free_port, mosquitto_binary
from storelens.devbroker import Mosquitto as _DevBroker
from tests.support.pki import TestPKI

__all__ = ["LOG_TO_STDERR", "BrokerLog", "Mosquitto", "free_port", "mosquitto_binary"]


@dataclass
class Mosquitto(_DevBroker):
    """The dev broker; with ``tls`` it also listens with TLS (client certificates required)."""

    pki: TestPKI | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tls:
            self.pki = TestPKI(self.workdir / "pki")

    def _tls_lines(self) -> list[str]:
        if not self.tls or self.pki is None:
            return []
        return [
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {self.pki.ca}",
            f"certfile {self.pki.server.cert}",
            f"keyfile {self.pki.server.key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
