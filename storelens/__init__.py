"""StoreLens shared kernel: contracts that cross the device/cloud line (snapshot, protocol, signing)."""

from __future__ import annotations

__version__ = "0.1.0"
