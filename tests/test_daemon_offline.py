"""``validate`` and ``plan`` (in-process): the shipped configs pass, broken ones fail with one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fts_daemon.offline import check_config

from .daemon_support import REPO, SCHEDULE, write_config

CONFIGS = REPO / "configs"


@pytest.mark.parametrize(
    "configs",
    [
        ["demo_explicit_reinit_lr.yaml"],
        ["demo_implicit_reinit_lr.yaml"],
        ["seed/fts_defaults.yaml", "seed/fts_explicit_reinit_lr.yaml"],
        ["seed/fts_defaults.yaml", "seed/fts_implicit_reinit_lr.yaml"],
    ],
)
def test_shipped_configs_validate(configs: list[str]) -> None:
    result = check_config([CONFIGS / c for c in configs])
    assert result.ok, result.problems
    assert len(result.phases) >= 3


def test_seed_composition_applies_the_later_file() -> None:
    result = check_config([CONFIGS / "seed/fts_defaults.yaml", CONFIGS / "seed/fts_explicit_reinit_lr.yaml"])
    assert result.max_depth == 2
    # the seed's init_pg_lrs lengths cover only the groups that existed before each transition: a warning, as in FTS
    assert any("init_pg_lrs" in w for w in result.warnings)


def test_plan_of_the_explicit_demo() -> None:
    result = check_config([CONFIGS / "demo_explicit_reinit_lr.yaml"], plan=True)
    assert result.ok and result.plan is not None
    starts = result.plan["phase_starts"]
    assert [(s["phase"], s["epoch"]) for s in starts] == [(0, 0), (1, 4), (2, 8)]
    first = {row["phase"]: row["first"] for row in result.table}
    assert first[1]["Explicit_Reinit_LR_Scheduler/pg3"] == pytest.approx(3.0e-3)  # init_pg_lrs
    assert len(first[2]) == 6


def test_broken_configs_report_every_problem(tmp_path: Path) -> None:
    bad = {k: dict(v) for k, v in SCHEDULE.items()}
    bad[1] = {**bad[1], "lr": "x"}
    bad[2] = {**bad[2], "new_lr_scheduler": {"pl_lrs_cfg": {"interval": "hourly"}}}
    result = check_config([write_config(tmp_path, bad, name="parse")])
    assert not result.ok
    text = "\n".join(result.problems)
    assert "phase 1: lr" in text and "phase 2: new_lr_scheduler" in text and "lr_scheduler_init" in text
    assert all("\n" not in p for p in result.problems)
    bad = {k: dict(v) for k, v in SCHEDULE.items()}
    bad[2] = {**bad[2], "new_lr_scheduler": {"lr_scheduler_init": {"class_path": "os.system"}}}
    result = check_config([write_config(tmp_path, bad, name="import")])
    assert not result.ok and "outside the allowed prefixes" in result.problems[0]


def test_upstream_class_paths_get_a_hint(tmp_path: Path) -> None:
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["trainer"]["callbacks"][0]["class_path"] = "finetuning_scheduler.FinetuningScheduler"
    path = tmp_path / "upstream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = check_config([path])
    assert not result.ok and any("fts_daemon.FinetuningScheduler" in p for p in result.problems)


def test_missing_config_and_missing_callback(tmp_path: Path) -> None:
    assert "not found" in check_config([tmp_path / "nope.yaml"]).problems[0]
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    cfg["trainer"]["callbacks"] = []
    path = tmp_path / "nofts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert "no fts_daemon.FinetuningScheduler" in check_config([path]).problems[0]


def test_the_modules_own_scheduler_is_stepped_too(tmp_path: Path) -> None:
    """Its arguments are not in the schedule; a wrong one builds and fails at the first step of the run."""
    cfg = yaml.safe_load(write_config(tmp_path).read_text())
    init = cfg["model"]["init_args"]["lr_scheduler_init"]
    assert init["class_path"] == "torch.optim.lr_scheduler.LinearLR"
    init["init_args"]["total_iters"] = "abc"
    path = tmp_path / "bad_module_scheduler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = check_config([path])
    assert result.problems == ["the module's scheduler LinearLR fails at step 1: '>' not supported between instances "
                               "of 'int' and 'str'"]
    cfg["model"]["init_args"]["lr_scheduler_init"] = {"class_path": "torch.optim.lr_scheduler.ExponentialLR",
                                                      "init_args": {"gamma": -0.5}}
    path.write_text(yaml.safe_dump(cfg))
    (problem,) = check_config([path]).problems
    assert problem.startswith("the module's scheduler ExponentialLR sets group 0's lr to -") and "at step 1" in problem
    # and the shipped one passes, plan included (the dry run comes after the plan, which it would move)
    ok = check_config([write_config(tmp_path, name="fine")], plan=True)
    assert ok.ok and ok.plan is not None and ok.schedule_file is not None


def test_parser_errors_are_one_line_each(tmp_path: Path) -> None:
    """jsonargparse reports one bad key in a dozen lines (each Union branch, the whole given value): one line here."""
    base = yaml.safe_load(write_config(tmp_path).read_text())
    cases = [
        (("trainer", "max_epochs"), "abc", "trainer.max_epochs = abc: expected int (or null)"),
        (("model", "init_args", "bogus_arg"), 1,
         "model: Problem with given class_path 'fts_daemon.examples.tiny.TinyClassifier': Option 'bogus_arg' is not "
         "accepted"),
    ]
    for (i, (keys, value, expected)) in enumerate(cases):
        cfg = yaml.safe_load(yaml.safe_dump(base))
        node = cfg
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
        path = tmp_path / f"parser{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert check_config([path]).problems == [expected]
    cfg = yaml.safe_load(yaml.safe_dump(base))
    cfg["trainer"]["callbacks"][0]["init_args"]["max_depth"] = "x"
    path = tmp_path / "parser-callback.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (problem,) = check_config([path]).problems
    assert problem.startswith("trainer.callbacks: Problem with given class_path 'fts_daemon.FinetuningScheduler': ")
    assert "max_depth" in problem and "Not a valid subclass" not in problem


def test_a_limit_behind_an_earlier_one_is_warned_about(tmp_path: Path) -> None:
    sched = {k: dict(v) for k, v in SCHEDULE.items()}
    sched[1]["max_transition_epoch"] = 1  # phase 0 runs to epoch 2
    result = check_config([write_config(tmp_path, sched, name="behind")])
    assert result.ok
    assert ("phase 1: max_transition_epoch 1 is not after an earlier phase's (2): the phase ends after its first "
            "epoch") in result.warnings
    assert not any("max_transition_epoch" in w for w in check_config([write_config(tmp_path)]).warnings)


def implicit_with(tmp_path: Path, name: str, **fts_args: object) -> Path:
    cfg = yaml.safe_load((CONFIGS / "demo_implicit_reinit_lr.yaml").read_text())
    fts = next(cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"] == "fts_daemon.FinetuningScheduler")
    fts["init_args"].update(fts_args)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_generate_only_config_says_so_and_a_negative_max_depth_is_refused(tmp_path: Path) -> None:
    """``validate``/``plan`` of a gen_ft_sched_only config printed nothing and exited 0 (the callback's SystemExit
    went past them); max_depth -5 ran every phase (only -1 means that)."""
    for plan in (False, True):
        gen = check_config([implicit_with(tmp_path, "gen", gen_ft_sched_only=True)], plan=plan)
        assert not gen.ok and gen.problems == [
            "gen_ft_sched_only = true: this config writes the generated schedule and exits without training; set it "
            "to false to check or plan the run"]
    assert check_config([implicit_with(tmp_path, "neg", max_depth=-5)]).problems == [
        "max_depth = -5: -1 (run every phase) or the index of the last phase to run"]
    assert check_config([implicit_with(tmp_path, "all", max_depth=-1)]).ok
