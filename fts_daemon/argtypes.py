"""Check a class's keyword arguments against its constructor's type annotations, before the class is built.

Why: a dry run builds a scheduler and steps it once, which misses a value of the wrong type that is only used
later (``StepLR(step_size=2, gamma="abc")`` builds and steps once, then fails at step 2, deep in a run that had
accepted it). Annotations of torch's schedulers and optimizers say what each argument takes; values that plainly
contradict them (text for a number, a string for a list) are refused up front. Anything this module cannot judge
(callables, tensors, unknown or unparsable annotations) is accepted and left to the dry run.

Pure: no torch import; annotations are evaluated lazily, once per class.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

__all__ = ["arg_problems"]

# names torch's modules import only under TYPE_CHECKING, which string annotations still use
_EVAL_NAMES: dict[str, Any] = {
    **{name: getattr(collections.abc, name) for name in ("Callable", "Iterable", "Sequence", "Mapping")},
    **{name: getattr(typing, name) for name in ("Any", "Literal", "Optional", "Union", "SupportsFloat", "cast")},
}
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.Collection)


@functools.lru_cache(maxsize=256)
def _hints(cls: type) -> dict[str, Any]:
    init = getattr(cls, "__init__", None)
    if init is None:
        return {}
    module = sys.modules.get(getattr(init, "__module__", "") or "")
    try:
        return typing.get_type_hints(init, globalns={**_EVAL_NAMES, **(vars(module) if module else {})})
    except Exception:  # an annotation that cannot be evaluated: judge nothing rather than guess
        return {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, hint: Any) -> bool | None:
    """True if ``value`` fits ``hint``, False if it plainly does not, None if this module cannot tell."""
    if hint is Any or hint is object:
        return True
    if hint is float:
        try:
            return _is_number(value) and math.isfinite(value)
        except OverflowError:  # an int beyond any float (JSON and YAML allow one)
            return False
    if hint is int:  # 2.0 for 2 works wherever torch does arithmetic only; its own isinstance checks refuse it
        return _is_number(value) and (isinstance(value, int) or float(value).is_integer())
    if hint is bool:
        return isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        verdicts = [_fits(value, a) for a in args]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is Literal:
        return value in args
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args and (origin is not tuple or len(args) == 2 and args[1] is Ellipsis) else Any
        verdicts = [_fits(v, inner) for v in value]
        return False if any(v is False for v in verdicts) else (True if all(verdicts) else None)
    return None


def _describe(hint: Any) -> str:
    if hint is float:
        return "a finite number"
    if hint is int:
        return "an integer"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "text"
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _SEQUENCES:
        return {int: "a list of integers", float: "a list of numbers"}.get(args[0] if args else None, "a list")
    return getattr(hint, "__name__", str(hint))


def arg_problems(cls: type, init_args: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, reason) for each argument whose value contradicts ``cls.__init__``'s annotation."""
    hints = _hints(cls)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    out = []
    for name, value in init_args.items():
        hint = hints.get(name)
        if hint is None or name not in params or _fits(value, hint) is not False:
            continue
        reason = f"{cls.__name__} takes {_describe(hint)} here"
        if isinstance(value, str) and _is_float_text(value):
            # PyYAML (YAML 1.1) reads 1e-6 as text: only 1.0e-6 is a number
            reason += f"; {value!r} is text: YAML needs a dot and a signed exponent to read a number (1.0e-6, not 1e-6)"
        out.append((name, value, reason))
    return out


def _is_float_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
