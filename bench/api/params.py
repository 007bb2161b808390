"""Typed plugin parameters: dataclasses whose fields carry a default and a one-line doc."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, get_args, get_origin

from ocl_bench.api.errors import ConfigError

BOUNDS = ("ge", "gt", "le", "lt")


def param(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    unbounded: bool = False,
    since: str | None = None,
) -> Any:
    """A dataclass field with a default, its documentation and, for numbers, its valid range.

    The range is checked when a config resolves (build_params), so a bad value fails in one
    line naming the key instead of deep inside torch; `plugins show` prints it.

    `unbounded=True` says a number takes any value (a seed offset, a shift): every int or
    float param states its range or this, so a missing range is an omission the conformance
    suite (ocl_bench.testing) can name, not a silent "anything goes".

    `since` (a version, e.g. "0.2") marks a param added after results were stored: while it
    holds its default it is left out of the config hash (`hashed_dict`), so every result
    stored before it existed keeps its hash, and its meaning, since the default is the old
    behaviour. The resolved config (config.toml) still records it.
    """
    bounds = {k: v for k, v in zip(BOUNDS, (ge, gt, le, lt)) if v is not None}
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("param: give at most one lower bound (ge/gt) and one upper (le/lt)")
    if unbounded and bounds:
        raise TypeError("param: unbounded=True and a range (ge/gt/le/lt) exclude each other")
    if bounds and default is not None:
        # A range on a non-number, or a default outside its own range, is a plugin bug:
        # fail at import, where the plugin author sees it, not in a user's run.
        if not _is_number(default):
            raise TypeError(f"param: a range needs a numeric default, got {default!r}")
        problem = _range_problem(default, bounds)
        if problem:
            raise ValueError(f"param: default {default!r} {problem}")
    metadata = {"doc": doc, "bounds": bounds, "since": since}
    if unbounded:
        metadata["unbounded"] = True
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    if isinstance(bound, float) and bound.is_integer():
        return str(int(bound))
    return repr(bound)


def range_text(bounds: dict[str, float]) -> str:
    """'>= 1', '[0, 1]', '(0, 1]', ... ('' when unbounded)."""
    low = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if low and high:
        left = "[" if low[0] == "ge" else "("
        right = "]" if high[0] == "le" else ")"
        return f"{left}{_fmt(low[1])}, {_fmt(high[1])}{right}"
    if low:
        return f"{'>=' if low[0] == 'ge' else '>'} {_fmt(low[1])}"
    if high:
        return f"{'<=' if high[0] == 'le' else '<'} {_fmt(high[1])}"
    return ""


def _range_problem(value: float, bounds: dict[str, float]) -> str | None:
    """Why `value` is outside `bounds`, or None when it is inside (or not a number: None)."""
    if not bounds or not _is_number(value):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"is not a finite number (allowed: {range_text(bounds)})"
    ok = (
        value >= bounds.get("ge", value)
        and value <= bounds.get("le", value)
        and ("gt" not in bounds or value > bounds["gt"])
        and ("lt" not in bounds or value < bounds["lt"])
    )
    return None if ok else f"is out of range (allowed: {range_text(bounds)})"


def field_bounds(f: dataclasses.Field) -> dict[str, float]:
    """The range declared with param(...) ({} when none)."""
    return dict(f.metadata.get("bounds", {}))


def field_unbounded(f: dataclasses.Field) -> bool:
    """True when param(..., unbounded=True) declared that every value is valid."""
    return bool(f.metadata.get("unbounded", False))


@dataclasses.dataclass(frozen=True)
class NoParams:
    """A plugin without parameters."""


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe(cls: type) -> dict[str, dict[str, Any]]:
    """name -> {type, default, doc, range, bounds} for every field of a Params dataclass."""
    hints = _hints(cls)
    out: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        if isinstance(default, tuple):
            default = list(default)
        bounds = field_bounds(f)
        out[f.name] = {
            "type": _type_name(hints[f.name]),
            "default": default,
            "doc": f.metadata.get("doc", ""),
            "range": range_text(bounds) or ("unbounded" if field_unbounded(f) else None),
            "bounds": bounds,
        }
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list ({_type_name(tp)}), got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(
                _coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            )
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected str, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build_params(cls: type, values: dict[str, Any], where: str) -> Any:
    """Check `values` against the Params dataclass `cls` and build it.

    Unknown keys, wrong types and values outside a param's declared range raise ConfigError
    naming the key and what is allowed.
    """
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in hints or key not in fields:
            allowed = ", ".join(fields) if fields else "(none)"
            raise ConfigError(f"unknown key '{where}.{key}'; allowed keys: {allowed}")
        coerced = _coerce(value, hints[key], f"{where}.{key}")
        problem = _range_problem(coerced, field_bounds(fields[key]))
        if problem:
            raise ConfigError(f"{where}.{key}={value!r} {problem}")
        kwargs[key] = coerced
    return cls(**kwargs)


def to_dict(params: Any) -> dict[str, Any]:
    """Params as plain TOML-friendly values."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def hashed_dict(params: Any) -> dict[str, Any]:
    """`to_dict` minus the params added `since` a release that still hold their default:
    what a config hash covers (see `param`)."""
    out = to_dict(params)
    for f in dataclasses.fields(params):
        if f.metadata.get("since") is None:
            continue
        default = _default_of(f)
        default = list(default) if isinstance(default, tuple) else default
        if out[f.name] == default:
            del out[f.name]
    return out
