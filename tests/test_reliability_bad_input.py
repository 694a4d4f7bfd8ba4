"""Bad input through the command line: every bad config, schedule and edit gets a one-line error naming what is
wrong, before any training step, and never a traceback.

* Schedules: the 52 cases of ``test_validation_corpus.py`` (written there against the callback), each turned into a
  LightningCLI config (``tests.engine_models.TinyNet``) with its schedule in a YAML file, through
  ``fts-daemon validate``; a sample of them through ``fts-daemon start`` too, which must fail before its first step.
* Configs: the daemon's own config file (duplicate keys, non-UTF-8, alias bombs, bad YAML, wrong types, unknown keys,
  missing pieces, hostile class paths, NaN/negative LRs), through ``validate`` and ``start``.
* Edits: through ``fts-daemon edit`` against a training daemon (NaN/negative/infinite LRs, regexes matching nothing
  or everything, hostile class paths, unknown keys, duplicate keys, YAML bombs, frames too big for the protocol,
  ...), after which the run still has no edit and still trains.

The commands run in this process (``fts_daemon.cli.main``) so the corpus stays fast; a few run as real processes to
show that the process-level output has no traceback either.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fts_daemon import cli
from fts_daemon.client import Control

from . import test_validation_corpus as corpus
from .daemon_support import SCHEDULE, private_runtime_dir, read_events, start_daemon, wait_for, write_config
from .reliability_support import cli as cli_process
from .reliability_support import env_for, figure

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RESULTS: dict[str, list[tuple[str, bool]]] = {"schedule": [], "config": [], "edit": [], "start": []}


def run_cli(*args: str) -> tuple[int, str]:
    """``fts-daemon ARGS`` in this process: (exit code, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(args))
        except SystemExit as exc:  # argparse errors and the commands' own refusals
            rc = exc.code if isinstance(exc.code, int) else 1
            if isinstance(exc.code, str):
                print(exc.code, file=err)
    return int(rc or 0), out.getvalue() + err.getvalue()


def check_failure(kind: str, name: str, rc: int, output: str, expected: str) -> None:
    ok = rc != 0 and expected in output and "Traceback" not in output
    RESULTS[kind].append((name, ok))
    assert rc != 0, f"{name}: accepted\n{output}"
    assert "Traceback" not in output, f"{name}: traceback\n{output}"
    assert expected in output, f"{name}: expected {expected!r} in\n{output}"
    line = next(line for line in output.splitlines() if expected in line)
    assert len(line) < 2100, line  # one line, bounded


# ------------------------------------------------------------------------------------------------ schedules


