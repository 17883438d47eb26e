"""Fair shares of a replica's render capacity between API keys.

A replica that sends renders to the Generator (an ingress, a job runner) sends at most
``renders_at_once`` at a time. The rest wait in one queue per API key, and a freed place
goes to the keys in turn (round robin over the keys that have a render waiting), so one
key's burst waits behind its own renders, never in front of another key's. A key may have at
most ``waiting_per_key`` renders waiting; one more is refused at once (503 ``overloaded``,
for that key only). Plain asyncio, one instance per replica (no Ray).
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import asynccontextmanager

from .errors import Overloaded, Timeout


class FairQueue:
    def __init__(self, renders_at_once: int, waiting_per_key: int, retry_after_s: int = 5) -> None:
        if renders_at_once < 1:
            raise ValueError("renders_at_once must be at least 1")
        self.free = renders_at_once
        self.waiting_per_key, self.retry_after_s = waiting_per_key, retry_after_s
        self._waiting: dict[str, deque[asyncio.Future]] = {}
        self._turns: deque[str] = deque()  # keys with a render waiting, in the order they are served

    def waiting(self, owner: str) -> int:
        return len(self._waiting.get(owner, ()))

    def busy(self) -> bool:
        """Whether a render arriving now would wait."""
        return self.free == 0

    @asynccontextmanager
    async def place(self, owner: str, timeout_s: float | None = None):
        """Hold one of the replica's places for a render of ``owner``'s while the block runs;
        :class:`Timeout` when none came within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._acquire(owner), timeout_s)
        except asyncio.TimeoutError:
            raise Timeout("the render waited its whole time for its turn") from None
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, owner: str) -> None:
        if self.free > 0 and not self._turns:
            self.free -= 1
            return
        queue = self._waiting.setdefault(owner, deque())
        if len(queue) >= self.waiting_per_key:
            if not queue:
                del self._waiting[owner]
            raise Overloaded(f"this API key already has {self.waiting_per_key} renders waiting; retry later",
                             self.retry_after_s)
        granted = asyncio.get_running_loop().create_future()
        queue.append(granted)
        if owner not in self._turns:
            self._turns.append(owner)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # the place was handed over as we left: pass it on
                self._release()
            else:
                self._forget(owner, granted)
            raise

    def _forget(self, owner: str, granted: asyncio.Future) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self._waiting[owner]
                self._turns.remove(owner)

    def _release(self) -> None:
        while self._turns:
            owner = self._turns.popleft()
            queue = self._waiting[owner]
            granted = queue.popleft()
            if queue:
                self._turns.append(owner)  # its next render waits for the other keys' turns
            else:
                del self._waiting[owner]
            if not granted.done():
                granted.set_result(None)  # the place passes to this render
                return
        self.free += 1
