"""Latest-frame-only hand-over between threads: what keeps live results from lagging behind the probe."""

from __future__ import annotations

import collections
import threading


class LatestFrameMailbox:
    """One waiting item per source; a newer item replaces the waiting one (counted as dropped).
    The consumer takes sources in the order their items have been waiting. Used by the service
    (one source per peer) and by the Slicer module's live registration (one source)."""

    def __init__(self):
        self._slots: collections.OrderedDict[object, object] = collections.OrderedDict()
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, key, item) -> bool:
        """Leave `item` for the consumer; True when it replaced a waiting one (a dropped frame)."""
        with self._cond:
            replaced = key in self._slots
            self.dropped += replaced
            self._slots[key] = item  # replacing keeps the source's place in the order
            self._cond.notify()
            return replaced

    def waiting(self, key) -> bool:
        """Whether an item from `key` is waiting (a newer frame than the one being worked on)."""
        with self._cond:
            return key in self._slots

    def take(self, timeout: float):
        with self._cond:
            if not self._slots and not self._cond.wait(timeout):
                return None
            return self._slots.popitem(last=False)[1] if self._slots else None
