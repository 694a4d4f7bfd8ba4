"""Generate the golden LR trajectories with the REAL finetuning-scheduler (the parity oracle).

Usage (from the repository root; build the env first with tests/parity/setup_oracle_env.sh):

    .venv-oracle/bin/python tests/parity/gen_golden.py                 # all scenarios
    .venv-oracle/bin/python tests/parity/gen_golden.py NAME [NAME...]  # selected scenarios
    .venv-oracle/bin/python tests/parity/gen_golden.py --check [NAME...]
        # regenerate into a temp dir and compare byte-for-byte with the committed golden files

Each scenario runs in a fresh subprocess (clean global state: seeds, logging level, torch
deterministic flags) inside its own temporary directory. Output: tests/parity/golden/<name>.json.
If FTS raises, the golden file records the error under "fts_error" instead of trajectories.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_DIR = os.path.join(HERE, "golden")
FORMAT_VERSION = 1


def _versions() -> dict:
    import finetuning_scheduler
    import lightning
    import torch

    return {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "finetuning_scheduler": finetuning_scheduler.__version__,
        "python": "{}.{}".format(*sys.version_info[:2]),
    }


def _child(name: str, out_path: str, work_dir: str) -> int:
    """Run one scenario with the oracle and write its golden JSON to ``out_path``."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import scenarios  # noqa: E402

    spec = scenarios.SCENARIOS[name]
    doc: dict = {
        "format_version": FORMAT_VERSION,
        "scenario": name,
        "description": spec["description"],
        "versions": _versions(),
        "spec": spec,
    }
    try:
        import finetuning_scheduler
        import lightning.pytorch as pl

        result = scenarios.run_scenario(name, pl, finetuning_scheduler, work_dir)
        doc.update({k: v for k, v in result.items() if k != "scenario"})
    except BaseException as err:  # noqa: BLE001 - record anything FTS raises (incl. SystemExit)
        tb = traceback.format_exception(type(err), err, err.__traceback__)
        doc["fts_error"] = {"type": type(err).__name__, "message": str(err), "traceback_tail": "".join(tb[-3:])}
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, sort_keys=False)
        fh.write("\n")
    return 0


def _run_one(name: str, out_path: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix=f"fts_golden_{name}_") as work:
        env = dict(os.environ, PYTHONHASHSEED="0", CUBLAS_WORKSPACE_CONFIG=":4096:8")
        log_path = os.path.join(work, "child.log")
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", name, out_path, os.path.join(work, "run")],
                cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        dt = time.monotonic() - t0
        if proc.returncode != 0 or not os.path.exists(out_path):
            with open(log_path) as log:
                tail = log.read()[-4000:]
            raise RuntimeError(f"oracle subprocess for {name!r} failed (rc={proc.returncode}):\n{tail}")
    with open(out_path) as fh:
        doc = json.load(fh)
    status = "FTS ERROR: " + doc["fts_error"]["type"] + ": " + doc["fts_error"]["message"][:200] \
        if "fts_error" in doc else f"{len(doc['epoch_start'])} epochs, {len(doc['steps'])} steps"
    return dt, status


FINGERPRINT_REL_TOL = 1e-6  # weight fingerprints sum floats; another machine's summation order moves the last digits


def compare_golden(golden: str, fresh: str) -> tuple[bool, str]:
    """(same, note): LR trajectories and everything else must be equal; per-epoch weight fingerprints within
    FINGERPRINT_REL_TOL (seen on another 2-core VM: ~1e-9 relative in 19 of 22 scenarios, the LRs identical)."""
    if not os.path.exists(golden):
        return False, "no golden file"
    if open(golden, "rb").read() == open(fresh, "rb").read():
        return True, "identical"
    with open(golden) as fa, open(fresh) as fb:
        a, b = json.load(fa), json.load(fb)
    diffs: list[str] = []
    close = 0

    def walk(x: object, y: object, path: str) -> None:
        nonlocal close
        if isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                diffs.append(f"{path}: keys differ")
                return
            for k in x:
                walk(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y):
                diffs.append(f"{path}: {len(x)} vs {len(y)} items")
                return
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}[{i}]")
        elif x != y:
            if ("fingerprint" in path and isinstance(x, float) and isinstance(y, float)
                    and math.isclose(x, y, rel_tol=FINGERPRINT_REL_TOL)):
                close += 1
            else:
                diffs.append(f"{path}: {x!r} vs {y!r}")

    walk(a, b, "")
    if diffs:
        return False, "; ".join(diffs[:3]) + (f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else "")
    return True, f"equal; {close} weight fingerprint(s) within {FINGERPRINT_REL_TOL:g} relative"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="scenario names (default: all)")
    ap.add_argument("--check", action="store_true", help="regenerate to a temp dir and diff with golden/")
    ap.add_argument("--child", nargs=3, metavar=("NAME", "OUT", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        return _child(*args.child)

    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import scenarios  # noqa: E402

    names = args.names or list(scenarios.SCENARIOS)
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {unknown}; known: {list(scenarios.SCENARIOS)}")

    os.makedirs(GOLDEN_DIR, exist_ok=True)
    total0 = time.monotonic()
    mismatched: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fts_golden_check_") as check_dir:
        for name in names:
            target = os.path.join(GOLDEN_DIR, f"{name}.json")
            out = os.path.join(check_dir, f"{name}.json") if args.check else target
            dt, status = _run_one(name, out)
            note = ""
            if args.check:
                same, why = compare_golden(target, out)
                note = f"  [{why}]" if same else f"  [DIFFERS from golden: {why}]"
                if not same:
                    mismatched.append(name)
            print(f"{name:40s} {dt:6.1f}s  {status}{note}", flush=True)
    print(f"total {time.monotonic() - total0:.1f}s for {len(names)} scenario(s)")
    if mismatched:
        print(f"NOT deterministic / stale golden: {mismatched}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
