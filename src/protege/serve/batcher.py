"""The model thread of `protege serve`: one thread owns the model and answers requests in batches."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

from .metrics import Metrics


class Batcher:
    """One thread owns the model and answers whatever is waiting, up to `max_batch` at once.

    A lone request on an idle server is answered at once. Under load (the last batch held
    more than one request) the thread lets `wait_s` pass, or `max_batch` requests gather,
    before it starts: clients in a closed loop send their next requests a moment apart, and
    without the wait the first of them would go alone and the rest one batch later (at 8
    clients, batches of 1 and 7 by turns). It waits no longer once as many requests as the
    last batch held have come (waiting on would leave the model idle for clients that are
    not coming); whatever is queued by then joins too. A batch of one ends the waiting."""

    def __init__(self, predict, max_batch: int = 32, metrics: Metrics | None = None, wait_s: float = 0.005):
        self.predict, self.max_batch, self.metrics = predict, max_batch, metrics or Metrics()
        self.wait_s = wait_s
        self.last = 1
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="protege-serve-model", daemon=True)
        self.thread.start()

    def submit(self, row: dict, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        fut = loop.create_future()
        self.queue.put((row, fut, loop))
        return fut

    def _take(self) -> list | None:
        """The next batch; None once closed."""
        first = self.queue.get()
        if first is None:
            return None
        items = [first]
        deadline = time.monotonic() + self.wait_s if self.last > 1 and self.wait_s > 0 else None
        while len(items) < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except queue.Empty:
                if len(items) >= self.last:  # as many as the last batch: the clients it answered are back
                    break
                remaining = deadline - time.monotonic() if deadline is not None else 0.0
                if remaining <= 0:
                    break
                try:
                    nxt = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if nxt is None:
                self.queue.put(None)
                break
            items.append(nxt)
        self.last = len(items)
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            self.metrics.observe_batch(len(items))
            try:
                preds = self.predict([row for row, _, _ in items])
                for (_, fut, loop), pred in zip(items, preds):
                    loop.call_soon_threadsafe(_resolve, fut, pred, None)
            except Exception as exc:  # the model failed: every waiting request gets the error
                for _, fut, loop in items:
                    loop.call_soon_threadsafe(_resolve, fut, None, exc)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)


def _resolve(fut: asyncio.Future, value, exc) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)
