"""Queued schedule edits: merge, validate against the live model, journal, and apply at the phase transition.

An edit targets one upcoming phase (index > current phase) and changes any key a phase has (``params``, ``lr``,
``max_transition_epoch``, ``new_lr_scheduler``, ``new_optimizer``). Several edits to one phase merge in order; the
merged phase is validated with the engine's own validator on receipt (and again when applied). Accepted edits are
appended to a journal (flushed and fsynced before the reply), applied atomically in the callback's
``before_transition`` hook, and re-read from the journal when a run resumes.

Threads: ``queue``/``cancel``/``list`` run on the bus I/O thread, ``apply_for`` and ``attach`` on the training thread;
one lock serializes them, so an edit is either in before its phase starts or refused with the reason.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fts_daemon import events as ev
from fts_daemon.schedule import (
    PHASE_KEYS,
    Schedule,
    ScheduleError,
    dump_schedule,
    parse_schedule,
    resolve_params,
)

if TYPE_CHECKING:
    import torch

    from fts_daemon.callback import FinetuningScheduler
    from fts_daemon.validation import ValidationReport

Publish = Callable[..., Any]  # EventBus.publish(kind, data, step=None, epoch=None)
BLOCK_KEYS = ("new_lr_scheduler", "new_optimizer")
# every queued edit is re-validated with each new one: a bound keeps a flood of requests from stalling the I/O thread
MAX_PENDING = 256


class EditError(ValueError):
    """Why an edit was refused (one line)."""


@dataclass
class Edit:
    id: str
    phase: int
    changes: dict[str, Any]
    status: str = "queued"  # one of events.EDIT_STATUSES
    error: str | None = None
    created: float = field(default_factory=time.time)
    applied_step: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Edit:
        return cls(
            id=str(obj["id"]),
            phase=int(obj["phase"]),
            changes=dict(obj.get("changes") or {}),
            status=str(obj.get("status", "queued")),
            error=obj.get("error"),
            created=float(obj.get("created", time.time())),
            applied_step=obj.get("applied_step"),
            warnings=list(obj.get("warnings") or []),
        )


# ------------------------------------------------------------------------------------------------ pure merging


def _merge_block(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            sub = dict(out[key])
            # a different class does not take the old class's arguments
            if "class_path" in value and value["class_path"] != sub.get("class_path"):
                sub.pop("init_args", None)
            out[key] = _merge_block(sub, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_phase(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """A phase dict with ``changes`` applied: top-level keys replace, ``new_lr_scheduler`` / ``new_optimizer`` merge
    key-wise at every depth (lists replace), ``null`` removes a key, and a new ``class_path`` drops the old
    ``init_args``."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif key in BLOCK_KEYS and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge_block(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_changes(changes: Any) -> dict[str, Any]:
    """The shape of an edit's ``changes`` (types of values are the validator's job)."""
    if not isinstance(changes, Mapping) or not changes:
        raise EditError("`changes` must be a non-empty object of phase keys (" + ", ".join(PHASE_KEYS) + ")")
    unknown = [str(k) for k in changes if k not in PHASE_KEYS]
    if unknown:
        raise EditError(f"unknown phase key {unknown[0]!r} (a phase has: {', '.join(PHASE_KEYS)})")
    return dict(changes)


def check_phase_index(phase: Any) -> int:
    if isinstance(phase, bool) or not isinstance(phase, int):
        raise EditError(f"`phase` must be an integer, got {phase!r}")
    return phase


# ------------------------------------------------------------------------------------------------ journal


