"""Driver progress lines for long work: `done/total, rate, extra` every few seconds, then a
closing line. Ray Data draws its own bars (`--no-progress` turns them off); these lines are what
`ray job logs` and CI logs show."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("rayclust")


class Progress:
    """`with Progress(total, "embedding", "img") as p: p.update(n, errors=3)`."""

    def __init__(self, total: int, desc: str, unit: str = "it", every_seconds: float = 10.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.every = every_seconds
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1, **extra) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            details = "".join(f", {k} {v}" for k, v in extra.items())
            log.info("%s: %d/%d %s, %.1f %s/s%s", self.desc, self.done, self.total, self.unit,
                     rate, self.unit, details)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.started
        log.info("%s: %d %s in %.1f s (%.1f %s/s)", self.desc, self.done, self.unit, elapsed,
                 self.done / max(elapsed, 1e-9), self.unit)
