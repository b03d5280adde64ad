"""The collector's relearn request: every N newly stored records it rewrites one small file, which a
systemd path unit watches (deploy/systemd/storelens-relearn.path) to start `feedback relearn`. The file is
a request, not a queue: the relearn reads the whole feedback store and skips when nothing it uses changed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cloud.feedback.store import FeedbackStore
from storelens.feedback import FeedbackEvent
from storelens.fsutil import atomic_write_json
from storelens.snapshot import utc_now_iso

_LOGGER = logging.getLogger(__name__)


class RelearnRequest:
    """An ``on_stored`` hook for ``FeedbackCollector``: writes ``path`` after every ``after`` new records."""

    def __init__(self, path: Path, after: int) -> None:
        if after < 1:
            raise ValueError(f"relearn after {after} records: must be 1 or more")
        self.path = Path(path)
        self.after = after
        self.stored = 0  # new records since the collector started
        self.requests = 0
        self._lock = threading.Lock()

    def __call__(self, fb: FeedbackStore, record_id: str, event: FeedbackEvent) -> None:
        with self._lock:
            self.stored += 1
            if self.stored % self.after:
                return
            self.requests += 1
            body = {"requested": utc_now_iso(), "store": event.store, "last_record": record_id,
                    "stored_since_start": self.stored}  # fmt: skip
        atomic_write_json(self.path, body)  # a rename into place: what the path unit's PathChanged sees
        _LOGGER.info("%d new records: relearn requested (%s)", self.stored, self.path)
