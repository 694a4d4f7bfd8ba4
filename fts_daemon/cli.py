"""``fts-daemon``: start, inspect, edit and stop phased fine-tuning runs.

Commands that only talk to a running daemon (``status``, ``stop``, ``runs``, ``edit``) import neither torch nor
Lightning, so they answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fts_daemon import registry
from fts_daemon.client import Control, ControlError
from fts_daemon.events import train_rate
from fts_daemon.history import final_state, last_position, run_state

# LightningCLI arguments passed through to the config (``--trainer.max_epochs=3``, ``--model.init_args.x=1``)
# how long `start --detach` waits, once the daemon listens, for it to build the config and model and start
# training, so that a config that cannot run is reported by `start` itself rather than found later by `status`
DETACH_SETTLE_S = 60.0
PASSTHROUGH_PREFIXES = ("--trainer.", "--model.", "--data.", "--seed_everything", "--optimizer", "--lr_scheduler")


def _split_passthrough(parser: argparse.ArgumentParser, extra: list[str]) -> list[str]:
    bad = [a for a in extra if a.startswith("-") and not a.startswith(PASSTHROUGH_PREFIXES)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    return extra


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def _value(text: str) -> Any:
    """A command-line value as YAML (so 1e-3, true, [1, 2] and plain words all work), read with the schedule
    loader's rules: an alias bomb or a duplicate key is refused (not expanded into a huge request)."""
    from fts_daemon.schedule import ScheduleError, parse_yaml_text

    try:
        value = parse_yaml_text(text, source="value")
    except ScheduleError as err:
        message = str(err)
        if "alias bomb" in message or "duplicate key" in message or "longer than" in message:
            raise SystemExit(f"fts-daemon: {text[:40]!r}...: {message}") from None
        return text  # not YAML: a plain word
    if isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; on a command line it is meant as a number
        for number in (int, float):
            try:
                return number(value.strip())
            except ValueError:
                pass
    return value


def _share(text: str) -> float:
    """A fraction in [0, 1] for argparse (an error becomes its one-line usage error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction from 0 to 1, got {text!r}")
    return value


def _batch_ms(text: str) -> float:
    """Milliseconds between event batches, 0 to 1000 for argparse (more would starve a display; nan is refused)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1000.0:
        raise argparse.ArgumentTypeError(f"must be milliseconds from 0 to 1000, got {text!r}")
    return value


