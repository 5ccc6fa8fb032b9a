"""Progress for long work: tqdm bars on a terminal, or plain periodic lines (`--no-progress`)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rayclust")


class Progress:
    """`with Progress(total, "embedding", enabled) as p: p.update(n)`."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "it",
                 every_seconds: float = 30.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.every = every_seconds
        self.started = self.last = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                            dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            log.info("%s: %d/%d %s (%.1f %s/s) %s", self.desc, self.done, self.total, self.unit,
                     rate, self.unit, extra)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = time.perf_counter() - self.started
        log.info("%s: %d %s in %.1f s", self.desc, self.done, self.unit, elapsed)
