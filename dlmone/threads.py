"""A training loop's OpenMP thread count, chosen by measurement while it runs.

dlmone's results are bitwise the same for any number of threads (every kernel splits its
work by the shape only), so a loop may change the count at any step without changing
what it computes. With cores of its own a step runs fastest on all of them; next to
another busy process, every kernel's barrier waits for whichever thread was preempted,
and a 2-thread step can run many times slower than the same step on one thread.
:class:`ThreadGovernor` keeps timing the steps and tries the other count (one thread, or
all of them) now and then, and at once when steps slow down; it keeps the faster.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from . import get_num_threads, set_num_threads


def _median(xs: List[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


class ThreadGovernor:
    """Call :meth:`step` with each training step's wall-clock seconds; it sets the thread
    count for the next steps. ``window`` steps make one measurement (the first step after
    a switch is not counted: it pays for the switch); every ``probe_every`` steps, or as
    soon as the current count's median step is ``slowdown`` times its best, the other count
    gets a window, and it is kept when it is ``margin`` faster. ``max_threads`` (default:
    the count when created) is restored by :meth:`close`."""

    def __init__(self, max_threads: Optional[int] = None, window: int = 4, probe_every: int = 200,
                 slowdown: float = 1.5, margin: float = 0.1) -> None:
        self.max_threads = int(max_threads or get_num_threads())
        if self.max_threads < 1 or window < 1 or probe_every < 1 or slowdown <= 1 or not 0 <= margin < 1:
            raise ValueError("ThreadGovernor needs max_threads >= 1, window >= 1, probe_every >= 1, "
                             "slowdown > 1 and 0 <= margin < 1")
        self.window, self.probe_every, self.slowdown, self.margin = window, probe_every, slowdown, margin
        self.threads = self.max_threads
        self.best: Dict[int, float] = {}     # the fastest median step seen at each count
        self.recent: List[float] = []        # this count's steps since its last switch
        self.since_probe = probe_every  # the first measurement is challenged at once
        self.probing_from: Optional[float] = None  # the median being challenged by a probe
        self.switches = 0
        set_num_threads(self.threads)

    def _switch(self, threads: int) -> None:
        self.threads, self.recent = threads, []
        self.switches += 1
        set_num_threads(threads)

    def step(self, seconds: float) -> None:
        if self.max_threads == 1:
            return
        self.recent.append(float(seconds))
        self.since_probe += 1
        if len(self.recent) <= self.window:  # the first one paid for the switch
            return
        median = _median(self.recent[-self.window:])
        if len(self.recent) > 2 * self.window:
            del self.recent[:-self.window]
        self.best[self.threads] = min(self.best.get(self.threads, median), median)
        other = 1 if self.threads == self.max_threads else self.max_threads
        if self.probing_from is not None:  # the probe's window is complete
            if median > self.probing_from * (1.0 - self.margin):
                self._switch(other)  # not better: back
            self.probing_from = None
            self.since_probe = 0
        elif self.since_probe >= self.probe_every or median > self.slowdown * self.best[self.threads]:
            self.probing_from = median
            self._switch(other)

    def close(self) -> None:
        set_num_threads(self.max_threads)
