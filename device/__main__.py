"""`python -m device run --config kiosk.toml` (same as `storelens kiosk run`)."""

from __future__ import annotations

import logging
import sys

from device.cli import kiosk_app


def main() -> None:
    """Configure logging once and dispatch to the kiosk CLI."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    kiosk_app()


if __name__ == "__main__":
    main()
