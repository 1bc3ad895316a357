"""Which worker of a shared study measures its start-up quantities: the one that creates the
study `<study>:start-up-lock`. The storage refuses a second study of one name, so of workers
starting at the same moment exactly one gets it.

The holder beats a counter in the lock study while it measures. A waiting worker that sees the
counter stand still for the grace period (by its own clock: machines' clocks need not agree)
takes the holder for dead and removes the lock, by its id, so that a newer lock is never removed.
"""

from __future__ import annotations

import contextlib
import threading
import time

from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

from apostate.workers.storage import STORAGE_ERRORS


class StartupLock:
    def __init__(self, storage: BaseStorage, study_name: str, worker: str, beat_seconds: float, grace_seconds: float):
        self.storage = storage
        self.name = f"{study_name}:start-up-lock"
        self.worker = worker
        self.beat_seconds = beat_seconds
        self.grace_seconds = grace_seconds
        self._held: int | None = None  # the lock study's id while this worker holds it
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None
        self._seen: tuple[int, object, float] | None = None  # (lock id, counter, when it last changed)

    def acquire(self) -> bool:
        """Take the lock if no worker holds it; beat while holding it."""
        try:
            self._held = self.storage.create_new_study(directions=[StudyDirection.MINIMIZE], study_name=self.name)
        except DuplicatedStudyError:
            return False
        self.storage.set_study_user_attr(self._held, "holder", self.worker)
        self._stop.clear()
        self._beats = threading.Thread(target=self._beat, args=(self._held,), daemon=True)
        self._beats.start()
        return True

    def release(self) -> None:
        if self._held is None:
            return
        self._stop.set()
        self._beats.join()
        with contextlib.suppress(KeyError, *STORAGE_ERRORS):  # a lost database: the lock goes stale instead
            self.storage.delete_study(self._held)
        self._held = None

    def holder(self) -> str | None:
        """The worker holding the lock (None: nobody), after removing a lock whose holder stopped beating."""
        try:
            lock_id = self.storage.get_study_id_from_name(self.name)
            attrs = self.storage.get_study_user_attrs(lock_id)
        except KeyError:
            return None
        beat, now = attrs.get("beat"), time.monotonic()
        if self._seen is None or self._seen[:2] != (lock_id, beat):
            self._seen = (lock_id, beat, now)
        elif now - self._seen[2] > self.grace_seconds:
            with contextlib.suppress(KeyError):  # another waiter removed it first
                self.storage.delete_study(lock_id)
            return None
        return attrs.get("holder", "another worker")

    def _beat(self, lock_id: int) -> None:
        count = 0
        while True:
            count += 1
            with contextlib.suppress(KeyError, *STORAGE_ERRORS):
                self.storage.set_study_user_attr(lock_id, "beat", count)
            if self._stop.wait(self.beat_seconds):
                return