def _lr_list(text: str, flag: str, field: str) -> list[float]:
    """``1e-4,1e-4,1e-5`` as floats; a value that is not a number is refused, naming it."""
    out = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise SystemExit(f"fts-daemon: {field} ({flag}): {item[:40]!r} is not a number") from None
    return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_finite(value: Any, where: str) -> None:
    """JSON cannot carry NaN or infinity: sent anyway they arrive as null, which *removes* a key. Refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SystemExit(f"fts-daemon: edit refused: {where} = {value}: not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _pairs(items: list[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fts-daemon: {what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(val)
    return out


def _control(record: registry.RunRecord, timeout: float = 5.0) -> Control:
    if record.curve_server_key:
        raise SystemExit(
            f"fts-daemon: run {record.run} uses CURVE; connect with fts_daemon.client.Control(curve=...) and your key"
        )
    return Control(record.ctl, timeout=timeout)


def _find(run: str | None) -> registry.RunRecord:
    if run is not None and not run.strip():  # an empty name would otherwise mean "the newest live run"
        raise SystemExit("fts-daemon: the run name is empty (leave it out for the newest live run)")
    try:
        return registry.find_run(run)
    except registry.RegistryError as err:
        raise SystemExit(f"fts-daemon: {err}") from None


# ------------------------------------------------------------------------------------------------ start


def _start_options(args: argparse.Namespace, passthrough: list[str]) -> Any:
    from fts_daemon.runner import StartOptions

    return StartOptions(
        configs=list(args.config or []),
        run=args.run,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        runs_root=Path(args.runs_root),
        resume=args.resume,
        transport=args.transport,
        pub=args.pub,
        ctl=args.ctl,
        curve_dir=Path(args.curve_dir) if args.curve_dir else None,
        progress=not args.no_progress,
        overrides=passthrough,
        history_points=args.history,
        checkpoint_every=args.checkpoint_every,
        checkpoint_overhead=args.checkpoint_overhead,
        batch_ms=args.batch_ms,
    )


def cmd_start(args: argparse.Namespace, passthrough: list[str]) -> int:
    from fts_daemon.runner import ConfigError, Daemon, launch_rank, resolve_run_location

    options = _start_options(args, passthrough)
    try:
        resolve_run_location(options, launch_rank())  # a DDP rank other than 0 joins rank 0's run
    except (ConfigError, registry.RegistryError) as err:
        print(f"fts-daemon: {err}", file=sys.stderr)
        return 2
    if args.detach:
        return _detach(options, passthrough)
    return Daemon(options).run()


def _settle(record: registry.RunRecord, child: subprocess.Popen, state: str) -> str:
    """Wait (up to DETACH_SETTLE_S) while a listening daemon is still starting; its state then."""
    deadline = time.monotonic() + DETACH_SETTLE_S
    while state == "starting" and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
        try:
            with Control(record.ctl, timeout=1.0) as ctl:
                state = str(ctl.request("hello").get("state"))
        except ControlError:
            pass  # busy, or gone: child.poll() tells
    if state in ("failed", "finished"):  # it exits once its end is published and recorded
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)
    return state


def _detach(options: Any, passthrough: list[str]) -> int:
    """Start the daemon in its own session, wait until it listens, print how to reach it."""
    run_dir: Path = options.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fts_daemon.cli", "start", "--run", options.run, "--run-dir", str(run_dir),
            "--no-progress", "--transport", options.transport, "--history", str(options.history_points),
            "--checkpoint-every", str(options.checkpoint_every), "--checkpoint-overhead", str(options.checkpoint_overhead),
            "--batch-ms", str(options.batch_ms)]
    for cfg in options.configs:
        argv += ["--config", str(Path(cfg).resolve())]
    if options.resume:
        argv.append("--resume")
    if options.pub and options.ctl:
        argv += ["--pub", options.pub, "--ctl", options.ctl]
    if options.curve_dir:
        argv += ["--curve-dir", str(options.curve_dir)]
    argv += passthrough
    log_path = run_dir / "daemon.log"
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print(f"fts-daemon: the daemon exited with code {child.returncode} before listening; "
                  f"last lines of {log_path}:", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)
            return 1
        try:
            record = registry.read_record(options.run)
        except registry.RegistryError:
            record = None
        if record is not None and record.pid == child.pid:
            try:
                with Control(record.ctl, timeout=1.0) as ctl:
                    hello = ctl.request("hello")
            except ControlError:
                hello = None
            if hello is not None:
                state = _settle(record, child, str(hello.get("state")))
                if state == "failed" or child.poll() not in (None, 0):
                    end = final_state(run_dir) or {}
                    reason = end.get("error") or f"the daemon exited with code {child.poll()}"
                    print(f"fts-daemon: run {record.run} failed: {reason}\n  log     : {log_path}", file=sys.stderr)
                    return 1
                if child.poll() == 0:  # done already: e.g. gen_ft_sched_only, or stopped before training
                    end = final_state(run_dir) or {}
                    what = str(end.get("reason") or "finished")
                    where = f" ({end['schedule_file']})" if end.get("schedule_file") else ""
                    print(f"fts-daemon: run {record.run} finished: {what}{where}\n  run dir : {record.run_dir}\n"
                          f"  log     : {log_path}")
                    return 0
                note = " and is still starting" if state == "starting" else ""
                print(f"fts-daemon: run {record.run} started in the background (pid {record.pid}){note}")
                print(f"  run dir : {record.run_dir}\n  log     : {log_path}")
                print(f"  events  : {record.pub}\n  control : {record.ctl}")
                print(f"  attach  : fts-tui attach {record.run}")
                print(f"  status  : fts-daemon status {record.run}    stop: fts-daemon stop {record.run}")
                return 0
        time.sleep(0.2)
    print(f"fts-daemon: the daemon (pid {child.pid}) did not start listening in time; see {log_path}",
          file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------------------------ status & co


def _status(record: registry.RunRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "run": record.run,
        "pid": record.pid,
        "daemon": record.daemon,
        "state": run_state(record),
        "phase": record.phase,
        "step": None,
        "epoch": None,
        "run_dir": record.run_dir,
        "pub": record.pub,
        "ctl": record.ctl,
        "config": record.config,
        "alive": record.alive,
        "reachable": False,
        # how a run that has ended ended (from its recording): None while it runs, or where nothing says
        "reason": None,
        "checkpoint": None,
        "error": None,
        "train_steps": None,
        "train_seconds": None,
    }
    if record.alive and not record.curve_server_key:
        try:
            with Control(record.ctl, timeout=2.0) as ctl:
                hello = ctl.request("hello")
            out.update({k: hello.get(k) for k in ("state", "phase", "step", "epoch", "daemon")}, reachable=True)
        except ControlError:
            pass
    if not out["reachable"] and record.run_dir:
        # a run that has exited (or does not answer): where its recording ends
        with contextlib.suppress(OSError):
            out["step"], out["epoch"] = last_position(record.run_dir)
            end = final_state(record.run_dir) or {}
            out.update({k: end.get(k) for k in ("reason", "checkpoint", "error", "train_steps", "train_seconds")})
    return out


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _end_lines(info: dict[str, Any]) -> list[str]:
    """What a finished or failed run's recording says about its end, for ``status``."""
    lines = []
    if info["error"]:
        lines.append(f"  error   : {info['error']}")
    if info["reason"] == "stopped" and info["checkpoint"]:
        lines.append(f"  stopped : {info['checkpoint']}")
        lines.append(f"  resume  : fts-daemon start --resume --run-dir {info['run_dir']}")
    rate = train_rate(info)
    if rate is not None:
        lines.append(f"  trained : {info['train_steps']} steps in {_duration(info['train_seconds'])} ({rate:.1f} steps/s)"
                     + (f", {info['reason']}" if info["reason"] else ""))
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    info = _status(_find(args.run))
    if args.json:
        _out(info)
        return 0
    def shown(value: Any) -> str:
        return "–" if value is None else str(value)

    print(f"run {info['run']}: {info['state']} (phase {shown(info['phase'])}, epoch {shown(info['epoch'])}, "
          f"step {shown(info['step'])})")
    print(f"  pid {info['pid']}{'' if info['alive'] else ' (not running)'}, daemon {info['daemon']}")
    print(f"  run dir : {info['run_dir']}\n  events  : {info['pub']}\n  control : {info['ctl']}")
    for line in _end_lines(info):
        print(line)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.prune:
        removed = registry.prune()
        print(f"removed {len(removed)} record(s) of runs that are not running" + (": " + ", ".join(removed) if removed
                                                                                  else ""))
    records = list(registry.iter_records())
    rows = [
        {"run": r.run, "state": run_state(r), "phase": r.phase, "pid": r.pid, "config": r.config,
         "run_dir": r.run_dir, "pub": r.pub, "ctl": r.ctl, "started": r.started}
        for r in records
    ]
    if args.json:
        _out(rows)
        return 0
    if not rows:
        print(f"no runs in {registry.runtime_dir()}")
        return 0
    print("\n".join(runs_table(rows)))
    return 0


