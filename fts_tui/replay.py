"""Read a run's ``events.jsonl`` (finished or crashed) for ``fts-tui replay``.

The reader lives in :mod:`fts_daemon.history` (torch-free), where the daemon also reads earlier starts' events back
on ``--resume``: a torn last line (a crash, or a run still being written) is skipped and reported, never fatal; a bad
line elsewhere is skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fts_daemon.history import EVENTS_FILE, events_path, iter_events, read_events
from fts_daemon.history import ReadReport as ReplayReport

__all__ = ["EVENTS_FILE", "ReplayReport", "events_path", "iter_events", "read_events", "read_run_meta"]


def read_run_meta(target: str | Path) -> dict[str, Any]:
    """Optional ``run.json`` beside the events (what the daemon registered), or ``{}``."""
    path = Path(target).expanduser()
    meta = (path if path.is_dir() else path.parent) / "run.json"
    try:
        obj = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}
