"""Bad schedules and configs: each gets a one-line error naming what is wrong, before any training step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from fts_daemon import FinetuningScheduler, FTSEarlyStopping
from tests.engine_models import STEP_LR, TinyNet, explicit_schedule, loaders, trainer

RLROP = {
    "lr_scheduler_init": {
        "class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau",
        "init_args": {"patience": 1, "min_lr": [1e-7, 1e-7]},
    },
    "pl_lrs_cfg": {"monitor": "val_loss"},
}


def with_phase(index: int, **changes: Any) -> dict:
    sched = explicit_schedule()
    phase = copy.deepcopy(sched[index])
    for k, v in changes.items():
        if v is None:
            phase.pop(k, None)
        else:
            phase[k] = v
    sched[index] = phase
    return sched


def sched_lr(index: int, **lrs_changes: Any) -> dict:
    spec = copy.deepcopy(STEP_LR)
    for k, v in lrs_changes.items():
        spec[k] = v
    return with_phase(index, new_lr_scheduler=spec)


def sched_init(index: int, class_path: str, init_args: Any) -> dict:
    return with_phase(index, new_lr_scheduler={"lr_scheduler_init": {"class_path": class_path, "init_args": init_args}})


def write(tmp_path: Any, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# (id, callback kwargs (a callable of tmp_path gives file-based cases), expected fragment in the error)
CASES: list[tuple[str, Any, str]] = [
    ("unmatched-param", {"ft_schedule": with_phase(1, params=["nope.*"])}, "phase 1: params = 'nope.*': matches no parameter"),
    ("overlap", {"ft_schedule": with_phase(2, params=["layer.4.*"])}, "more than one phase (1, 2)"),
    # the entries that clash, not only the parameters; one line for all that one regex takes from another phase
    ("overlap-names-entries", {"ft_schedule": with_phase(2, params=["layer.[46].*"])}, "2 parameters are scheduled in more than one phase (1, 2), by 'layer.4.*' in phase 1 and 'layer.[46].*' in phase 2"),
    ("bad-regex", {"ft_schedule": with_phase(1, params=["layer.["])}, "phase 1: params = 'layer.[': invalid regex"),
    ("unknown-phase-key", {"ft_schedule": with_phase(1, lrr=1e-4)}, "phase 1: lrr: unknown key"),
    ("non-int-phase-key", {"ft_schedule": {"zero": {"params": ["layer.6.*"]}}}, "phase key 'zero': phase keys must be integers"),
    ("gap-in-phases", {"ft_schedule": {0: {"params": ["layer.6.*"]}, 2: {"params": ["layer.4.*"]}}}, "without gaps"),
    ("empty-schedule", {"ft_schedule": {}}, "non-empty mapping"),
    ("phase-not-mapping", {"ft_schedule": with_phase(3, params=None) | {3: [1, 2]}}, "phase 3: a phase must be a mapping"),
    ("params-not-list", {"ft_schedule": with_phase(1, params=5)}, "phase 1: params = 5: must be a list"),
    ("lr-not-float", {"ft_schedule": with_phase(1, lr="fast")}, "phase 1: lr = 'fast': must be a finite, non-negative float"),
    ("lr-nan", {"ft_schedule": with_phase(1, lr=float("nan"))}, "phase 1: lr = nan"),
    ("lr-negative", {"ft_schedule": with_phase(2, lr=-1e-4)}, "phase 2: lr = -0.0001"),
    ("lr-bool", {"ft_schedule": with_phase(2, lr=True)}, "phase 2: lr = True"),
    ("mte-not-int", {"ft_schedule": with_phase(1, max_transition_epoch="soon")}, "phase 1: max_transition_epoch = 'soon'"),
    ("mte-below-minus-one", {"ft_schedule": with_phase(1, max_transition_epoch=-5)}, "integer >= -1"),
    ("lrs-missing-init", {"ft_schedule": with_phase(1, new_lr_scheduler={"pl_lrs_cfg": {}})}, "phase 1: new_lr_scheduler: an `lr_scheduler_init` block"),
    ("lrs-unknown-key", {"ft_schedule": sched_lr(1, lr_schedulr_init={})}, "phase 1: new_lr_scheduler.lr_schedulr_init: unknown key"),
    ("lrs-missing-class-path", {"ft_schedule": with_phase(1, new_lr_scheduler={"lr_scheduler_init": {"init_args": {}}})}, "class_path = None: a `class_path` string is required"),
    ("lrs-unknown-class", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.NoSuchLR", {})}, "has no attribute 'NoSuchLR'"),
    ("lrs-outside-prefix", {"ft_schedule": sched_init(1, "os.system", {})}, "outside the allowed prefixes"),
    ("lrs-builtins-eval", {"ft_schedule": sched_init(1, "builtins.eval", {})}, "outside the allowed prefixes"),
    ("lrs-unsupported", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.OneCycleLR", {"max_lr": 0.1, "total_steps": 10})}, "not a supported scheduler"),
    ("lrs-not-a-scheduler", {"ft_schedule": sched_init(1, "torch.optim.SGD", {})}, "is not a torch LR scheduler"),
    ("lrs-bad-init-args", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.StepLR", {"gamma": 0.7})}, "StepLR(gamma=0.7) failed"),
    ("lrs-unknown-init-arg", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.StepLR", {"step_size": 1, "gama": 0.7})}, "unexpected keyword argument 'gama'"),
    # wrong values that build and step once, then fail (or go negative) later in the run: refused up front
    ("lrs-arg-text-for-number", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.StepLR", {"step_size": 2, "gamma": "abc"})}, "phase 1: new_lr_scheduler.lr_scheduler_init.init_args.gamma = 'abc': StepLR takes a finite number here"),
    ("lrs-arg-yaml-exponent", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.CosineAnnealingLR", {"T_max": 4, "eta_min": "1e-6"})}, "'1e-6' is text: YAML needs a dot and a signed exponent"),
    ("lrs-arg-huge-int", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.ExponentialLR", {"gamma": 10**400})}, "ExponentialLR takes a finite number"),
    ("lrs-arg-nan", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.ExponentialLR", {"gamma": float("nan")})}, "init_args.gamma = nan: ExponentialLR takes a finite number"),
    ("lrs-arg-text-for-list", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.MultiStepLR", {"milestones": "ab"})}, "init_args.milestones = 'ab': MultiStepLR takes a list of integers"),
    ("lrs-arg-literal", {"ft_schedule": with_phase(1, new_lr_scheduler={"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "init_args": {"mode": "lowest"}}, "pl_lrs_cfg": {"monitor": "val_loss"}})}, "init_args.mode = 'lowest': ReduceLROnPlateau takes one of 'min', 'max'"),
    ("lrs-negative-lr-later", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.StepLR", {"step_size": 3, "gamma": -0.5})}, "sets group 0's lr to -"),
    ("optim-arg-type", {"ft_schedule": with_phase(1, new_optimizer={"optimizer_init": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "nesterov": "yes"}}})}, "new_optimizer.optimizer_init.init_args.nesterov = 'yes': SGD takes true or false"),
    ("lrs-init-args-not-mapping", {"ft_schedule": sched_init(1, "torch.optim.lr_scheduler.StepLR", [1, 2])}, "init_args = [1, 2]: must be a mapping"),
    ("lrs-missing-init-args", {"ft_schedule": with_phase(1, new_lr_scheduler={"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR"}})}, "StepLR() failed"),
    ("init-pg-lrs-not-float", {"ft_schedule": sched_lr(1, init_pg_lrs=[1e-5, "x"])}, "init_pg_lrs = [1e-05, 'x']: entry 1 ('x')"),
    ("init-pg-lrs-negative", {"ft_schedule": sched_lr(1, init_pg_lrs=[-1.0])}, "entry 0 (-1.0) is not a finite, non-negative float"),
    ("init-pg-lrs-empty", {"ft_schedule": sched_lr(1, init_pg_lrs=[])}, "must be a non-empty list"),
    ("init-pg-lrs-strict", {"ft_schedule": sched_lr(1, init_pg_lrs=[1e-5]), "strict_validation": True}, "has 1 values for 2 groups; not covered: pg2 (phase1)"),
    ("init-pg-lrs-huge", {"ft_schedule": sched_lr(1, init_pg_lrs=[1e-5] * 10_000), "strict_validation": True}, "has 10000 values for 2 groups"),
    ("interval-bad", {"ft_schedule": sched_lr(1, pl_lrs_cfg={"interval": "batch"})}, "pl_lrs_cfg.interval = 'batch': must be \"step\" or \"epoch\""),
    ("frequency-zero", {"ft_schedule": sched_lr(1, pl_lrs_cfg={"frequency": 0})}, "pl_lrs_cfg.frequency = 0: must be a positive integer"),
    ("pl-lrs-unknown-key", {"ft_schedule": sched_lr(1, pl_lrs_cfg={"intervall": "step"})}, "pl_lrs_cfg.intervall: unknown key"),
    ("use-current-not-bool", {"ft_schedule": sched_lr(1, use_current_optimizer_pg_lrs="yes")}, "use_current_optimizer_pg_lrs = 'yes': must be true or false"),
    ("rlrop-no-monitor", {"ft_schedule": with_phase(1, new_lr_scheduler={"lr_scheduler_init": RLROP["lr_scheduler_init"]})}, "ReduceLROnPlateau needs the metric to watch"),
    ("rlrop-min-lr-length", {"ft_schedule": with_phase(2, new_lr_scheduler=RLROP)}, "min_lr = [1e-07, 1e-07]: has 2 values but the optimizer will have 3 groups"),
    ("reinit-phase-0", {"ft_schedule": with_phase(0, new_lr_scheduler=STEP_LR)}, "phase 0: new_lr_scheduler: reinitialization is not allowed in phase 0"),
    ("optim-unknown-class", {"ft_schedule": with_phase(1, new_optimizer={"optimizer_init": {"class_path": "torch.optim.NoOpt"}})}, "has no attribute 'NoOpt'"),
    ("optim-bad-args", {"ft_schedule": with_phase(1, new_optimizer={"optimizer_init": {"class_path": "torch.optim.Adam", "init_args": {"lr": "fast"}}})}, "Adam(lr='fast') failed"),
    ("optim-missing-init", {"ft_schedule": with_phase(1, new_optimizer={"class_path": "torch.optim.Adam"})}, "phase 1: new_optimizer.class_path: unknown key"),
    ("schedule-and-reinit-lr-cfg", {"ft_schedule": explicit_schedule(), "reinit_lr_cfg": STEP_LR}, "reinit_lr_cfg applies one scheduler at every phase"),
    ("implicit-init-pg-lrs", {"reinit_lr_cfg": {**STEP_LR, "init_pg_lrs": [1e-5]}}, "reinit_lr_cfg.init_pg_lrs: not allowed"),
    ("implicit-min-lr-list", {"reinit_lr_cfg": RLROP}, "cannot be a list in `reinit_lr_cfg`"),
    ("epoch-only-missing", {"ft_schedule": explicit_schedule(), "epoch_transitions_only": True}, "missing in phase(s) 0, 1, 2, 3"),
    ("file-missing", lambda tmp: {"ft_schedule": str(tmp / "nope.yaml")}, "schedule file not found"),
    ("file-duplicate-key", lambda tmp: {"ft_schedule": write(tmp, "dup.yaml", b"0:\n  params: [a]\n0:\n  params: [b]\n")}, "duplicate key 0 (line 3)"),
    ("file-not-utf8", lambda tmp: {"ft_schedule": write(tmp, "bin.yaml", b"0:\n  params: [\xff\xfe]\n")}, "not UTF-8 text"),
    ("file-bad-yaml", lambda tmp: {"ft_schedule": write(tmp, "bad.yaml", b"0:\n  params: [a\n1: {")}, "invalid YAML at line"),
    (
        "file-yaml-bomb",
        lambda tmp: {
            "ft_schedule": write(
                tmp,
                "bomb.yaml",
                ("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefghijklm", "bcdefghijklmn"))).encode(),
            )
        },
        "alias bomb",
    ),
]


@pytest.mark.parametrize("case_id,kwargs,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_training(tmp_path: Any, case_id: str, kwargs: Any, expected: str) -> None:
    if callable(kwargs):
        kwargs = kwargs(tmp_path)
    steps: list[int] = []

    class NoStep(FTSEarlyStopping):
        def on_train_batch_start(self, *args: Any) -> None:  # any step reached means validation came too late
            steps.append(1)

    fts = FinetuningScheduler(restore_best=False, **kwargs)
    cbs = [fts] if kwargs.get("epoch_transitions_only") else [fts, NoStep(monitor="val_loss", patience=1)]
    t = trainer(tmp_path, cbs, max_epochs=2)
    with pytest.raises(MisconfigurationException) as info:
        t.fit(TinyNet(), *loaders())
    message = str(info.value)
    assert expected in message, message
    assert not steps
    for line in message.splitlines():
        assert line.strip(), "no blank lines in an error"
        assert "Traceback" not in line


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_values_that_fit_their_annotations_pass() -> None:
    from torch.optim import SGD, AdamW
    from torch.optim.lr_scheduler import LambdaLR, MultiStepLR, OneCycleLR, ReduceLROnPlateau, StepLR

    from fts_daemon.argtypes import arg_problems
    from fts_daemon.reinit import dry_run_scheduler

    fine = [
        (StepLR, {"step_size": 2.0, "gamma": 1}),  # ints for floats, integral floats for ints: torch takes both
        (MultiStepLR, {"milestones": (2, 4), "gamma": 0.5}),
        (ReduceLROnPlateau, {"mode": "max", "min_lr": [0, 1.0e-6], "patience": 1}),
        (OneCycleLR, {"max_lr": [0.1, 0.2], "total_steps": None, "epochs": 2, "steps_per_epoch": 3}),
        (LambdaLR, {"lr_lambda": "anything: callables are left to the dry run"}),
        (AdamW, {"lr": 1.0e-3, "betas": [0.9, 0.99]}),
        (SGD, {"lr": 0.1, "nesterov": False, "unknown": object()}),  # unknown names are left to the constructor
    ]
    for cls, args in fine:
        assert arg_problems(cls, args) == [], cls
    # OneCycleLR refuses to step past total_steps: a dry run longer than that is not the schedule's fault
    dry_run_scheduler(OneCycleLR, {"max_lr": 0.1, "total_steps": 5}, 2)


def test_unsupported_initial_scheduler(tmp_path: Any) -> None:
    model = TinyNet(scheduler="OneCycleLR", scheduler_args={"max_lr": 0.1, "total_steps": 100})
    t = trainer(tmp_path, [FinetuningScheduler(restore_best=False)], max_epochs=1)
    with pytest.raises(MisconfigurationException, match="scheduler from configure_optimizers .OneCycleLR. is not supported"):
        t.fit(model, *loaders())


def test_all_problems_reported_together(tmp_path: Any) -> None:
    sched = with_phase(1, params=["nope"], lr="x")
    sched[2] = {**sched[2], "max_transition_epoch": "later"}
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=sched, restore_best=False)], max_epochs=1)
    with pytest.raises(MisconfigurationException) as info:
        t.fit(TinyNet(), *loaders())
    lines = str(info.value).splitlines()
    assert any(line.startswith("phase 1: lr = 'x'") for line in lines)
    assert any(line.startswith("phase 2: max_transition_epoch = 'later'") for line in lines)


def test_user_schedule_not_mutated(tmp_path: Any) -> None:
    sched = explicit_schedule()
    sched[1]["new_lr_scheduler"]["lr_scheduler_init"]["init_args"]["optimizer"] = "ignored"
    before = copy.deepcopy(sched)
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=sched, restore_best=False), FTSEarlyStopping(monitor="val_loss", patience=1)], max_epochs=6)
    t.fit(TinyNet(), *loaders())
    assert sched == before


def test_unmatched_params_come_with_the_class_and_argument_problems(tmp_path: Any) -> None:
    """Params are resolved before the reinit configs (which need the matched groups), and a pattern that matched
    nothing used to hide every class and argument problem until it was fixed; those need no groups, so they come
    in the same report. The checks that need group counts (list lengths, the dry run) still wait."""
    sched = with_phase(1, params=["nope.*"])
    sched[1]["new_lr_scheduler"] = {"lr_scheduler_init": {"class_path": "torch.optim.lr_scheduler.StepLR",
                                                          "init_args": {"step_size": 2, "gamma": "abc"}}}
    sched[2] = {**sched[2], "new_optimizer": {"optimizer_init": {"class_path": "torch.optim.Nope"}}}
    t = trainer(tmp_path, [FinetuningScheduler(ft_schedule=sched, restore_best=False)], max_epochs=1)
    with pytest.raises(MisconfigurationException) as info:
        t.fit(TinyNet(), *loaders())
    lines = str(info.value).splitlines()
    assert any(line.startswith("phase 1: params = 'nope.*': matches no parameter") for line in lines), lines
    assert any(line.startswith("phase 1: new_lr_scheduler.lr_scheduler_init.init_args.gamma = 'abc'") for line in lines)
    assert any(line.startswith("phase 2: new_optimizer.optimizer_init.class_path = 'torch.optim.Nope'") for line in lines)


def test_implicit_config_problems_belong_to_the_config_not_a_phase(tmp_path: Any) -> None:
    """They were reported as "phase 1: reinit_lr_cfg...", and an unknown key's hint offered init_pg_lrs, which
    implicit mode refuses."""
    bad = {**STEP_LR, "bogus": 1, "pl_lrs_cfg": {"reduce_on_plateau": True}}
    t = trainer(tmp_path, [FinetuningScheduler(reinit_lr_cfg=bad, restore_best=False)], max_epochs=1)
    with pytest.raises(MisconfigurationException) as info:
        t.fit(TinyNet(), *loaders())
    lines = str(info.value).splitlines()
    assert ("reinit_lr_cfg.bogus: unknown key (expected one of lr_scheduler_init, pl_lrs_cfg, "
            "use_current_optimizer_pg_lrs)") in lines, lines
    plateau = RLROP["lr_scheduler_init"]
    t = trainer(tmp_path, [FinetuningScheduler(reinit_lr_cfg={"lr_scheduler_init": plateau}, restore_best=False)],
                max_epochs=1)
    with pytest.raises(MisconfigurationException) as info:
        t.fit(TinyNet(), *loaders())
    lines = str(info.value).splitlines()
    assert any(line.startswith("reinit_lr_cfg.pl_lrs_cfg: ReduceLROnPlateau needs") for line in lines), lines
    assert not any(line.startswith("phase ") for line in lines), lines
