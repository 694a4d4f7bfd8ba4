"""The cockpit's frame pacing: its CPU budget while the host is busy (pure logic, clocks passed in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fts_tui import pacing
from fts_tui.pacing import FramePacer, HostLoad


class Host:
    """A fake process clock and load probe: each frame costs ``f`` CPU seconds, and the process spends ``x`` of a
    core whatever it draws (receiving events)."""

    def __init__(self, f: float, x: float, busy: bool = True) -> None:
        self.f, self.x, self.busy_now = f, x, busy
        self.cpu_s = self.wall_s = 0.0
        self.probes = 0

    def busy(self) -> bool:
        self.probes += 1
        return self.busy_now

    def run(self, pacer: FramePacer, frames: int) -> list[float]:
        """Draw ``frames`` frames as often as the pacer allows; the intervals it gave."""
        intervals = []
        for _ in range(frames):
            gap = pacer.interval()
            intervals.append(gap)
            self.wall_s += gap
            self.cpu_s += self.x * gap + self.f
            pacer.frame()
        return intervals


def pacer_for(host: Host, budget: float | None, min_interval: float = 0.05) -> FramePacer:
    return FramePacer(min_interval, budget, busy=host.busy, cpu=lambda: host.cpu_s, clock=lambda: host.wall_s)


def test_on_a_busy_host_frames_are_spaced_so_the_cockpit_stays_within_its_budget() -> None:
    host = Host(f=0.008, x=0.01)
    pacer = pacer_for(host, budget=0.03)
    intervals = host.run(pacer, 60)
    settled = intervals[-1]
    assert settled == pytest.approx(0.008 / (0.03 - 0.01), rel=0.02)  # f / (budget - x)
    assert (host.x * settled + host.f) / settled == pytest.approx(0.03, rel=0.02)  # the budget, spent
    assert pacer.throttled() == pytest.approx(settled)
    assert intervals[0] == 0.05  # no cost known before the first frame: the frame rate's interval


def test_cheap_frames_or_cores_to_spare_keep_the_full_frame_rate() -> None:
    cheap = Host(f=0.0005, x=0.002)
    assert set(cheap.run(pacer_for(cheap, budget=0.03), 30)) == {0.05}
    idle = Host(f=0.008, x=0.01, busy=False)
    pacer = pacer_for(idle, budget=0.03)
    assert set(idle.run(pacer, 30)) == {0.05}
    assert pacer.throttled() is None
    free = Host(f=0.008, x=0.01)
    assert set(free.run(pacer_for(free, budget=None), 30)) == {0.05}


def test_when_receiving_alone_exceeds_the_budget_frames_come_once_a_second() -> None:
    host = Host(f=0.008, x=0.05)
    intervals = host.run(pacer_for(host, budget=0.03), 30)
    assert intervals[-1] == pacing.MAX_FRAME_INTERVAL_S
    assert max(intervals) == pacing.MAX_FRAME_INTERVAL_S


def test_the_load_is_probed_every_few_seconds_and_the_pacer_follows_it() -> None:
    host = Host(f=0.008, x=0.01)
    pacer = pacer_for(host, budget=0.03)
    host.run(pacer, 40)  # ~0.4 s apart: ~16 s
    assert 2 <= host.probes <= host.wall_s / pacing.BUSY_RECHECK_S + 1
    host.busy_now = False
    host.wall_s += pacing.BUSY_RECHECK_S
    assert pacer.interval() == 0.05  # the machine is no longer busy: the full frame rate again


@pytest.mark.parametrize(("load", "cores", "busy"), [(1.9, 2, True), (1.7, 2, False), (30.0, 32, True),
                                                     (8.0, 32, False)])
def test_host_busy_compares_the_load_average_with_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch, load: float, cores: int, busy: bool
) -> None:
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert pacing.host_busy() is busy


def test_host_busy_is_false_where_the_load_average_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable() -> tuple[float, float, float]:
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert pacing.host_busy() is False


def test_host_load_reads_the_idle_share_since_the_last_question() -> None:
    samples: list[tuple[int, int] | None] = [(1000, 10_000), (1005, 11_000), (1905, 12_000), None, (2000, 13_000),
                                             (2010, 14_000)]
    fallback_calls: list[int] = []

    def fallback() -> bool:
        fallback_calls.append(1)
        return False

    load = HostLoad(read_stat=lambda: samples.pop(0), fallback=fallback)
    assert load() is False and len(fallback_calls) == 1  # nothing to compare with yet: the load average
    assert load() is True  # idle 5 of 1000 ticks
    assert load() is False  # idle 900 of 1000
    assert load() is False and len(fallback_calls) == 2  # /proc/stat unreadable this time
    assert load() is False and len(fallback_calls) == 3  # and no sample to compare with after it
    assert load() is True  # idle 10 of 1000


def test_read_proc_stat_sums_the_cpu_line(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 5 50 800 20 1 2 3 7 0\ncpu0 50 2 25 400 10 0 1 1 3 0\n", encoding="ascii")
    assert pacing.read_proc_stat(str(stat)) == (820, 981)  # idle + iowait, user..steal (guest is within user)
    stat.write_text("intr 1 2 3\n", encoding="ascii")
    assert pacing.read_proc_stat(str(stat)) is None
    stat.write_text("cpu  100 5 x 800 20\n", encoding="ascii")
    assert pacing.read_proc_stat(str(stat)) is None
    assert pacing.read_proc_stat(str(tmp_path / "missing")) is None
    if Path("/proc/stat").exists():  # this host's own
        idle, total = pacing.read_proc_stat()  # type: ignore[misc]
        assert 0 <= idle <= total
