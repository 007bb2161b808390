"""Compose dataset, encoder, grouping and decoder plugins into one model, checked first."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ocl_bench.api.contracts import Batch, Dims, ModelOutput
from ocl_bench.api.errors import ConfigError, IncompatiblePluginsError
from ocl_bench.run.config import RunConfig

# Which stage is expected to supply a capability, by its prefix.
SUPPLIER = {
    "batch": "dataset",
    "features": "encoder",
    "slots": "grouping",
    "decoding": "decoder",
    "generation": "decoder",
}
ORDER = ("dataset", "encoder", "grouping", "decoder", "objective", "task")


def check_compatible(cfg: RunConfig) -> None:
    """Fail before training when a plugin needs something no earlier plugin provides."""
    chosen = {s: getattr(cfg, s) for s in ("dataset", "encoder", "grouping", "decoder")}
    provided: dict[str, set[str]] = {}
    plugins = list(chosen.values()) + list(cfg.objectives) + list(cfg.tasks)
    for choice in plugins:
        _, gives = choice.cls.capabilities(choice.params)
        provided[choice.kind] = provided.get(choice.kind, set()) | gives
    for choice in plugins:
        needs, _ = choice.cls.capabilities(choice.params)
        missing: dict[str, list[str]] = {}
        for need in sorted(needs):
            stage = SUPPLIER.get(need.split(".")[0])
            if stage is None:
                continue
            if need in provided.get(stage, set()):
                continue
            if ORDER.index(stage) >= ORDER.index(choice.kind):
                continue  # a plugin never waits on a later stage; not a combination problem
            missing.setdefault(stage, []).append(need)
        for stage, gaps in missing.items():  # every gap of one supplier in one message
            supplier = chosen[stage]
            raise IncompatiblePluginsError(
                f"{choice.kind} '{choice.name}' needs {', '.join(repr(n) for n in gaps)}, "
                f"which {stage} '{supplier.name}' does not provide "
                f"(it provides: {', '.join(sorted(provided.get(stage, set()))) or 'nothing'})"
            )


class SlotModel(nn.Module):
    """encoder -> grouping -> decoder, each a plugin module."""

    def __init__(self, encoder: nn.Module, grouping: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.grouping = grouping
        self.decoder = decoder

    def forward(self, batch: Batch) -> ModelOutput:
        features = self.encoder(batch)
        # a grouping that sizes itself per image (dynamic slot counts) reads the batch too
        if self.grouping.reads_batch:
            slots = self.grouping(features, batch)
        else:
            slots = self.grouping(features)
        decoding = self.decoder(slots, features, batch)
        return ModelOutput(features=features, slots=slots, decoding=decoding)


def build_model(cfg: RunConfig, image_size: tuple[int, int], channels: int = 3) -> SlotModel:
    """Instantiate the model plugins, threading the sizes each one learns through Dims."""
    check_compatible(cfg)
    dims = Dims(image_size=image_size, channels=channels)
    modules = []
    for stage in ("encoder", "grouping", "decoder"):
        choice = getattr(cfg, stage)
        try:
            module = choice.cls(choice.params, dims)
        except ValueError as err:  # plugins reject params that do not fit the data this way
            raise ConfigError(f"{stage} '{choice.name}': {err}") from None
        dims = module.output_dims(dims)
        modules.append(module)
    model = SlotModel(*modules)
    model.dims = dims  # the sizes every stage learned: what objectives that own modules read
    # A stage that needs another stage's modules beyond its typed inputs (MAGE's decoder
    # ties its head to the encoder's embeddings and re-runs the encoder while sampling)
    # receives the model once, to keep a reference that is not a submodule.
    _connect(modules, model)
    return model


def _connect(parts: Iterable[nn.Module], model: SlotModel) -> None:
    """Hand `model` to every part that defines `connect(model)`."""
    for part in parts:
        part.connect(model)


def build_objectives(cfg: RunConfig, model: SlotModel | None = None) -> nn.ModuleList:
    """The objectives of `cfg`; each with `connect(model)` is handed the model (and reads
    `model.dims`) before the optimiser exists, so modules it builds there (an auxiliary
    decoder, a prediction head) train and are checkpointed with the objectives."""
    objectives = nn.ModuleList([c.cls(c.params) for c in cfg.objectives])
    if model is not None:
        _connect(objectives, model)
    return objectives
