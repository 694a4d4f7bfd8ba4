"""A subscriber in its own process (so a test can SIGSTOP it): follows a daemon with the Clone pattern and rebuilds
the run's state from snapshots and events, then writes that state as JSON when the run ends.

    python -m tests.reliability_subscriber PUB CTL OUT [--rcvhwm N]

The state is rebuilt the way every client must: a snapshot *replaces* it, events after the snapshot update it. A
``seq`` gap (events lost while this process was stopped) makes the follower snapshot again by itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fts_daemon import events as ev
from fts_daemon.client import Follower


def from_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": {tag: {str(step): value for step, value in points} for tag, points in snap["lr"].items()},
        "edits": {str(e["id"]): e["status"] for e in snap["edits"]},
        "transitions": [t["to"] for t in snap["transitions"]],
        "phase": snap["phase"],
        "state": snap["state"],
        "seq": snap["seq"],
    }


def apply(state: dict[str, Any], event: ev.Event) -> None:
    state["seq"] = event.seq
    if event.kind == ev.LR:
        for tag, value in event.data["lrs"].items():
            state["lr"].setdefault(tag, {})[str(event.step)] = value
    elif event.kind == ev.EDIT and event.data["edit"].get("id"):
        state["edits"][str(event.data["edit"]["id"])] = event.data["edit"]["status"]
    elif event.kind == ev.TRANSITION:
        state["transitions"].append(event.data["to"])
        state["phase"] = event.data["to"]
    elif event.kind == ev.STATE:
        state["state"] = event.data["state"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pub")
    parser.add_argument("ctl")
    parser.add_argument("out")
    parser.add_argument("--rcvhwm", type=int, default=1000)  # ZeroMQ's default receive high-water mark
    args = parser.parse_args()
    out = Path(args.out)
    state: dict[str, Any] = {}
    resyncs: list[float] = []
    with Follower(args.pub, args.ctl, rcvhwm=args.rcvhwm) as follower:
        for kind, item in follower.follow(timeout=120):
            if kind == "snapshot":
                state = from_snapshot(item)
                resyncs.append(time.time())
                if len(resyncs) == 1:
                    out.with_suffix(".ready").write_text("attached\n")
                continue
            apply(state, item)
            if item.kind == ev.STATE and item.data["state"] in ("finished", "failed"):
                break
        state.update(snapshots=follower.snapshots, gaps=follower.tracker.gaps, resyncs=resyncs)
    out.write_text(json.dumps(state))


if __name__ == "__main__":
    main()
