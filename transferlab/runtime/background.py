"""One worker thread behind a bounded queue: slow writes overlap compute, memory stays
bounded, and a job's error surfaces in the caller's thread on its next call."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class BackgroundJobs:
    """Run submitted jobs in order on one thread; after a failure later jobs are skipped."""

    def __init__(self, name: str, queue_size: int = 2):
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], check: Callable[[], None]) -> None:
        """Queue ``job``, calling ``check`` (which raises to give up) while the queue is full."""
        while True:
            check()
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def stop(self) -> None:
        """Let the thread run what is queued, then end it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as exc:
                    self.error = exc