class Journal:
    """Append-only JSON lines, each flushed and fsynced before ``append`` returns."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"ts": time.time(), **record}, separators=(",", ":")) + "\n"
        with open(self.path, "a+b") as fh:
            if fh.tell() > 0:  # a failed write (disk full) may have left a torn line: never glue a record onto it
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # the file's directory entry must survive a crash too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:  # a torn last line from a crash: everything before it is intact
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out


def replay_journal(records: list[dict[str, Any]]) -> dict[str, Edit]:
    """Edits by id with their latest status, from journal records."""
    edits: dict[str, Edit] = {}
    for rec in records:
        kind = rec.get("type")
        if kind == "queued" and isinstance(rec.get("edit"), Mapping):
            try:
                edit = Edit.from_dict(rec["edit"])
            except (KeyError, TypeError, ValueError):
                continue
            edits[edit.id] = edit
            continue
        edit = edits.get(str(rec.get("id")))
        if edit is None:
            continue
        if kind == "cancelled":
            edit.status = "cancelled"
        elif kind == "applied":
            edit.status, edit.applied_step = "applied", rec.get("step")
        elif kind == "rejected":
            edit.status, edit.error = "rejected", rec.get("error")
        elif kind == "requeued":
            edit.status, edit.applied_step, edit.error = "queued", None, None
    return edits


# ------------------------------------------------------------------------------------------------ the queue


def phase0_group_count(fts: FinetuningScheduler, n_groups: int) -> int | None:
    """Groups phase 0 owns: all groups minus those that transitions added (a resume reads them from the checkpoint)."""
    added = sum(len(t.get("new_groups") or []) for t in fts.transitions if t.get("from") is not None)
    n0 = n_groups - added
    return n0 if n0 > 0 else None


class EditQueue:
    """Edits of one run. Construct it early (the bus answers ops at once); ``attach`` once training starts."""

    def __init__(self, journal: Journal, publish: Publish, effective_path: Path | None = None):
        self.journal = journal
        self.publish = publish
        self.effective_path = effective_path
        self._lock = threading.RLock()
        self._edits: dict[str, Edit] = {}
        self._next_id = 1
        self._started = 0  # highest phase whose transition has begun
        self._fts: FinetuningScheduler | None = None
        self._module: torch.nn.Module | None = None
        self._n0: int | None = None
        self._schedule_payload: dict[str, Any] | None = None
        self._carried: list[dict[str, Any]] = []  # edits found in a checkpoint (tap state)

    # -------------------------------------------------------------------------------------- training thread

    def attach(self, fts: FinetuningScheduler, module: torch.nn.Module, n_groups: int) -> None:
        """Bind to the live callback and model (fit start); on a resume, pick up the journal's pending edits."""
        with self._lock:
            self._fts, self._module = fts, module
            self._started = fts.curr_depth
            self._n0 = phase0_group_count(fts, n_groups)
            self._restore(fts.curr_depth)
            self._write_effective()
        self._publish_schedule()

    def carry(self, edits: list[dict[str, Any]]) -> None:
        """Edits stored in a checkpoint being resumed (the journal wins where both know an edit)."""
        self._carried = [e for e in edits if isinstance(e, Mapping)]

    def apply_for(self, fts: FinetuningScheduler, next_depth: int) -> None:
        """``before_transition`` hook: swap in phase ``next_depth`` with its queued edits merged, atomically."""
        with self._lock:
            self._started = max(self._started, next_depth)
            todo = [e for e in self._edits.values() if e.status == "queued" and e.phase == next_depth]
            if not todo:
                return
            step = int(fts.trainer.global_step) if fts.trainer is not None else None
            try:
                # with every edit still queued, as each was accepted: an edit that moves a parameter here from a
                # later phase is valid only with the edit that takes it out there
                try:
                    schedule, report = self._candidate(self._pending_by_phase())
                except EditError:  # a later phase's edit no longer fits: this phase's may still, alone
                    schedule, report = self._candidate({next_depth: todo})
            except EditError as err:
                for edit in todo:
                    self._set_status(edit, "rejected", error=f"at the transition into phase {next_depth}: {err}")
                self.publish(ev.LOG, {"level": "error", "message": f"queued edits for phase {next_depth} "
                                      f"were rejected at the transition: {err}"}, step)
                return
            fts.replace_phase(schedule[next_depth])
            fts.report = report
            for edit in todo:
                self._set_status(edit, "applied", step=step)
            self._write_effective()
        self._publish_schedule()

    def on_schedule(self, payload: dict[str, Any]) -> None:
        """The callback published its schedule: remember it and publish it with the queued edits."""
        self._schedule_payload = payload
        if self._fts is not None:  # before attach, ``attach`` publishes it (with any resumed edits)
            self._publish_schedule()

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"edits": [e.to_dict() for e in self._edits.values()]}

    # -------------------------------------------------------------------------------------- I/O thread

    def queue(self, phase: Any, changes: Any) -> dict[str, Any]:
        """Validate and journal a new edit; return its record. Raises EditError with the reason if refused."""
        try:
            index = check_phase_index(phase)
            cleaned = check_changes(changes)
            with self._lock:
                if sum(e.status == "queued" for e in self._edits.values()) >= MAX_PENDING:
                    raise EditError(f"{MAX_PENDING} edits are already queued; cancel some first")
                edit = Edit(id=f"e{self._next_id}", phase=index, changes=copy.deepcopy(cleaned))
                fts, overrides = self._with_pending(edit)
                _, report = self._candidate(overrides)
                edit.warnings = [w for w in report.warnings if w.startswith(f"phase {index}:")]
                if index > fts.max_depth:
                    edit.warnings.append(f"phase {index} is beyond max_depth={fts.max_depth}; it will not run")
                try:  # durable first: an edit the journal does not hold is refused, never queued in memory only
                    self.journal.append({"type": "queued", "edit": edit.to_dict()})
                except OSError as err:
                    raise EditError(f"cannot write the edit journal {self.journal.path}: {err.strerror or err}; "
                                    "the edit was not queued") from None
                self._next_id += 1
                self._edits[edit.id] = edit
                record = edit.to_dict()
        except EditError as err:
            self.publish(ev.EDIT, {"edit": {"id": None, "phase": phase if isinstance(phase, int) else None,
                                            "changes": changes if isinstance(changes, Mapping) else None,
                                            "status": "rejected", "error": str(err), "created": time.time(),
                                            "applied_step": None, "warnings": []}})
            raise
        self.publish(ev.EDIT, {"edit": record})
        self._publish_schedule()
        return record

    def cancel(self, edit_id: Any) -> dict[str, Any]:
        with self._lock:
            edit = self._edits.get(str(edit_id))
            if edit is None:
                raise EditError(f"no edit {edit_id!r} in this run")
            if edit.status != "queued":
                raise EditError(f"edit {edit.id} is {edit.status}; only queued edits can be cancelled")
            if self._fts is not None and edit.phase <= max(self._fts.curr_depth, self._started):
                raise EditError(f"phase {edit.phase} has already started; edit {edit.id} can no longer be cancelled")
            if self._fts is not None and self._fts.schedule is not None and self._module is not None:
                # later edits may build on this one (arguments of the class it sets): without it they might no
                # longer validate, and would all be rejected at the transition; refuse rather than lose them
                try:
                    self._candidate(self._pending_without({edit.id}))
                except EditError as err:
                    same = self._pending_by_phase().get(edit.phase, [])
                    later = same[same.index(edit) + 1:]
                    # name the later edits whose removal alongside it would do; all of them if none alone would
                    culprits = [e.id for e in later if self._validates(self._pending_without({edit.id, e.id}))]
                    # what to do first, then why: a narrow client line shows the beginning
                    todo = f"cancel {', '.join(culprits or [e.id for e in later])} first: " if later else ""
                    raise EditError(f"edit {edit.id} cannot be cancelled alone; {todo}the queued edits left would "
                                    f"not validate ({err})") from None
            self._set_status(edit, "cancelled")
            record = edit.to_dict()
        self._publish_schedule()
        return record

    def list(self, phase: Any = None, status: Any = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                e.to_dict()
                for e in self._edits.values()
                if (phase is None or e.phase == phase) and (status is None or e.status == status)
            ]

    def preview(self, phase: Any, changes: Any) -> Schedule:
        """The schedule as it would be with the queued edits plus this one (for plans); raises EditError."""
        index = check_phase_index(phase)
        cleaned = check_changes(changes)
        with self._lock:
            _, overrides = self._with_pending(Edit(id="preview", phase=index, changes=cleaned))
            schedule, _ = self._candidate(overrides)
            return schedule

    # -------------------------------------------------------------------------------------- internals

    def _ready(self) -> FinetuningScheduler:
        if self._fts is None or self._fts.schedule is None or self._module is None:
            raise EditError("the run is not training yet; edits are accepted once training starts")
        return self._fts

    def _with_pending(self, edit: Edit) -> tuple[FinetuningScheduler, dict[int, list[Edit]]]:
        """Check ``edit`` may be queued now; return the callback and every queued edit by phase, plus this one."""
        fts = self._ready()
        self._check_upcoming(edit.phase, fts)
        self._check_keys(edit.changes, fts)
        overrides = self._pending_by_phase()
        overrides.setdefault(edit.phase, []).append(edit)
        return fts, overrides

    def _check_keys(self, changes: Mapping[str, Any], fts: FinetuningScheduler) -> None:
        # in implicit mode the callback's reinit_*_cfg wins at every phase: a per-phase block would be ignored
        for key, cfg in (("new_lr_scheduler", "reinit_lr_cfg"), ("new_optimizer", "reinit_optim_cfg")):
            # null too: removing a block the run never uses would be "applied" and change nothing
            if key in changes and getattr(fts, cfg, None):
                raise EditError(f"{key} cannot be edited: this run sets {cfg}, which applies at every phase instead")

    def _check_upcoming(self, index: int, fts: FinetuningScheduler) -> None:
        assert fts.schedule is not None
        n = len(fts.schedule)
        if not 0 <= index < n:
            raise EditError(f"phase {index} does not exist (the schedule has phases 0..{n - 1})")
        current = max(fts.curr_depth, self._started)
        if index == current:
            raise EditError(f"phase {index} is the current phase; only upcoming phases (> {current}) can be edited")
        if index < current:
            raise EditError(f"phase {index} is already done; only upcoming phases (> {current}) can be edited")

    def _pending_by_phase(self) -> dict[int, list[Edit]]:
        out: dict[int, list[Edit]] = {}
        for edit in self._edits.values():
            if edit.status == "queued":
                out.setdefault(edit.phase, []).append(edit)
        return out

    def _pending_without(self, ids: set[str]) -> dict[int, list[Edit]]:
        return {p: [e for e in es if e.id not in ids] for p, es in self._pending_by_phase().items()}

    def _validates(self, overrides: Mapping[int, list[Edit]]) -> bool:
        try:
            self._candidate(overrides)
        except EditError:
            return False
        return True

    def _candidate(self, overrides: Mapping[int, list[Edit]]) -> tuple[Schedule, ValidationReport]:
        """The live schedule with ``overrides`` merged, parsed, resolved and validated as the engine would."""
        from fts_daemon.callback import shared_param_aliases
        from fts_daemon.validation import class_problems, validate_schedule

        fts, module = self._fts, self._module
        assert fts is not None and fts.schedule is not None and module is not None
        raw = fts.schedule.to_dict(resolved=False)
        for index, edits in overrides.items():
            phase = raw[index]
            for edit in edits:
                phase = merge_phase(phase, edit.changes)
            raw[index] = phase
        try:
            schedule, _ = parse_schedule(raw, fts.base_max_lr)
            opts = fts.validation_options(self._n0, getattr(module, "no_decay", None))
            try:
                # phases that have started keep their params; phases this check edits may not name them
                resolve_params(schedule, [n for n, _ in module.named_parameters()], shared_param_aliases(module),
                               settled_through=fts.curr_depth, strict={p for p, es in overrides.items() if es})
            except ScheduleError as err:  # with what the classes and arguments would be refused for, in one reply
                hint = []
                if any("scheduled in more than one phase" in p.reason for p in err.problems):
                    hint = ["to move parameters to another phase, first queue an edit that takes them out of the "
                            "phase that holds them"]
                raise ScheduleError(err.problems + hint + class_problems(schedule, opts)) from None
            report = validate_schedule(schedule, opts)
        except ScheduleError as err:
            raise EditError("; ".join(str(p) for p in err.problems)) from None
        except Exception as err:  # the validator imports and dry-runs classes: never let that escape
            raise EditError(f"{type(err).__name__}: {err}") from None
        return schedule, report

    def _set_status(self, edit: Edit, status: str, error: str | None = None, step: int | None = None) -> None:
        edit.status, edit.error = status, error
        if step is not None:
            edit.applied_step = step
        record: dict[str, Any] = {"type": status, "id": edit.id}
        if error is not None:
            record["error"] = error
        if step is not None:
            record["step"] = step
        self.journal.append(record)
        self.publish(ev.EDIT, {"edit": edit.to_dict()}, step)

    def _restore(self, depth: int) -> None:
        known = replay_journal(self.journal.read())
        for obj in self._carried:
            try:
                edit = Edit.from_dict(obj)
            except (KeyError, TypeError, ValueError):
                continue
            if edit.id not in known:
                known[edit.id] = edit
                self.journal.append({"type": "queued", "edit": edit.to_dict()})
        self._carried = []
        if not known:
            return
        self._edits = dict(sorted(known.items(), key=lambda kv: kv[1].created))
        self._next_id = 1 + max((int(k[1:]) for k in self._edits if k[1:].isdigit()), default=0)
        for edit in self._edits.values():
            if edit.status in ("cancelled", "rejected"):
                continue
            if edit.phase > depth:
                if edit.status != "queued":  # applied after the checkpoint this run resumed from: apply again
                    edit.status, edit.applied_step = "queued", None
                    self.journal.append({"type": "requeued", "id": edit.id})
            elif edit.status == "queued":
                self._set_status(edit, "rejected", error=f"phase {edit.phase} had already started when the run resumed")
        # re-validate what is pending against the resumed model and schedule, one edit at a time in order
        accepted: dict[int, list[Edit]] = {}
        for edit in [e for e in self._edits.values() if e.status == "queued"]:
            trial = {k: list(v) for k, v in accepted.items()}
            trial.setdefault(edit.phase, []).append(edit)
            try:
                self._candidate(trial)
            except EditError as err:
                self._set_status(edit, "rejected", error=f"on resume: {err}")
                continue
            accepted = trial
        for edit in self._edits.values():
            self.publish(ev.EDIT, {"edit": edit.to_dict()})

    def _write_effective(self) -> None:
        if self.effective_path is None or self._fts is None or self._fts.schedule is None:
            return
        applied = [e.id for e in self._edits.values() if e.status == "applied"]
        header = "# effective fine-tuning schedule" + (f" (applied edits: {', '.join(applied)})" if applied else "")
        tmp = self.effective_path.with_suffix(".tmp")
        tmp.write_text(header + "\n" + dump_schedule(self._fts.schedule, resolved=False), encoding="utf-8")
        os.replace(tmp, self.effective_path)

    def _publish_schedule(self) -> None:
        payload = self._schedule_payload
        if payload is None:
            return
        with self._lock:
            queued = self._pending_by_phase()
            phases = []
            for phase in payload.get("phases", []):
                entry = dict(phase)
                entry["edits"] = [e.to_dict() for e in queued.get(int(phase.get("index", -1)), [])]
                phases.append(entry)
        self.publish(ev.SCHEDULE, {**payload, "phases": phases})
