"""What every plugin class declares (kind, name, typed Params, capabilities), and one base
class per kind with every optional hook declared: a no-op default and a docstring, so this
module and hookspecs.py are the whole contract (nothing in the core probes with getattr).

    class MyEncoder(Encoder, nn.Module): ...   # model parts are also torch modules
    class MyTask(Task): ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ocl_bench.api.contracts import Decoding, Progress, ReconstructionOutput
from ocl_bench.api.params import NoParams

if TYPE_CHECKING:
    from torch import nn

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


@dataclass(frozen=True)
class ConformanceRun:
    """In a `conformance` declaration: the path of an untrained run directory of this tiny
    run (dotted overrides of the suite's tiny base, as `conformance` holds), which the suite
    writes once per process: for a plugin that reads a trained run (a teacher run, the run
    a slot library is made from)."""

    overrides: Mapping[str, Any]


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
    # The tiny run the conformance suite (ocl_bench.testing, docs/conformance.md) checks this
    # plugin in: dotted config overrides ("decoder.d_model": 32, "objectives": {...}) applied
    # after the suite's tiny base run (the default run shrunk: shapes at 32 px, cnn, slot
    # attention, mlp, reconstruction) and after the plugin is put in the run. It holds the
    # plugin's own small sizes (random init instead of pretrained weights) and what the
    # plugin needs of the run: a decoder that reads token ids names the encoder it runs
    # with. A tokenizer names the encoder or decoder that owns it; an importer gives its
    # params as "importer.KEY". "{fixtures}" in a string is the folder of data files the
    # caller passes; a ConformanceRun value becomes an untrained run directory. None (the
    # default) is "not declared", which the suite reports; {} says the base run fits.
    conformance: ClassVar[Mapping[str, Any] | None] = None

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


class ModelPart(Plugin):
    """Base of the plugins that are parts of the trained model (encoders, groupings,
    decoders, tokenizers) or train beside it (objectives). Subclasses are torch modules too.
    """

    def connect(self, model: nn.Module) -> None:
        """Called once the whole model is composed, with that model: for a part that needs
        another part (an objective that reads the decoder, a decoder that reads the
        encoder's tokenizer). Default: nothing."""

    def param_groups(self) -> Sequence[dict[str, Any]]:
        """Optimiser parameter groups of this module's own parameters, as torch.optim takes
        them ({"params": [...], "lr": ...}); parameters listed by no group get the run's
        optimiser settings. Default: none."""
        return ()

    def set_progress(self, progress: Progress) -> None:
        """Told before every training step where training stands (step, total): for
        schedules that live inside a module (a dVAE's temperature). Default: nothing."""


class Encoder(ModelPart):
    """Base of encoder plugins: Batch -> Features."""

    kind: ClassVar[str] = "encoder"


class Grouping(ModelPart):
    """Base of grouping plugins: Features -> Slots."""

    kind: ClassVar[str] = "grouping"

    @property
    def reads_batch(self) -> bool:
        """True when forward takes the Batch as its second argument (a grouping that sizes
        itself per image, e.g. from the number of objects). Default: False."""
        return False


class Decoder(ModelPart):
    """Base of decoder plugins: (Slots, Features, Batch) -> the family output `output`."""

    kind: ClassVar[str] = "decoder"

    def sampling_protocol(self, steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
        """How `generate` samples with these settings, defaults filled in (solver, steps,
        guidance, generated resolution), for a generation metric to record beside its
        value. Default: nothing to say (a decoder that does not sample)."""
        return {}


class Objective(ModelPart):
    """Base of objective plugins: (ModelOutput, Batch) -> losses."""

    kind: ClassVar[str] = "objective"


class Dataset(Plugin):
    """Base of dataset plugins: built as `cls(params, split)`, indexable, with `collate`."""

    kind: ClassVar[str] = "dataset"

    @classmethod
    def for_evaluation(cls, params: Any, split: str) -> Any:
        """What evaluation tasks read of `split`: the split itself, unless the dataset is
        synthetic and names its real counterpart (the generated dataset: its source's real
        images)."""
        return cls(params, split)  # type: ignore[call-arg]

    @classmethod
    def wrapped_setting(cls, key: str) -> str | None:
        """For a dataset that wraps another (generated wraps coco/voc): where the wrapped
        dataset's setting `key` goes in this one's params ("name" -> the wrapped dataset's
        name key, any other key -> e.g. "source_params.KEY"). Default: None (wraps
        nothing)."""
        return None