def corpus_config(tmp_path: Path, case_id: str, kwargs: Any) -> Path:
    """One case of the callback-level corpus as a daemon config with its schedule in a YAML file."""
    if callable(kwargs):
        kwargs = kwargs(tmp_path)
    kwargs = copy.deepcopy(kwargs)
    init_args: dict[str, Any] = {"restore_best": False}
    schedule = kwargs.pop("ft_schedule", None)
    if isinstance(schedule, dict):
        path = tmp_path / f"{case_id}_schedule.yaml"
        path.write_text(yaml.safe_dump(schedule, sort_keys=False))
        init_args["ft_schedule"] = str(path)
    elif schedule is not None:
        init_args["ft_schedule"] = schedule
    init_args.update(kwargs)
    callbacks: list[dict[str, Any]] = [{"class_path": "fts_daemon.FinetuningScheduler", "init_args": init_args}]
    if not kwargs.get("epoch_transitions_only"):
        callbacks.append({"class_path": "fts_daemon.FTSEarlyStopping",
                          "init_args": {"monitor": "val_loss", "patience": 1}})
    config = {
        "seed_everything": 0,
        "model": {"class_path": "tests.engine_models.TinyNet"},
        "data": {"class_path": "tests.reliability_probe.TinyNetData"},
        "trainer": {"max_epochs": 2, "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0, "callbacks": callbacks},
    }
    path = tmp_path / f"{case_id}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("case_id,kwargs,expected", corpus.CASES, ids=[c[0] for c in corpus.CASES])
def test_schedule_corpus_through_validate(tmp_path: Path, case_id: str, kwargs: Any, expected: str) -> None:
    rc, output = run_cli("validate", str(corpus_config(tmp_path, case_id, kwargs)))
    check_failure("schedule", case_id, rc, output, expected)


# ------------------------------------------------------------------------------------------------ configs


def base_config(directory: Path) -> Path:
    return write_config(directory, SCHEDULE, max_epochs=2, name="base")


def edit_yaml(mutate: Callable[[dict[str, Any]], Any]) -> Callable[[Path], bytes]:
    def make(directory: Path) -> bytes:
        data = yaml.safe_load(base_config(directory).read_text())
        mutate(data)
        return yaml.safe_dump(data, sort_keys=False).encode()

    return make


def edit_text(old: str, new: str) -> Callable[[Path], bytes]:
    def make(directory: Path) -> bytes:
        text = base_config(directory).read_text()
        assert old in text
        return text.replace(old, new, 1).encode()

    return make


def set_path(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return mutate


def bad_schedule(index: int, **changes: Any) -> Callable[[Path], bytes]:
    """The base config whose schedule file has phase ``index`` changed."""
    def make(directory: Path) -> bytes:
        sched = copy.deepcopy(SCHEDULE)
        sched[index].update(changes)
        cfg = write_config(directory, sched, max_epochs=2, name="base")
        return cfg.read_bytes()

    return make


def huge_init_pg_lrs(directory: Path) -> bytes:
    """100,000 ``init_pg_lrs`` for phase 2's 6 groups, with ``strict_validation`` (without it: a warning, as FTS)."""
    sched = copy.deepcopy(SCHEDULE)
    sched[2]["new_lr_scheduler"]["init_pg_lrs"] = [1.0e-3] * 100_000
    data = yaml.safe_load(write_config(directory, sched, max_epochs=2, name="base").read_text())
    data["trainer"]["callbacks"][0]["init_args"]["strict_validation"] = True
    return yaml.safe_dump(data, sort_keys=False).encode()


BOMB = "".join(f"x{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9) if i else 'x, x, x, x, x, x, x, x, x'}]\n"
               for i in range(9))
BOMB_7 = "".join(line + "\n" for line in BOMB.splitlines()[:7])  # 9**7 nodes once expanded
ACTIVE_OPT = "model.init_args.optimizer_init.init_args"

# (id, config bytes from a directory, expected fragment); the fragment names what is wrong
CONFIG_CASES: list[tuple[str, Callable[[Path], bytes], str]] = [
    ("duplicate-key", edit_text("trainer:\n", "trainer:\n  max_epochs: 3\n"), "duplicate key 'max_epochs'"),
    ("duplicate-top-level-key", lambda d: base_config(d).read_bytes() + b"seed_everything: 1\n",
     "duplicate key 'seed_everything'"),
    ("not-utf8", lambda d: base_config(d).read_bytes().replace(b"seed_everything: 42", b"seed_everything: 42 # \xff"),
     "not UTF-8 text"),
    ("yaml-bomb", lambda d: (BOMB + edit_yaml(set_path("model.init_args.no_decay", "BOMB"))(d).decode()
                             .replace("no_decay: BOMB", "no_decay: *a8")).encode(), "alias bomb"),
    ("bad-yaml", lambda d: base_config(d).read_bytes() + b"trainer: [unclosed\n", "invalid YAML at line"),
    ("tab-indent", lambda d: b"model:\n\tclass_path: x\n", "invalid YAML"),
    ("not-a-mapping", lambda d: b"- just\n- a list\n", "a config must be a YAML mapping"),
    ("empty", lambda d: b"", "this one is empty"),
    ("unknown-top-level-key", lambda d: base_config(d).read_bytes() + b"trainr: {max_epochs: 2}\n", "trainr"),
    ("unknown-trainer-key", edit_yaml(set_path("trainer.max_epoch", 3)), "max_epoch"),
    ("wrong-type-max-epochs", edit_yaml(set_path("trainer.max_epochs", "ten")), "max_epochs"),
    ("wrong-type-seed", edit_yaml(set_path("seed_everything", "x")), "seed_everything"),
    ("callbacks-not-a-list", edit_yaml(set_path("trainer.callbacks", "fts")), "callbacks"),
    ("no-fts-callback", edit_yaml(set_path("trainer.callbacks", [])), "no fts_daemon.FinetuningScheduler"),
    ("upstream-class", edit_text("fts_daemon.FinetuningScheduler", "finetuning_scheduler.FinetuningScheduler"),
     "replace them with fts_daemon"),
    ("model-class-unknown", edit_text("fts_daemon.examples.tiny.TinyClassifier", "fts_daemon.examples.tiny.Nope"),
     "Nope"),
    ("callback-os-system", edit_text("fts_daemon.FTSCheckpoint", "os.system"), "os.system"),
    ("callback-builtins-eval", edit_text("fts_daemon.FTSCheckpoint", "builtins.eval"), "builtins.eval"),
    ("unknown-callback-arg", edit_yaml(set_path("trainer.callbacks.0.init_args.restore_bst", True)), "restore_bst"),
    ("max-depth-wrong-type", edit_yaml(set_path("trainer.callbacks.0.init_args.max_depth", "deep")), "max_depth"),
    ("schedule-file-missing", edit_yaml(set_path("trainer.callbacks.0.init_args.ft_schedule", "/nonexistent.yaml")),
     "schedule file not found"),
    ("optimizer-outside-prefixes", edit_yaml(set_path("model.init_args.optimizer_init.class_path", "builtins.eval")),
     "outside the allowed prefixes"),
    ("optimizer-lr-negative", edit_yaml(set_path(f"{ACTIVE_OPT}.lr", -1.0)), "Invalid learning rate"),
    ("optimizer-lr-nan", edit_yaml(set_path(f"{ACTIVE_OPT}.lr", float("nan"))), "Invalid learning rate"),
    ("data-wrong-type", edit_yaml(set_path("data.init_args.num_train", "many")), "num_train"),
    ("schedule-regex-matches-everything", bad_schedule(1, params=[".*"]), "more than one phase"),
    ("schedule-regex-matches-nothing", bad_schedule(2, params=["model\\.nothing.*"]), "matches no parameter"),
    ("schedule-lr-nan", bad_schedule(2, lr=float("nan")), "phase 2: lr = nan"),
    ("schedule-huge-init-pg-lrs", huge_init_pg_lrs, "has 100000 values for 6 groups"),
]


def write_case(tmp_path: Path, make: Callable[[Path], bytes], name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    data = make(directory)
    path = directory / "case.yaml"
    path.write_bytes(data)  # next to base_schedule.yaml, which the config names
    return path


@pytest.mark.parametrize("case_id,make,expected", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_corpus_through_validate(tmp_path: Path, case_id: str, make: Callable[[Path], bytes],
                                        expected: str) -> None:
    path = write_case(tmp_path, make, case_id)
    rc, output = run_cli("validate", str(path))
    check_failure("config", case_id, rc, output, expected)


START_SAMPLE = ["duplicate-key", "not-utf8", "yaml-bomb", "wrong-type-max-epochs", "no-fts-callback",
                "optimizer-outside-prefixes", "optimizer-lr-nan", "schedule-regex-matches-everything",
                "schedule-lr-nan", "schedule-huge-init-pg-lrs"]


@pytest.mark.parametrize("case_id", START_SAMPLE)
def test_bad_configs_through_start_fail_before_any_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        case_id: str) -> None:
    make, expected = next((m, e) for c, m, e in CONFIG_CASES if c == case_id)
    path = write_case(tmp_path, make, case_id)
    with private_runtime_dir(monkeypatch):
        rc, output = run_cli("start", "--config", str(path), "--run", "bad", "--run-dir", str(tmp_path / "run"),
                             "--no-progress")
    check_failure("start", case_id, rc, output, expected)
    events_file = tmp_path / "run" / "events.jsonl"
    events = read_events(events_file) if events_file.exists() else []
    assert not [e for e in events if e.kind == "lr"], "a training step ran"
    if events:
        assert events[-1].data["state"] == "failed" and "\n" not in events[-1].data["error"]


def test_bad_config_as_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = env_for(runtime)
    for case_id in ("yaml-bomb", "schedule-lr-nan", "optimizer-lr-nan"):
        make, expected = next((m, e) for c, m, e in CONFIG_CASES if c == case_id)
        path = write_case(tmp_path, make, case_id)
        validated = cli_process("validate", str(path), env=env)
        started = cli_process("start", "--config", str(path), "--run", case_id, "--run-dir",
                              str(tmp_path / f"run-{case_id}"), "--no-progress", env=env)
        for proc in (validated, started):
            out = proc.stdout + proc.stderr
            assert proc.returncode != 0 and expected in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------------------------ edits

EDIT_CASES: list[tuple[str, list[str], str]] = [
    ("current-phase", ["--phase", "0", "--lr", "1e-3"], "current phase"),
    ("no-such-phase", ["--phase", "9", "--lr", "1e-3"], "does not exist"),
    ("negative-phase", ["--phase", "-1", "--lr", "1e-3"], "phase -1 does not exist"),
    ("lr-nan", ["--phase", "2", "--lr", "nan"], "nan"),
    ("lr-inf", ["--phase", "2", "--lr", "inf"], "inf"),
    ("lr-negative", ["--phase", "2", "--lr=-1e-3"], "finite, non-negative float"),
    ("regex-matches-everything", ["--phase", "2", "--params", ".*"], "more than one phase"),
    ("regex-matches-nothing", ["--phase", "2", "--params", "model\\.nothing.*"], "matches no parameter"),
    ("regex-invalid", ["--phase", "2", "--params", "model.(unclosed"], "invalid regex"),
    ("scheduler-os-system", ["--phase", "2", "--scheduler", "os.system"], "outside the allowed prefixes"),
    ("scheduler-builtins-eval", ["--phase", "2", "--scheduler", "builtins.eval"], "outside the allowed prefixes"),
    ("optimizer-subprocess", ["--phase", "2", "--optimizer", "subprocess.Popen"], "outside the allowed prefixes"),
    ("scheduler-not-a-scheduler", ["--phase", "2", "--scheduler", "torch.optim.SGD"], "not a torch LR scheduler"),
    ("scheduler-unknown-class", ["--phase", "2", "--scheduler", "torch.optim.lr_scheduler.NoSuchLR"], "NoSuchLR"),
    ("scheduler-arg-nan", ["--phase", "2", "--scheduler-arg", "eta_min=.nan"], "nan"),
    ("scheduler-arg-typo", ["--phase", "2", "--scheduler-arg", "T_mul=2"], "unexpected keyword argument 'T_mul'"),
    ("scheduler-arg-negative", ["--phase", "2", "--scheduler-arg", "T_0=-3"], "T_0"),
    ("scheduler-arg-wrong-type", ["--phase", "2", "--scheduler-arg", "T_0=[1, 2]"], "T_0"),
    ("scheduler-arg-yaml-bomb", ["--phase", "2", "--scheduler-arg", "eta_min=" + BOMB_7], "alias bomb"),
    ("init-pg-lrs-not-numbers", ["--phase", "2", "--init-pg-lrs", "a,b"], "init_pg_lrs"),
    ("init-pg-lrs-negative", ["--phase", "2", "--init-pg-lrs=-1e-3,1e-3"], "not a finite, non-negative float"),
    ("init-pg-lrs-huge", ["--phase", "2", "--init-pg-lrs", ",".join(["1e-3"] * 60_000)], "limit"),
    ("pl-lrs-cfg-interval", ["--phase", "2", "--pl-lrs-cfg", "interval=batch"], "interval"),
    ("pl-lrs-cfg-unknown", ["--phase", "2", "--pl-lrs-cfg", "intervall=epoch"], "intervall"),
    ("mte-below-minus-one", ["--phase", "2", "--max-transition-epoch", "-5"], "max_transition_epoch"),
    ("rlrop-without-monitor", ["--phase", "2", "--scheduler", "torch.optim.lr_scheduler.ReduceLROnPlateau"],
     "monitor"),
    ("optimizer-lr-negative", ["--phase", "2", "--optimizer", "torch.optim.Adam", "--optimizer-arg", "lr=-1"],
     "Invalid learning rate"),
    ("changes-unknown-key", ["--phase", "2", "--changes", '{"bogus": 1}'], "unknown phase key 'bogus'"),
    ("changes-not-object", ["--phase", "2", "--changes", "[1, 2]"], "JSON object"),
    ("changes-not-json", ["--phase", "2", "--changes", "{lr: 1"], "not JSON"),
    ("changes-duplicate-key", ["--phase", "2", "--changes", '{"lr": 0.001, "lr": 0.002}'], "duplicate key 'lr'"),
    ("changes-nan", ["--phase", "2", "--changes", '{"lr": NaN}'], "not a finite number"),
    ("changes-empty", ["--phase", "2", "--changes", "{}"], "nothing to change"),
    ("changes-params-not-list", ["--phase", "2", "--changes", '{"params": 5}'], "must be a list"),
    ("non-utf8-param", ["--phase", "2", "--params", "model.\udcff"], "matches no parameter"),
    ("cancel-unknown", ["--cancel", "e99"], "no edit 'e99'"),
    ("no-phase", ["--lr", "1e-3"], "needs --phase"),
]


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("edits")
    sched = copy.deepcopy(SCHEDULE)
    sched[0]["max_transition_epoch"] = 60  # phase 0 for the whole corpus: phases 1 and 2 stay editable
    with pytest.MonkeyPatch.context() as mp, private_runtime_dir(mp):
        daemon = start_daemon(configs=[str(write_config(base, sched, step_delay=0.1, max_epochs=60, name="e"))],
                              run="edits", run_dir=base / "run")
        with Control(daemon.ctl) as ctl:
            wait_for(lambda: ctl.request("hello")["state"] == "training", timeout=60)
            wait_for(lambda: (ctl.request("hello")["step"] or 0) >= 1, timeout=60)
        yield daemon
        with Control(daemon.ctl) as ctl:
            ctl.request("stop")
        daemon.join()


@pytest.mark.parametrize("case_id,args,expected", EDIT_CASES, ids=[c[0] for c in EDIT_CASES])
def test_edit_corpus_through_the_cli(training: Any, case_id: str, args: list[str], expected: str) -> None:
    rc, output = run_cli("edit", "edits", *args)
    check_failure("edit", case_id, rc, output, expected)
    with Control(training.ctl) as ctl:
        assert ctl.request("list_edits")["edits"] == []  # nothing was queued
        assert ctl.request("hello")["phase"] == 0


def test_corpus_summary() -> None:
    if not any(RESULTS.values()):
        pytest.skip("run with the corpus tests")
    counts = {kind: (sum(ok for _, ok in cases), len(cases)) for kind, cases in RESULTS.items()}
    total_ok = sum(ok for ok, _ in counts.values())
    total = sum(n for _, n in counts.values())
    figure("bad-input",
           f"{total_ok}/{total} bad inputs got a one-line error naming the problem, no traceback, no training step: "
           + ", ".join(f"{kind}s {ok}/{n}" for kind, (ok, n) in counts.items())
           + " (schedules: test_validation_corpus.py's cases via `fts-daemon validate`; configs via validate, a "
             "sample via `fts-daemon start`; edits via `fts-daemon edit` against a training daemon)",
           passed=total_ok, total=total)
    assert total >= 40 and total_ok == total

