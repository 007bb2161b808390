"""GLASS Tables 6, 7 and 2 run as grids from one command each, at tiny scale on shapes.

One module-scoped run fills one results database with the three tables (the rows they
share, StableLSD and GLASS†, are stored once and found by the later tables); the tests
read what the stored runs did: which losses they logged, which slot initialisation and
training data they used, and what the leaderboards show for them. Rows whose prompts come
from BLIP-2 captions (GLASS, DINOSAUR-Caption) have no weights here: their cells fail with
the one-line reason and the rest of the grid runs.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ocl_bench.cli import main
from ocl_bench.datasets.generated.dataset import recipe_of
from ocl_bench.run.config import resolve
from ocl_bench.run.grid import load_grid
from ocl_bench.run.registry import registry
from ocl_bench.run.store import ResultStore
from tests.test_leaderboard_runs import GLASS

# The GLASS rows' tiny overrides without the one that turns BLIP-2 captions into class
# names: each row keeps its own prompt source, so GLASS is GLASS here, not GLASS† again.
TINY_GLASS = [o for o in GLASS if not o.startswith("dataset.captions")]
BOARDS = ("glass-table-6", "glass-table-7", "glass-table-2")
BLIP2_REASON = "DataError: captions='blip2' needs BLIP-2 weights"
BLIP2_ROWS = {"GLASS (ours)", "DINOSAUR-Caption (ours)"}


@dataclass
class Ran:
    exit_code: int
    output: str  # the grid command's stdout and stderr
    board: dict[str, Any]  # `ocl-bench leaderboard NAME ... --format json`

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["label"]: r for r in self.board["rows"]}


@dataclass
class Tables:
    ran: dict[str, Ran]
    store: ResultStore
    cache: Path

    def cell(self, board: str, label: str) -> Any:
        """The stored cell of a grid cell label ("StableLSD [coco as shapes]")."""
        with redirect_stderr(io.StringIO()):  # load_grid repeats the not-applied notes
            grid = load_grid(board, TINY_GLASS)
        (cell,) = [c for c in grid.cells if c.label == label]
        stored = self.store.get(cell.config.digest())
        assert stored is not None, label
        return stored


def log(cell: Any) -> list[dict[str, Any]]:
    lines = (Path(cell.run_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Tables:
    tmp = tmp_path_factory.mktemp("glass-tables")
    db, runs = tmp / "r.sqlite", tmp / "runs"
    ran = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OCL_BENCH_CACHE", str(tmp / "cache"))  # the generated sets are built here
        env.delenv("OCL_BENCH_BLIP2", raising=False)
        env.setenv("HF_HUB_CACHE", str(tmp / "hf"))  # no BLIP-2 from a developer's cache
        for name in BOARDS:
            out = io.StringIO()
            with redirect_stdout(out), redirect_stderr(out):
                code = main(["grid", name, *TINY_GLASS, "--db", str(db), "--runs", str(runs), "-q"])
            board = io.StringIO()
            with redirect_stdout(board), redirect_stderr(io.StringIO()):
                assert (
                    main(["leaderboard", name, *TINY_GLASS, "--db", str(db), "--format", "json"])
                    == 0
                )
            ran[name] = Ran(code, out.getvalue(), json.loads(board.getvalue()))
    return Tables(ran, ResultStore(db), tmp / "cache")


def assert_measured_in_range(ran: Ran, skip: set[str]) -> None:
    keys = [c["key"] for c in ran.board["columns"]]
    buildable = [
        r for r in ran.board["rows"] if r["missing"] != "no ocl-bench recipe (published only)"
    ]
    assert buildable
    for row in buildable:
        if row["label"] in skip:
            continue
        assert row["missing"] is None, (row["label"], row["missing"])
        for key in keys:
            value = row["measured"][key]
            assert value is not None and 0 <= value <= 100, (row["label"], key, value)


def test_table_6_runs_from_one_command_and_lands_in_its_leaderboard(tables) -> None:
    ran = tables.ran["glass-table-6"]
    assert ran.exit_code == 1  # the BLIP-2 cells failed; every other cell completed
    statuses = [line.split(None, 1) for line in ran.output.splitlines() if line.startswith("  ")]
    done = {label for status, label in statuses if status == "complete"}
    assert done == {
        "StableLSD [coco as shapes]",  # COCO and VOC are one config on shapes: one cell
        "StableLSD-Mask [coco as shapes]",
        "StableLSD-Box [coco as shapes]",
        "StableLSD-Bbox Init [coco as shapes]",
        "GLASS† (ours) [coco as generated]",
        "GLASS† (ours) [voc as generated]",
    }
    assert_measured_in_range(ran, BLIP2_ROWS)
    assert ran.board["measured_with"] == TINY_GLASS


def test_blip2_rows_fail_with_the_one_line_reason_and_say_so_in_the_board(tables) -> None:
    for name, label in (
        ("glass-table-6", "GLASS (ours)"),
        ("glass-table-7", "DINOSAUR-Caption (ours)"),
    ):
        ran = tables.ran[name]
        lines = ran.output.splitlines()
        for ds in ("coco", "voc"):
            at = lines.index(f"  failed               {label} [{ds} as generated]")
            assert lines[at + 1].strip().startswith(BLIP2_REASON), lines[at + 1]
            assert "Traceback" not in ran.output
        row = ran.rows[label]
        assert row["missing"].startswith(f"failed: {BLIP2_REASON}")
        assert all(v is None for v in row["measured"].values())


def test_table_6_rows_differ_in_what_their_runs_did(tables) -> None:
    cell = {
        label: tables.cell("glass-table-6", f"{label} [coco as shapes]")
        for label in ("StableLSD", "StableLSD-Mask", "StableLSD-Box", "StableLSD-Bbox Init")
    }
    logs = {label: log(c) for label, c in cell.items()}
    # StableLSD and Bbox Init train on denoising alone; Mask and Box add the guidance loss
    for label in ("StableLSD", "StableLSD-Bbox Init"):
        assert all("glass_guidance" not in line for line in logs[label])
        assert "glass_guidance" not in cell[label].config["objectives"]
    sources = {}
    for label in ("StableLSD-Mask", "StableLSD-Box"):
        assert all("glass_guidance" in line for line in logs[label])
        assert any(line["glass_guidance"] > 0 for line in logs[label])
        sources[label] = cell[label].config["objectives"]["glass_guidance"]["source"]
    assert sources == {"StableLSD-Mask": "gt_masks", "StableLSD-Box": "gt_boxes"}
    # Same seed, data and Gaussian slots: step 1's denoising loss is the same for StableLSD,
    # -Mask and -Box, so their different guidance values come from different targets
    first = {label: lines[0] for label, lines in logs.items()}
    plain = first["StableLSD"]["denoising"]
    assert first["StableLSD-Mask"]["denoising"] == first["StableLSD-Box"]["denoising"] == plain
    mask_g = [line["glass_guidance"] for line in logs["StableLSD-Mask"]]
    box_g = [line["glass_guidance"] for line in logs["StableLSD-Box"]]
    assert mask_g != box_g
    # Bbox Init's slots start from its box MLP: a different first denoising loss, MLP trained
    init = cell["StableLSD-Bbox Init"]
    assert init.config["grouping"]["init"] == "boxes"
    assert first["StableLSD-Bbox Init"]["denoising"] != plain
    weights = load_file(str(Path(init.run_dir) / "checkpoint" / "model.safetensors"))
    assert {k for k in weights if "box_mlp" in k} == {
        f"grouping.box_mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    assert not any(
        "box_mlp" in k
        for k in load_file(
            str(Path(cell["StableLSD"].run_dir) / "checkpoint" / "model.safetensors")
        )
    )


def generated_prompts(tables: Tables, cell: Any) -> list[dict[str, Any]]:
    """The metadata of the generated images a cell trained on."""
    cfg = resolve(cell.config)
    root = tables.cache / "generated" / recipe_of(cfg.dataset.params).digest()
    return [json.loads(p.read_text()) for p in sorted((root / "meta").glob("*.json"))]


def test_glass_dagger_cells_train_on_generated_images_prompted_by_class_names(tables) -> None:
    names = set(registry().get("dataset", "shapes")(split="val").class_names)
    for ds, slots in (("coco", 7), ("voc", 6)):
        cell = tables.cell("glass-table-6", f"GLASS† (ours) [{ds} as generated]")
        dataset = cell.config["dataset"]
        assert (dataset["name"], dataset["source"], dataset["captions"]) == (
            "generated",
            "shapes",
            "class_names",
        )
        assert cell.config["grouping"]["num_slots"] == slots
        assert cell.config["objectives"]["glass_guidance"]["source"] == "pseudo_masks"
        assert all(line["glass_guidance"] > 0 for line in log(cell))
        metas = generated_prompts(tables, cell)
        assert len(metas) == dataset["train_size"] == 8
        for meta in metas:
            # GLASS†: the prompt is the image's ground-truth class names and nothing else
            assert meta["caption"] == "" and meta["classes"]
            assert set(meta["classes"]) <= names
            assert meta["prompt"] == ", ".join(meta["classes"])


def test_table_7_dinosaur_label_is_guided_on_generated_images(tables) -> None:
    ran = tables.ran["glass-table-7"]
    assert ran.exit_code == 1
    assert_measured_in_range(ran, BLIP2_ROWS)
    plain = tables.cell("glass-table-7", "DINOSAUR-MLP [coco as shapes]")
    assert all("glass_guidance" not in line for line in log(plain))
    assert plain.config["dataset"]["name"] == "shapes"
    for ds in ("coco", "voc"):
        label = tables.cell("glass-table-7", f"DINOSAUR-Label (ours) [{ds} as generated]")
        assert label.config["decoder"]["name"] == plain.config["decoder"]["name"] == "mlp"
        assert label.config["dataset"]["captions"] == "class_names"
        lines = log(label)
        assert all(line["glass_guidance"] > 0 and line["reconstruction"] > 0 for line in lines)
        assert all(m["prompt"] == ", ".join(m["classes"]) for m in generated_prompts(tables, label))


def test_table_2_glass_dagger_row_is_table_6s_run(tables) -> None:
    ran = tables.ran["glass-table-2"]
    assert ran.exit_code == 1
    # rows both tables have are stored once: table 2 finds table 6's (and 7's) runs
    for label in (
        "StableLSD [coco as shapes]",
        "GLASS† (ours) [coco as generated]",
        "GLASS† (ours) [voc as generated]",
        "DINOSAUR-MLP [coco as shapes]",
    ):
        assert f"  complete (stored)    {label}" in ran.output.splitlines()
    assert_measured_in_range(ran, {"GLASS (ours)"})
    six = tables.ran["glass-table-6"].rows["GLASS† (ours)"]
    two = ran.rows["GLASS† (ours)"]
    assert two["config_hashes"] == six["config_hashes"]
    # Table 2 reads the slot-attention masks (Sec. 5.1), Table 6 the decoder's
    assert {c["masks"] for c in ran.board["columns"]} == {"attn"}
    cell = tables.cell("glass-table-2", "GLASS† (ours) [voc as generated]")
    attn = cell.value("object_discovery", "miou_c", "attn")
    assert two["measured"]["miou_c_voc"] == pytest.approx(100 * attn)
    assert torch.isfinite(torch.tensor(attn))
