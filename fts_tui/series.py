"""Bounded time series for charts: full resolution while short, min/max-decimated once long.

Pure Python (``array('d')``), no numpy: the TUI must start fast and stay small. A :class:`Series` keeps at most
``capacity`` stored points whatever the run length. While it is shorter than that, every point is kept. When it
fills up, each run of four stored points is replaced by its lowest and highest point (in step order), which halves
the storage and doubles the number of raw points each stored pair stands for (``stride``); new points are then
gathered ``stride`` at a time into such a min/max pair. So the whole run stays visible, with uniform resolution,
and spikes and LR resets survive decimation (a mean would smear them).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_INFINITIES = (math.inf, -math.inf)


@dataclass
class Series:
    capacity: int = 4096
    xs: array = field(default_factory=lambda: array("d"))
    ys: array = field(default_factory=lambda: array("d"))
    stride: int = 1  # raw points per stored min/max pair once decimated (1: every point is stored as is)
    count: int = 0  # raw points ever added
    last_x: float = math.nan
    last_y: float = math.nan
    _pend_x: list[float] = field(default_factory=list)
    _pend_y: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.capacity < 8 or self.capacity % 4:
            raise ValueError("capacity must be a multiple of 4, at least 8")

    def __len__(self) -> int:
        return self.count

    def append(self, x: float, y: float) -> None:
        """Add a point (``y`` None, NaN or infinite is skipped). The hot path of the TUI: keep it lean."""
        if y is None or y != y or y in _INFINITIES:
            return
        self.count += 1
        self.last_x = x
        self.last_y = y
        if self.stride == 1:
            self.xs.append(x)
            self.ys.append(y)
            if len(self.xs) >= self.capacity:
                self._compact()
            return
        pend_x = self._pend_x
        pend_x.append(x)
        self._pend_y.append(y)
        if len(pend_x) >= self.stride:
            self._flush_pending()
            if len(self.xs) >= self.capacity:
                self._compact()

    def extend(self, points: Iterable[tuple[float, float]]) -> None:
        for x, y in points:
            self.append(x, y)

    def load(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        """Append the points ``zip(xs, ys)`` (a snapshot's columns), skipping those with a non-finite ``x`` or ``y``:
        the same as append() per point, in one copy when they fit as they are."""
        if self.stride == 1 and len(self.xs) + len(xs) < self.capacity and len(xs) == len(ys) and xs:
            # a sum is finite only if every term is (NaN and inf propagate; an overflow only takes the slow path)
            if math.isfinite(sum(xs)) and math.isfinite(sum(ys)):
                self.xs.extend(array("d", xs))
                self.ys.extend(array("d", ys))
                self.count += len(xs)
                self.last_x, self.last_y = float(xs[-1]), float(ys[-1])
                return
        for x, y in zip(xs, ys):
            if x - x == 0.0:  # finite
                self.append(x, y)

    def _flush_pending(self) -> None:
        px, py = self._pend_x, self._pend_y
        lo = min(range(len(py)), key=py.__getitem__)
        hi = max(range(len(py)), key=py.__getitem__)
        if lo == hi:  # flat: keep the stretch's ends
            lo, hi = 0, len(py) - 1
        for i in sorted((lo, hi)):
            self.xs.append(px[i])
            self.ys.append(py[i])
        px.clear()
        py.clear()

    def _compact(self) -> None:
        xs, ys = self.xs, self.ys
        nx, ny = array("d"), array("d")
        n = len(xs) - len(xs) % 4
        for start in range(0, n, 4):
            idx = range(start, start + 4)
            lo = min(idx, key=ys.__getitem__)
            hi = max(idx, key=ys.__getitem__)
            a, b = (lo, hi) if lo < hi else (hi, lo) if lo > hi else (start, start + 3)
            nx.append(xs[a])
            ny.append(ys[a])
            nx.append(xs[b])
            ny.append(ys[b])
        # a partial group at the end (only possible right after a snapshot load) is kept as is
        nx.extend(xs[n:])
        ny.extend(ys[n:])
        self.xs, self.ys = nx, ny
        self.stride = 4 if self.stride == 1 else self.stride * 2

    def points(self) -> tuple[list[float], list[float]]:
        """Stored points plus the not-yet-decimated tail (so the newest value always shows)."""
        return list(self.xs) + self._pend_x, list(self.ys) + self._pend_y

    def slice_x(self, lo: float, hi: float) -> tuple[list[float], list[float]]:
        """Points with ``lo <= x < hi``."""
        xs, ys = self.points()
        out_x, out_y = [], []
        for x, y in zip(xs, ys):
            if lo <= x < hi:
                out_x.append(x)
                out_y.append(y)
        return out_x, out_y

    def clear(self) -> None:
        self.xs, self.ys = array("d"), array("d")
        self._pend_x.clear()
        self._pend_y.clear()
        self.stride = 1
        self.count = 0
        self.last_x = self.last_y = math.nan
