"""Kiosk communications: a small transport port (paho, AWS IoT, in-memory), a durable outbox, Comms."""

from device.comms.fake import InMemoryTransport
from device.comms.outbox import Outbox, Row
from device.comms.port import OnMessage, Transport, TransportError
from device.comms.service import Comms
from device.comms.stats import LatencyStats

__all__ = [
    "Comms",
    "InMemoryTransport",
    "LatencyStats",
    "OnMessage",
    "Outbox",
    "Row",
    "Transport",
    "TransportError",
]
