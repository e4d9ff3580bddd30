"""In-order background delivery with bounded retry: a thread sends queued operations one at a time, a failed one
stays at the head and is retried (after ``retry_interval_s``, or at once on :meth:`flush`), so a slow or absent
receiver never blocks the caller and never reorders what it receives. Generic: the MLflow tracker
(``mlflow_logger``) queues its requests here; nothing here imports MLflow.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("pretrain.tracking")     # one logger for the package, as before the split


class DeliveryQueue:
    """Args:
        receiver: who receives the operations, for log lines (e.g. "MLflow").
        target: what operations are sent to, for log lines (e.g. the tracking URI).
        warn_once: called with a message when an operation fails (the caller decides how often it warns).
        max_pending: the most queued operations kept while failing; older ones are dropped (and counted).
        retry_interval_s: how long to wait before retrying a failed head.
        thread_name: the delivery thread's name.
    """

    def __init__(self, receiver: str, target: str, *, warn_once: Callable[[str], None], max_pending: int,
                 retry_interval_s: float, thread_name: str):
        self.receiver, self.target = receiver, target
        self.warn_once = warn_once
        self.max_pending = max_pending
        self.retry_interval_s = retry_interval_s
        # New operations arrive in _incoming; the worker moves them to _pending and sends them in order; a
        # failed one stays at the head of _pending and is retried later.
        self._lock = threading.Condition()
        self._incoming: collections.deque = collections.deque()
        self._pending: collections.deque = collections.deque()
        self._outstanding = 0
        self._dropped = 0
        self._failing = False
        self._stop = False
        self._retry_now = False
        self._thread = threading.Thread(target=self._worker, name=thread_name, daemon=True)
        self._thread.start()

    @property
    def outstanding(self) -> int:
        """Operations submitted and not yet delivered (nor dropped)."""
        with self._lock:
            return self._outstanding

    def submit(self, what: str, op: Callable[[], Any]) -> None:
        """Queue ``op`` (``what`` names it in a warning); it runs on the delivery thread."""
        with self._lock:
            self._incoming.append((what, op))
            self._outstanding += 1
            self._lock.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is delivered (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._outstanding:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._retry_now = True            # a failed record is retried now, not after retry_interval_s
                self._lock.notify_all()
                self._lock.wait(min(remaining, 0.5))
        return True

    def stop(self) -> None:
        """The thread delivers what is queued and ends; after a failure it gives up instead of retrying."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()

    def _worker(self) -> None:
        while True:
            with self._lock:
                while (not self._incoming and not (self._pending and not self._failing) and not self._stop
                       and not (self._pending and self._retry_now)):
                    if self._pending:           # failing: wait, then retry the head
                        if not self._lock.wait(self.retry_interval_s):
                            break
                    else:
                        self._lock.wait()
                self._retry_now = False
                if self._stop and not self._incoming and not self._pending:
                    return
                while self._incoming:
                    self._pending.append(self._incoming.popleft())
                overflow = len(self._pending) - self.max_pending
                for _ in range(max(overflow, 0)):
                    self._pending.popleft()
                    self._dropped += 1
                    self._outstanding -= 1
                if overflow > 0:
                    self._lock.notify_all()
                if not self._pending:
                    continue
                what, op = self._pending[0]
            try:
                op()
            except Exception as err:   # never let a delivery failure reach the caller
                with self._lock:
                    self._failing = True
                    if self._stop:         # the owner gave up waiting: do not retry forever
                        self._pending.clear()
                        self._outstanding = 0
                        self._lock.notify_all()
                        return
                self.warn_once(f"{self.receiver} logging to {self.target} failed ({what}: "
                               f"{type(err).__name__}: {str(err)[:300]})")
                continue
            with self._lock:
                self._pending.popleft()
                self._outstanding -= 1
                if self._failing:
                    self._failing = False
                    logger.warning("%s at %s reachable again%s", self.receiver, self.target,
                                   f"; {self._dropped} queued record(s) were dropped" if self._dropped else "")
                self._lock.notify_all()
