"""What every plugin class declares: kind, name, typed Params and capabilities."""

from __future__ import annotations

from typing import Any, ClassVar

from bench.params import NoParams

KINDS = ("dataset", "encoder", "grouping", "decoder", "objective", "task")


class Plugin:
    """Mix-in for plugin classes.

    `requires` / `provides` are capability names such as "features.targets",
    "slots.logits", "decoding.masks" or "batch.instance_masks"; the composer checks that
    every requirement of a combination is provided by one of its other plugins.
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        """(requires, provides) for these params; override when they depend on params."""
        return set(cls.requires), set(cls.provides)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
