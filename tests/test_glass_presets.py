"""The glass-coco / glass-voc presets: GLASS appendix Table 5, and the GLASS rows of the tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ocl_bench
from ocl_bench.run.boards import load_grid
from ocl_bench.run.config import load_config


@pytest.mark.parametrize(("dataset", "slots", "steps"), [("coco", 7, 500_000), ("voc", 6, 250_000)])
def test_the_presets_hold_glass_table_5(dataset: str, slots: int, steps: int) -> None:
    cfg = load_config(f"glass-{dataset}")
    g, t = cfg.grouping.params, cfg.train
    assert cfg.encoder.name == "dinov2_vitb14" and cfg.encoder.params.finetune_from == -1
    assert (g.num_slots, g.iterations, g.slot_dim) == (slots, 3, 768)
    assert (t.batch_size, t.lr, t.weight_decay, t.precision, t.steps) == (
        32,
        2e-5,
        0.0,
        "fp16",
        steps,
    )
    assert (t.warmup_steps, t.decay_half_life) == (0, 0)  # a constant learning rate
    assert cfg.decoder.name == "latent_diffusion" and not cfg.decoder.params.train_unet
    # one Stable Diffusion generates the images and decodes the slots
    assert cfg.decoder.params.model_id == cfg.dataset.params.model_id
    assert (cfg.dataset.name, cfg.dataset.params.source) == ("generated", dataset)
    assert cfg.dataset.params.captions == "blip2"
    assert [o.name for o in cfg.objectives] == ["denoising", "glass_guidance"]


@pytest.mark.parametrize("table", ["glass-table-2", "glass-table-3", "glass-table-6"])
def test_the_glass_rows_of_a_table_are_the_presets(table: str) -> None:
    # The rows spell their settings out as overrides of stablelsd; a preset that drifted
    # from them would train something the tables do not report.
    cells = [c for c in load_grid(table).cells if c.label.startswith("GLASS")]
    assert len(cells) == 4  # GLASS and GLASS†, on COCO and VOC
    for cell in cells:
        dataset = "coco" if "[coco" in cell.label else "voc"
        dagger = ["dataset.captions=class_names"] if "†" in cell.label else []
        assert load_config(f"glass-{dataset}", dagger).digest() == cell.config.digest(), cell.label


@pytest.mark.parametrize("name", ["glass-coco", "glass-voc"])
def test_every_value_names_its_source(name: str) -> None:
    text = (Path(ocl_bench.__file__).parent / "configs" / "presets" / f"{name}.toml").read_text()
    assert text.startswith("# ")  # the summary `ocl-bench presets` prints
    for line in text.splitlines():
        if re.match(r"^\w+ = ", line):
            assert "#" in line, f"{name}: no source comment on '{line}'"


@pytest.mark.parametrize(
    "table",
    [
        "glass-table-2",
        "glass-table-3",
        "glass-table-6",
        "glass-table-7",
        "glass-fig-4a",
        "glass-fig-4a-slots",
    ],
)
def test_rows_glass_evaluated_count_the_background_and_rows_from_77_do_not(table: str) -> None:
    # GLASS's eval_metrics.py scores the background as a segment; SA, SLATE and SlotDiffusion
    # are Table 3's '*' rows, "numbers taken from [77]", evaluated by SlotDiffusion's code
    taken = ("SA ", "SLATE ", "SlotDiffusion ", "@slotdiffusion")
    cells = load_grid(table).cells
    assert cells
    for cell in cells:
        (task,) = [t for t in cell.config.tasks if t.name == "object_discovery"]
        counted = task.params.background_segment
        assert counted == (not cell.label.startswith(taken)), cell.label