def runs_table(rows: list[dict[str, Any]]) -> list[str]:
    """``runs``' lines: each column as wide as its longest cell, so long run ids and config lists stay aligned."""
    cells = [["RUN", "STATE", "PHASE", "CONFIG", "ENDPOINTS"]] + [
        [str(r["run"]), str(r["state"]), "–" if r["phase"] is None else str(r["phase"]), ", ".join(Path(c).name for c in r["config"]) or "–",
         f"{r['pub']} {r['ctl']}"]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(4)]
    return [
        f"{run:{widths[0]}}  {state:{widths[1]}}  {phase:>{widths[2]}}  {cfg:{widths[3]}}  {ends}"
        for run, state, phase, cfg, ends in cells
    ]


def cmd_stop(args: argparse.Namespace) -> int:
    record = _find(args.run)
    if not record.alive:
        print(f"run {record.run} is not running (state {record.live_state})")
        return 0
    try:
        with _control(record) as ctl:
            ctl.request("stop", when="epoch" if args.at_epoch_end else "step")
    except ControlError as err:
        print(f"fts-daemon: {err}", file=sys.stderr)
        return 1
    print(f"run {record.run}: stopping after the current {'epoch' if args.at_epoch_end else 'step'} ...")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while registry.pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if registry.pid_alive(record.pid):
        print(f"fts-daemon: pid {record.pid} still running after {args.timeout:g}s", file=sys.stderr)
        return 1
    final = registry.read_record(record.run)
    end = {}
    with contextlib.suppress(OSError):
        end = final_state(final.run_dir) or {}
    if end.get("checkpoint"):
        how = "stopped" if end.get("reason") == "stopped" else final.state
        print(f"run {record.run}: {how}; resume with: fts-daemon start --resume --run-dir {final.run_dir}")
    elif end.get("error"):
        print(f"run {record.run}: {final.state}: {end['error']}")
    else:  # stopped before its first step: there is nothing to resume from
        print(f"run {record.run}: {final.state}; no checkpoint was written (it had not trained yet)")
    return 0


