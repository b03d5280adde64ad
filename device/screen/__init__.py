"""The kiosk's local screen: a page served by the kiosk, live preview and pushed answers."""

from __future__ import annotations

from device.screen.server import ScreenServer

__all__ = ["ScreenServer"]
