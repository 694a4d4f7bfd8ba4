"""Run the reliability tests (``tests/test_reliability_*.py``) and print every figure they measured.

    python bench/reliability.py                 # everything: about 9 minutes on 2 cores
    python bench/reliability.py -k crash        # one item (pytest -k expression)
    python bench/reliability.py --json out.json # also write the figures as JSON

Each test reports its figure through ``tests/reliability_support.figure``; this script collects them from
``$FTS_RELIABILITY_FIGURES`` and prints them as one table after pytest's own output. The exit code is pytest's: a
figure that misses its bound fails its test, and the figure is printed all the same. (The same figures appear in
the "reliability figures" section of any pytest run that includes these tests, ``make test`` included.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="keyword", help="only the tests matching this pytest -k expression")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("-q", "--quiet", action="store_true", help="hide pytest's own output")
    args = parser.parse_args()
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_reliability_*.py"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", *tests]
    if args.keyword:
        cmd += ["-k", args.keyword]
    with tempfile.TemporaryDirectory(prefix="fts-reliability-") as tmp:
        figures_file = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "FTS_RELIABILITY_FIGURES": str(figures_file)}
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE if args.quiet else None,
                              stderr=subprocess.STDOUT if args.quiet else None)
        elapsed = time.monotonic() - started
        figures = [json.loads(line) for line in figures_file.read_text().splitlines()] if figures_file.exists() else []
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nreliability figures ({len(figures)}; {elapsed:.0f}s; {os.cpu_count()} cores; load average now "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; pytest exit {proc.returncode})")
    for record in figures:
        print(f"\n* {record['key']}")
        print(textwrap.fill(record["text"], width=116, initial_indent="    ", subsequent_indent="    "))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
