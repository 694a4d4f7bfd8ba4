"""How often the cockpit draws: up to ``redraw_hz`` frames a second, and, while the host's cores are all busy,
only as often as keeps the cockpit's own CPU under a budget.

Why: on a machine where training keeps every core busy (CPU fine-tuning, torch using one thread per core), every
millisecond the cockpit computes is taken from training, and more than that, since torch's threads wait for each
other at the end of every parallel op. Measured on 2 vCPUs (the demo model at full speed, 320–640 steps/s):
the cockpit drawing ~10 frames a second took ~9% of a core and training slowed by 12–19%. A frame costs about the same
whatever it shows, so drawing less often is what saves CPU; where cores are free (a GPU run, a workstation) nothing
is gained by it and the cockpit draws at its full rate.

:class:`FramePacer` is pure logic, its clocks and load probe passed in, tested without a screen; :class:`HostLoad`,
the probe the app uses, reads ``/proc/stat`` or the load average.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["DEFAULT_CPU_BUDGET", "MAX_FRAME_INTERVAL_S", "FramePacer", "HostLoad", "host_busy"]

DEFAULT_CPU_BUDGET = 0.03  # share of one core `fts-tui` aims to stay under while the host is busy
MAX_FRAME_INTERVAL_S = 1.0  # however busy the host, the charts move at least once a second
BUSY_LOAD_SHARE = 0.9  # busy: the 1-minute load average is at least this share of the core count
BUSY_IDLE_SHARE = 0.1  # busy: the cores were idle less than this share of the time since the last probe
BUSY_RECHECK_S = 5.0  # how often the pacer asks whether the host is busy


def host_busy() -> bool:
    """Whether the host's runnable threads fill (nearly) all its cores, by the 1-minute load average."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform: assume cores to spare
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return load >= BUSY_LOAD_SHARE * cores


def read_proc_stat(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) CPU time of all cores in jiffies since boot (Linux), or None where there is no such file."""
    try:
        with open(path, encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 6:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    try:
        ticks = [int(v) for v in fields[1:9]]
    except ValueError:
        return None
    return ticks[3] + ticks[4], sum(ticks)


class HostLoad:
    """Whether the host's cores are all busy, asked every few seconds.

    On Linux, from the share of CPU time the cores spent idle since the last question (``/proc/stat``): training
    that keeps every core busy shows at once (idle ~0% on 2 vCPUs with torch on both, ~100% once it stops), where
    the 1-minute load average took over a minute to reach its threshold. The first question, and every question
    where ``/proc/stat`` cannot be read, is answered from the load average.
    """

    def __init__(self, read_stat: Callable[[], tuple[int, int] | None] = read_proc_stat,
                 fallback: Callable[[], bool] = host_busy) -> None:
        self.read_stat = read_stat
        self.fallback = fallback
        self._last: tuple[int, int] | None = None

    def __call__(self) -> bool:
        sample = self.read_stat()
        last, self._last = self._last, sample
        if sample is None or last is None or sample[1] <= last[1]:
            return self.fallback()
        idle, total = sample[0] - last[0], sample[1] - last[1]
        return idle < BUSY_IDLE_SHARE * total


@dataclass
class FramePacer:
    """The shortest time between two frames.

    ``budget`` is a share of one core (0.03: 3%), or None for no budget. While ``busy()`` says so (asked every
    ``BUSY_RECHECK_S``; the app passes a :class:`HostLoad`), the interval is
    what a frame costs divided by the budget, between ``min_interval`` and ``max_interval``. What a frame costs is
    the process's CPU time from one frame to the next (smoothed): drawing, compositing, but also receiving events
    and idling, so the estimate errs on the side of fewer frames. With a cost of ``f + x * T`` for frames ``T``
    apart (``x``: what the process spends per second whatever it draws), the interval settles at ``f / (budget -
    x)``, where the process's share is the budget, or at ``max_interval`` when ``x`` alone exceeds the budget.
    """

    min_interval: float
    budget: float | None = None
    max_interval: float = MAX_FRAME_INTERVAL_S
    busy: Callable[[], bool] = host_busy
    cpu: Callable[[], float] = time.process_time
    clock: Callable[[], float] = time.monotonic
    smoothing: float = 0.3
    cost: float | None = field(default=None, init=False)  # smoothed CPU seconds per frame
    _cpu_at: float | None = field(default=None, init=False)
    _busy: bool = field(default=False, init=False)
    _busy_at: float | None = field(default=None, init=False)

    def frame(self) -> None:
        """A frame was drawn: what the process used since the one before is what a frame costs."""
        now = self.cpu()
        if self._cpu_at is not None:
            used = max(0.0, now - self._cpu_at)
            self.cost = used if self.cost is None else self.cost + self.smoothing * (used - self.cost)
        self._cpu_at = now

    def host_is_busy(self) -> bool:
        now = self.clock()
        if self._busy_at is None or now - self._busy_at >= BUSY_RECHECK_S:
            self._busy, self._busy_at = bool(self.busy()), now
        return self._busy

    def interval(self) -> float:
        if not self.budget or self.cost is None or not self.host_is_busy():
            return self.min_interval
        return min(max(self.min_interval, self.max_interval), max(self.min_interval, self.cost / self.budget))

    def throttled(self) -> float | None:
        """The interval, where the budget has made it longer than the frame rate's (for the header); else None."""
        interval = self.interval()
        return interval if interval > 1.5 * self.min_interval else None