def _init_block(class_path: str | None, pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``{class_path, init_args}`` from the flags that were given (empty when none)."""
    out: dict[str, Any] = {}
    if class_path:
        out["class_path"] = class_path
    if pairs:
        out["init_args"] = _pairs(pairs, flag)
    return out


def _changes_from_args(args: argparse.Namespace, where: str = "changes") -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.changes:
        try:
            loaded = json.loads(args.changes, object_pairs_hook=_unique_keys)
        except ValueError as err:
            raise SystemExit(f"fts-daemon: --changes is not JSON: {err}") from None
        except RecursionError:
            raise SystemExit("fts-daemon: --changes is not JSON: nested too deeply") from None
        if not isinstance(loaded, dict):
            raise SystemExit("fts-daemon: --changes must be a JSON object")
        changes.update(loaded)
    if args.params is not None:
        changes["params"] = args.params
    if args.lr is not None:
        changes["lr"] = args.lr
    if args.max_transition_epoch is not None:
        changes["max_transition_epoch"] = args.max_transition_epoch
    sched: dict[str, Any] = {}
    init = _init_block(args.scheduler, args.scheduler_arg, "--scheduler-arg")
    if init:
        sched["lr_scheduler_init"] = init
    if args.pl_lrs_cfg:
        sched["pl_lrs_cfg"] = _pairs(args.pl_lrs_cfg, "--pl-lrs-cfg")
    if args.init_pg_lrs is not None:
        sched["init_pg_lrs"] = _lr_list(args.init_pg_lrs, "--init-pg-lrs", "new_lr_scheduler.init_pg_lrs")
    if args.use_current_optimizer_pg_lrs:
        sched["use_current_optimizer_pg_lrs"] = True
    if sched:
        changes["new_lr_scheduler"] = sched
    opt = _init_block(args.optimizer, args.optimizer_arg, "--optimizer-arg")
    if opt:
        changes["new_optimizer"] = {"optimizer_init": opt}
    _check_finite(changes, where)
    return changes


def cmd_edit(args: argparse.Namespace) -> int:
    record = _find(args.run)
    if not record.alive:  # nothing would answer: say so now rather than after the request times out
        print(f"fts-daemon: run {record.run} is not running (state {record.live_state}); edits go to a live run",
              file=sys.stderr)
        return 1
    try:
        with _control(record) as ctl:
            if args.list:
                result = ctl.request("list_edits", phase=args.phase)
                if args.json:
                    _out(result)
                else:
                    for e in result["edits"]:
                        print(f"{e['id']:6} phase {e['phase']:<3} {e['status']:10} {json.dumps(e['changes'])}"
                              + (f"  ({e['error']})" if e.get("error") else ""))
                return 0
            if args.cancel:
                result = ctl.request("cancel_edit", edit_id=args.cancel)
                print(f"edit {result['id']} cancelled" if not args.json else json.dumps(result))
                return 0
            if args.phase is None:
                raise SystemExit("fts-daemon: edit needs --phase N (or --list / --cancel ID)")
            where = f"phase {args.phase}: changes"
            changes = _changes_from_args(args, where)
            if not changes:
                raise SystemExit("fts-daemon: nothing to change (give --lr, --scheduler, --changes JSON, ...)")
            result = ctl.request("queue_edit", phase=args.phase, changes=changes)
    except ControlError as err:
        print(f"fts-daemon: edit refused: {err}", file=sys.stderr)
        return 1
    if args.json:
        _out(result)
    else:
        print(f"edit {result['id']} queued for phase {result['phase']}: {json.dumps(result['changes'])}")
        for w in result.get("warnings", []):
            print(f"  warning: {w}")
    return 0


# ------------------------------------------------------------------------------------------------ offline


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cmd_validate(args: argparse.Namespace, passthrough: list[str]) -> int:
    from fts_daemon.offline import check_config

    configs = list(args.configs or []) + list(args.config or [])
    result = check_config(configs, passthrough)
    if args.json:
        _out(result.to_dict())
        return 0 if result.ok else 1
    if not result.ok:
        print(f"{', '.join(configs)}: {len(result.problems)} problem(s):", file=sys.stderr)
        for p in result.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"{', '.join(configs)}: OK ({_count(len(result.phases), 'phase')}, max_depth {result.max_depth})")
    if result.schedule_file:  # a relative ft_schedule is looked up in the working directory first
        print(f"  schedule: {result.schedule_file}")
    for phase in result.phases:
        labels = result.groups[phase["index"]] if phase["index"] < len(result.groups) else []
        sched = (phase.get("new_lr_scheduler") or {}).get("lr_scheduler_init", {}).get("class_path", "")
        print(f"  phase {phase['index']}{' (skipped: beyond max_depth)' if phase['state'] == 'skipped' else ''}: "
              f"{_count(len(phase['params']), 'param')}, {_count(len(labels), 'group')}"
              + (f", new scheduler {sched.rsplit('.', 1)[-1]}" if sched else "")
              + (f", max_transition_epoch {phase['max_transition_epoch']}" if phase["max_transition_epoch"] >= 0
                 else ""))
    for w in result.warnings:
        print(f"  warning: {w}")
    return 0


def _transition_epochs(text: str | None) -> dict[int, int] | None:
    if not text:
        return None
    out = {}
    for item in text.split(","):
        phase, sep, epoch = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[int(phase)] = int(epoch)
        except ValueError:
            raise SystemExit(f"fts-daemon: --transition-epochs expects PHASE=EPOCH[,...] with integers, "
                             f"got {item!r}") from None
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_plan(args: argparse.Namespace, passthrough: list[str]) -> int:
    from fts_daemon.offline import check_config

    configs = list(args.configs or []) + list(args.config or [])
    result = check_config(configs, passthrough, plan=True, transition_epochs=_transition_epochs(args.transition_epochs),
                          steps_per_epoch=args.steps_per_epoch, max_epochs=args.max_epochs)
    if not result.ok:
        print(f"{', '.join(configs)}: {len(result.problems)} problem(s):", file=sys.stderr)
        for p in result.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    assert result.plan is not None
    if args.json:
        _out({"plan": result.plan, "table": result.table})
        return 0
    series, steps, stride = result.plan["series"], result.plan["steps"], result.plan.get("stride", 1)
    if stride > 1:
        print(f"(a run of {result.plan['total_steps']:,} steps: MIN and MAX are read every {stride:,}th step)")
    print(f"{'PHASE':>5} {'EPOCHS':>9} {'STEPS':>11}  {'GROUP':40} {'FIRST LR':>11} {'LAST LR':>11} {'MIN':>11} "
          f"{'MAX':>11}")
    for row in result.table:
        # a long run's plan keeps some of its steps (each phase's first and last among them)
        first_i, last_i = bisect.bisect_left(steps, row["step"]), bisect.bisect_left(steps, row["last_step"])
        last_epoch = result.plan["epochs"][last_i]
        for tag, first in row["first"].items():
            window = [v for v in series[tag][first_i : last_i + 1] if v is not None]
            last = row["last"].get(tag)
            print(f"{row['phase']:>5} {str(row['epoch']) + '-' + str(last_epoch):>9} "
                  f"{str(row['step']) + '-' + str(row['last_step']):>11}  {tag:40} {first:>11.4e} "
                  f"{(last if last is not None else float('nan')):>11.4e} {min(window):>11.4e} {max(window):>11.4e}")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fts-daemon", description="Start, inspect, edit and stop phased fine-tuning runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("start", help="run phased fine-tuning from a LightningCLI config",
                       description="Extra --trainer.*/--model.*/--data.* arguments override the config.")
    p.add_argument("--config", action="append", help="LightningCLI config (repeat to compose; later wins)")
    p.add_argument("--run", help="run id (default: config name + time, or the run dir's name)")
    p.add_argument("--run-dir", help="where events, edits, checkpoints and logs go (default: runs/<run>)")
    p.add_argument("--runs-root", default="runs", help=argparse.SUPPRESS)
    p.add_argument("--detach", action="store_true", help="run in the background; return once it listens")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (same run id, queued edits): from the checkpoint "
                   "its last stop wrote, else the newest *.ckpt there")
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc",
                   help="ipc (private runtime dir, default) or tcp on 127.0.0.1")
    p.add_argument("--pub", help="explicit PUB endpoint (non-loopback needs --curve-dir)")
    p.add_argument("--ctl", help="explicit ROUTER endpoint (non-loopback needs --curve-dir)")
    p.add_argument("--curve-dir", help="CURVE keys: server.key_secret and authorized_clients/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--history", type=int, default=1000, help="points per series kept for snapshots")
    p.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                   help="crash safety: replace checkpoints/last.ckpt every N epochs (default 1; 0: never)")
    p.add_argument("--checkpoint-overhead", type=_share, default=0.01, metavar="F",
                   help="crash safety: skip an epoch's save while the last one took more than F of the time since "
                        "(default 0.01: at most ~1%% of the run; 0: save every N epochs regardless)")
    p.add_argument("--batch-ms", type=_batch_ms, default=100.0, metavar="MS",
                   help="events coming faster than one per MS go out in batches MS apart (default 100: fewer "
                        "wake-ups for the training thread to share its cores with; lower it for less display lag)")

    p = sub.add_parser("status", help="state of a run (default: the live one)")
    p.add_argument("run", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stop", help="finish the current step, checkpoint, exit")
    p.add_argument("run", nargs="?")
    p.add_argument("--at-epoch-end", action="store_true",
                   help="finish the epoch and its validation first (the checkpoint then resumes exactly)")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0)

    p = sub.add_parser("runs", help="known runs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prune", action="store_true", help="forget runs whose process is gone")

    for name, helptext in (("validate", "check a config without training"),
                           ("plan", "simulated per-phase, per-group LR table")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("configs", nargs="*", help="config file(s), composed in order")
        p.add_argument("--config", action="append", help="more config files")
        p.add_argument("--json", action="store_true")
        if name == "plan":
            p.add_argument("--transition-epochs", help="PHASE=EPOCH,... for phases ended by early stopping")
            p.add_argument("--steps-per-epoch", type=_positive_int)
            p.add_argument("--max-epochs", type=_positive_int)

    p = sub.add_parser("edit", help="queue, cancel or list schedule edits of a running run")
    p.add_argument("run", nargs="?")
    p.add_argument("--phase", type=int, help="the upcoming phase to change")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-transition-epoch", type=int)
    p.add_argument("--params", nargs="+", help="replace the phase's params (names or regexes)")
    p.add_argument("--scheduler", help="new_lr_scheduler class_path (e.g. torch.optim.lr_scheduler.StepLR)")
    p.add_argument("--scheduler-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--pl-lrs-cfg", action="append", metavar="KEY=VALUE")
    p.add_argument("--init-pg-lrs", metavar="LR,LR,...")
    p.add_argument("--use-current-optimizer-pg-lrs", action="store_true")
    p.add_argument("--optimizer", help="new_optimizer class_path")
    p.add_argument("--optimizer-arg", action="append", metavar="KEY=VALUE")
    p.add_argument("--changes", help="the changes as a JSON object (merged before the flags above)")
    p.add_argument("--cancel", metavar="EDIT_ID")
    p.add_argument("--list", action="store_true")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("start", "validate", "plan"):
        passthrough = _split_passthrough(parser, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "start":
            return cmd_start(args, passthrough)
        if args.command == "validate":
            return cmd_validate(args, passthrough)
        if args.command == "plan":
            return cmd_plan(args, passthrough)
        return {"status": cmd_status, "stop": cmd_stop, "runs": cmd_runs, "edit": cmd_edit}[args.command](args)
    except registry.RegistryError as err:
        print(f"fts-daemon: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fts-daemon runs | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
