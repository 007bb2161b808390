"""Plugin discovery through the "ocl_bench" entry-point group (built-ins included)."""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pluggy

from ocl_bench.api import hookspecs
from ocl_bench.api.errors import UnknownPluginError
from ocl_bench.api.params import build_params, describe
from ocl_bench.api.plugin import KINDS, Dataset, Decoder, Encoder, Grouping, Objective
from ocl_bench.api.tasking import Task
from ocl_bench.api.tokenizing import ImageTokenizer

# The base class of each kind, where its optional hooks are declared (importers have none).
KIND_BASES: dict[str, type] = {
    "dataset": Dataset,
    "tokenizer": ImageTokenizer,
    "encoder": Encoder,
    "grouping": Grouping,
    "decoder": Decoder,
    "objective": Objective,
    "task": Task,
}


def with_kind_base(cls: type) -> type:
    """`cls`, or for a plugin written before the kind base classes existed (a subclass of
    Plugin only), a subclass of it and its kind's base: the hooks' no-op defaults fill in
    what it does not define, so the core calls every hook without probing. Warns once."""
    base = KIND_BASES.get(cls.kind)
    if base is None or issubclass(cls, base):
        return cls
    warnings.warn(
        f"{cls.kind} plugin '{cls.name}' ({cls.__module__}.{cls.__qualname__}) subclasses"
        f" Plugin; subclass ocl_bench.api.{base.__module__.rsplit('.', 1)[-1]}."
        f"{base.__name__} instead (its optional hooks are declared there)",
        DeprecationWarning,
        stacklevel=2,
    )
    adapted = type(cls.__name__, (cls, base), {"__module__": cls.__module__})
    adapted.__qualname__ = cls.__qualname__
    adapted.__doc__ = cls.__doc__
    return adapted


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    distribution: str
    version: str
    cls: type | None
    error: str | None = None

    @property
    def broken(self) -> bool:
        return self.error is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.cls.summary() if self.cls else "",
            "params": describe(self.cls.Params) if self.cls else {},
            "broken": self.broken,
            "error": self.error,
        }


class Registry:
    """Every plugin the installed distributions register, plus the broken ones."""

    def __init__(self, infos: list[PluginInfo]):
        # every class through with_kind_base, however the info was made (entry points, or a
        # caller's own PluginInfo), so each has its kind's hooks
        infos = [
            dataclasses.replace(i, cls=with_kind_base(i.cls)) if i.cls is not None else i
            for i in infos
        ]
        self.infos = infos
        self._by_kind: dict[str, dict[str, PluginInfo]] = {k: {} for k in KINDS}
        for info in infos:
            if info.cls is not None:
                self._by_kind.setdefault(info.kind, {})[info.name] = info

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind.get(kind, {}))

    def info(self, kind: str, name: str) -> PluginInfo:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            broken = [i for i in self.infos if i.broken and i.name == name]
            if broken:
                raise UnknownPluginError(
                    f"{kind} plugin '{name}' is broken: {broken[0].error}"
                ) from None
            known = ", ".join(self.names(kind)) or "(none)"
            raise UnknownPluginError(f"unknown {kind} '{name}'; known {kind}s: {known}") from None

    def get(self, kind: str, name: str) -> type:
        cls = self.info(kind, name).cls
        assert cls is not None
        return cls

    def find(self, name: str) -> list[PluginInfo]:
        return [i for i in self.infos if i.name == name]


def _collect(
    pm: pluggy.PluginManager, ep: md.EntryPoint, dist: str, version: str
) -> list[PluginInfo]:
    try:
        module = ep.load()
        if not pm.is_registered(module):
            pm.register(module, name=f"{dist}:{ep.value}")
        impl = getattr(module, "ocl_bench_plugins", None)
        if impl is None:
            raise TypeError(f"{ep.value} does not implement ocl_bench_plugins()")
        classes = impl()
    except Exception as err:  # a broken plugin must not take the registry down
        return [PluginInfo("?", ep.name, dist, version, None, f"{type(err).__name__}: {err}")]
    infos = []
    for cls in classes:
        bad = [a for a in ("kind", "name", "Params") if not getattr(cls, a, None)]
        if bad or cls.kind not in KINDS or not dataclasses.is_dataclass(cls.Params):
            why = f"missing {', '.join(bad)}" if bad else f"bad kind {cls.kind!r} or Params"
            infos.append(PluginInfo("?", getattr(cls, "name", ep.name), dist, version, None, why))
            continue
        infos.append(PluginInfo(cls.kind, cls.name, dist, version, cls))
    return infos


def discover() -> Registry:
    """Load every entry point of the group; failures become broken entries."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    for ep in md.entry_points(group=hookspecs.PROJECT):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        infos.extend(_collect(pm, ep, dist, version))
    seen: set[tuple[str, str]] = set()
    unique = []
    for info in infos:
        key = (info.kind, info.name)
        if key not in seen:
            seen.add(key)
            unique.append(info)
    return Registry(
        sorted(unique, key=lambda i: (KINDS.index(i.kind) if i.kind in KINDS else 99, i.name))
    )


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry (discovered once)."""
    return discover()


def build_tokenizer(name: str, values: dict[str, Any], where: str) -> ImageTokenizer:
    """Tokenizer plugin `name` built from `values`; errors name `where` ("encoder.tokenizer")."""
    cls = registry().get("tokenizer", name)
    return cls(build_params(cls.Params, values, where))
