"""What every plugin class declares: kind, name, typed Params and capabilities."""

from __future__ import annotations

from typing import Any, ClassVar

from ocl_bench.contracts import Decoding, ReconstructionOutput
from ocl_bench.params import NoParams

KINDS = (
    "dataset",
    "tokenizer",
    "encoder",
    "grouping",
    "decoder",
    "objective",
    "task",
    "importer",
)


class Plugin:
    """Mix-in for plugin classes.

    `requires` / `provides` are capability names such as "features.targets",
    "slots.logits", "decoding.masks" or "batch.instance_masks"; the composer checks that
    every requirement of a combination is provided by one of its other plugins.
    A decoder names its family's output class in `output`; every field that family always
    sets ("decoding.logits", ...) is provided without being listed. "generation.images"
    means the decoder has `generate` (contracts.GenerativeDecoder).
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    output: ClassVar[type[Decoding]] = ReconstructionOutput  # decoders only

    @classmethod
    def capabilities(cls, params: Any) -> tuple[set[str], set[str]]:
        """(requires, provides) for these params; override when they depend on params."""
        provides = set(cls.provides)
        if cls.kind == "decoder":
            provides |= cls.output.family_fields()
        return set(cls.requires), provides

    @classmethod
    def summary(cls) -> str:
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
