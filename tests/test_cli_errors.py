"""Bad input through the real command: exit 2, one `ocl-bench: error:` line, no traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RUN = [
    "dataset.image_size=32",
    "dataset.train_size=16",
    "dataset.val_size=8",
    "encoder.channels=8",
    "encoder.patch_size=4",
    "grouping.num_slots=3",
    "grouping.slot_dim=16",
    "decoder.hidden=16",
    "train.steps=2",
    "train.batch_size=4",
    "train.threads=1",
]


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ocl_bench.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def user_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert the one-line error contract and that the line names every needle."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.stderr.strip() == lines[0]
    line = lines[0]
    assert line.startswith("ocl-bench: error:"), line
    assert line[len("ocl-bench: error:") :].strip()
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.returncode == 2, (result.returncode, result.stderr)
    return line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (two-step) run directory, made once; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("run")
    result = cli(root, "train", "--out", "run", *TINY_RUN, "--no-eval", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    run = root / "run"
    assert (run / "config.toml").is_file()
    assert (run / "checkpoint" / "model.safetensors").is_file()
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------ config errors


def test_unknown_plugin(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "encoder.name=resnet9000", "--no-eval", "-q")
    user_error(result, "resnet9000", "cnn")
    assert not (tmp_path / "X").exists()


def test_unknown_config_key(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "train.stepz=3", "--no-eval", "-q")
    user_error(result, "train.stepz", "steps")
    assert not (tmp_path / "X").exists()


def test_unknown_plugin_param(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "grouping.num_slotz=3", "--no-eval", "-q")
    user_error(result, "grouping.num_slotz", "num_slots")


def test_wrong_type(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "train.steps=abc", "--no-eval", "-q")
    user_error(result, "train.steps", "int", "abc")


def test_malformed_override(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "a..b=1", "--no-eval", "-q")
    user_error(result, "a..b=1")


def test_missing_config_file(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "absent.toml", "--out", "X", "--no-eval", "-q")
    user_error(result, "absent.toml")


def test_corrupt_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("[encoder\nname = 'cnn'\n")
    result = cli(tmp_path, "train", "bad.toml", "--out", "X", "--no-eval", "-q")
    user_error(result, "bad.toml", "TOML")


def test_incompatible_combination_leaves_no_run_dir(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "decoder.target=features", "--no-eval", "-q")
    user_error(result, "'mlp'", "'cnn'", "features.targets")
    # checked before anything is written: the same --out works once the config is fixed
    assert not (tmp_path / "X").exists()


def test_param_the_plugin_rejects(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "encoder.patch_size=3", "--no-eval", "-q")
    user_error(result, "patch_size", "cnn")
    assert not (tmp_path / "X").exists()


def test_zero_batch_size(tmp_path: Path) -> None:
    result = cli(tmp_path, "train", "--out", "X", "train.batch_size=0", "--no-eval", "-q")
    user_error(result, "train.batch_size")


def test_plugins_show_unknown(tmp_path: Path) -> None:
    result = cli(tmp_path, "plugins", "show", "nope")
    line = user_error(result, "'nope'", "cnn", "slot_attention", "mlp", "shapes")
    assert result.stdout == ""
    assert "known plugins" in line


# ------------------------------------------------------------------ run directories


def test_eval_on_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "notarun").mkdir()
    result = cli(tmp_path, "eval", "notarun", "-q")
    user_error(result, "notarun", "config.toml")


def test_eval_on_a_missing_directory(tmp_path: Path) -> None:
    result = cli(tmp_path, "eval", "nowhere", "-q")
    user_error(result, "nowhere")


def test_eval_on_a_run_without_checkpoint(tmp_path: Path, trained_run: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    shutil.rmtree(run / "checkpoint")
    result = cli(tmp_path, "eval", "run", "-q")
    user_error(result, "checkpoint", "train the run first")


def test_eval_on_a_corrupt_checkpoint_names_the_file(tmp_path: Path, trained_run: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(b"this is not a safetensors file \x00\xff" * 8)
    result = cli(tmp_path, "eval", "run", "-q")
    user_error(result, str(Path("run") / "checkpoint" / "model.safetensors"), "corrupt")


def test_eval_on_a_truncated_checkpoint_names_the_file(tmp_path: Path, trained_run: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    weights = run / "checkpoint" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    result = cli(tmp_path, "eval", "run", "-q")
    user_error(result, "model.safetensors", "corrupt")


def test_resume_from_a_corrupt_state_names_the_file(tmp_path: Path, trained_run: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "checkpoint" / "state.pt").write_bytes(b"garbage, not a torch file")
    overrides = [o for o in TINY_RUN if not o.startswith("train.steps")]
    result = cli(tmp_path, "train", "--out", "run", *overrides, "train.steps=3", "--no-eval", "-q")
    line = user_error(result, "state.pt", "corrupt")
    assert "weights_only` set to `False" not in line  # never advise unsafe loading


def test_eval_with_unknown_override(tmp_path: Path, trained_run: Path) -> None:
    copy_run(trained_run, tmp_path)
    result = cli(tmp_path, "eval", "run", "eval.num_imagez=3", "-q")
    user_error(result, "eval.num_imagez", "num_images")


def test_resume_with_a_different_config_names_the_key(tmp_path: Path, trained_run: Path) -> None:
    copy_run(trained_run, tmp_path)
    overrides = [o for o in TINY_RUN if not o.startswith("grouping.num_slots")]
    result = cli(tmp_path, "train", "--out", "run", *overrides, "grouping.num_slots=4", "-q")
    user_error(result, "grouping.num_slots")


# ------------------------------------------------------------------ image_folder data


def _image_folder_config(tmp_path: Path, folder: Path) -> Path:
    """A run config on the image_folder dataset (unlabelled, so no tasks) pointing at `folder`."""
    from ocl_bench.api.params import describe
    from ocl_bench.run.registry import discover

    params = describe(discover().get("dataset", "image_folder").Params)
    roots = [n for n in ("root", "path", "folder", "directory", "dir") if n in params]
    assert roots, f"image_folder has no folder param among {sorted(params)}"
    lines = ["seed = 0", "", "[dataset]", 'name = "image_folder"', f"{roots[0]} = {str(folder)!r}"]
    if "image_size" in params:
        lines.append("image_size = 32")
    lines += [
        "",
        "[encoder]",
        'name = "cnn"',
        "channels = 8",
        "patch_size = 4",
        "",
        "[grouping]",
        'name = "slot_attention"',
        "num_slots = 3",
        "slot_dim = 16",
        "",
        "[decoder]",
        'name = "mlp"',
        "hidden = 16",
        "",
        "[objectives.reconstruction]",
        "",
        "[train]",
        "steps = 1",
        "batch_size = 2",
        "threads = 1",
    ]
    path = tmp_path / "folder.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_image_folder_on_a_missing_folder_names_it(tmp_path: Path) -> None:
    folder = tmp_path / "no_such_images"
    config = _image_folder_config(tmp_path, folder)
    result = cli(tmp_path, "train", str(config), "--out", "X", "--no-eval", "-q")
    user_error(result, "no_such_images")


def test_image_folder_with_a_corrupt_image_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    config = _image_folder_config(tmp_path, folder)
    result = cli(tmp_path, "train", str(config), "--out", "X", "train.steps=2", "--no-eval", "-q")
    user_error(result, "broken.png")


# ------------------------------------------------------------------ param ranges


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("grouping.num_slots=0", ">= 1"),
        ("grouping.slot_dim=-100", ">= 1"),
        ("grouping.mlp_hidden=-100", ">= 1"),
        ("decoder.hidden=-100", ">= 1"),
        ("train.steps=0", ">= 1"),
        ("train.steps=-5", ">= 1"),
    ],
)
def test_value_outside_a_params_range_fails_before_anything_is_written(
    tmp_path: Path, override: str, allowed: str
) -> None:
    result = cli(tmp_path, "train", "--out", "X", override, "--no-eval", "-q")
    user_error(result, override, allowed)
    assert not (tmp_path / "X").exists()


def test_plugins_show_prints_each_params_range(tmp_path: Path) -> None:
    import json

    result = cli(tmp_path, "plugins", "show", "slot_attention")
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("param"))
    assert "range" in header.split()
    num_slots = next(line for line in result.stdout.splitlines() if line.startswith("num_slots"))
    assert ">= 1" in num_slots
    listing = json.loads(cli(tmp_path, "plugins", "--json").stdout)
    grouping = next(p for p in listing if p["name"] == "slot_attention")
    assert grouping["params"]["num_slots"]["range"] == ">= 1"
    assert grouping["params"]["eps"]["bounds"] == {"gt": 0}


# ------------------------------------------------------------------ results database


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _results_commands(db: str) -> list[list[str]]:
    return [
        ["results", "--db", db],
        ["leaderboard", "shapes-demo", "--db", db],
        ["leaderboard", "--list", "--db", db],
    ]


def test_a_database_of_random_bytes_is_named_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "broken.sqlite").write_bytes(os.urandom(4096))
    before = _files(tmp_path)
    for command in _results_commands("broken.sqlite"):
        user_error(cli(tmp_path, *command), "broken.sqlite", "not an SQLite file")
    assert _files(tmp_path) == before


def test_another_programs_sqlite_file_is_refused_not_extended(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "other.sqlite")
    db.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    db.commit()
    db.close()
    before = _files(tmp_path)
    for command in _results_commands("other.sqlite"):
        user_error(cli(tmp_path, *command), "other.sqlite", "not an ocl-bench results database")
    assert _files(tmp_path) == before


def _results_database(path: Path | str, cells: int) -> None:
    from ocl_bench.run.store import Cell, ResultStore

    store = ResultStore(path)
    for i in range(cells):
        cell = Cell(
            config_hash=f"h{i}",
            config={"pad": "x" * 400},
            plugins={},
            dataset="shapes",
            split="val",
            seed=0,
            status="running",
        )
        store.start(cell)
        store.complete(f"h{i}", [{"task": "t", "metric": "m", "value": float(i)}])


def test_a_truncated_database_is_named_and_left_alone(tmp_path: Path) -> None:
    import sqlite3

    _results_database(tmp_path / "full.sqlite", cells=200)
    db = sqlite3.connect(tmp_path / "full.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file
    db.close()
    data = (tmp_path / "full.sqlite").read_bytes()
    folder = tmp_path / "cut"
    folder.mkdir()
    (folder / "cut.sqlite").write_bytes(data[: len(data) // 2])
    before = _files(folder)
    for command in _results_commands("cut.sqlite"):
        user_error(cli(folder, *command), "cut.sqlite", "malformed")
    assert _files(folder) == before  # no -wal/-shm left beside it either


def test_a_damaged_row_names_the_database_and_the_cell(
    tmp_path: Path, store_db: Path | str
) -> None:
    from ocl_bench.run.store_postgres import redacted
    from tests.conftest import execute

    _results_database(store_db, cells=3)
    execute(store_db, "UPDATE cells SET config = '{not json' WHERE config_hash = 'h1'")
    named = "r.sqlite" if isinstance(store_db, Path) else redacted(store_db)
    result = cli(tmp_path, "results", "--db", str(store_db))
    user_error(result, named, "h1", "invalid JSON")


def test_a_directory_as_database_is_named(tmp_path: Path) -> None:
    (tmp_path / "dbdir").mkdir()
    user_error(cli(tmp_path, "results", "--db", "dbdir"), "dbdir", "directory")


def test_grid_on_a_broken_database_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken.sqlite").write_bytes(os.urandom(2048))
    result = cli(tmp_path, "grid", "--db", "broken.sqlite", "--runs", "runs", "-q")
    user_error(result, "broken.sqlite")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ command-line options


@pytest.mark.parametrize("workers", ["0", "-2", "two"])
def test_grid_workers_must_be_a_positive_int(tmp_path: Path, workers: str) -> None:
    result = cli(tmp_path, "grid", "--workers", workers, "--db", "r.sqlite", "-q")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --workers" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "r.sqlite").exists()


# ------------------------------------------------------------------ dataset annotations


def _dataset_config(tmp_path: Path, dataset: dict[str, object]) -> Path:
    """A tiny run config (no tasks) on `dataset`."""
    import tomli_w

    config = {
        "seed": 0,
        "dataset": {**dataset, "image_size": 32, "mask_size": 32},
        "encoder": {"name": "cnn", "channels": 8, "patch_size": 4},
        "grouping": {"name": "slot_attention", "num_slots": 3, "slot_dim": 16},
        "decoder": {"name": "mlp", "hidden": 16},
        "objectives": {"reconstruction": {}},
        "train": {"steps": 1, "batch_size": 2, "threads": 1},
    }
    path = tmp_path / "data.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@pytest.mark.parametrize(
    ("damage", "needles"),
    [
        (lambda f: f.write_text(f.read_text()[:150]), ["instances_train2017.json"]),
        (lambda f: f.write_bytes(os.urandom(512)), ["instances_train2017.json"]),
        (lambda f: f.write_text('{"images": 3}'), ["instances_train2017.json", "images"]),
        (
            lambda f: f.write_text(f.read_text().replace('"image_id"', '"imageid"')),
            ["instances_train2017.json", "annotations[0]", "image_id"],
        ),
        (
            lambda f: f.write_text(f.read_text().replace('"file_name"', '"file"')),
            ["instances_train2017.json", "images[0]", "file_name"],
        ),
    ],
    ids=["truncated", "random-bytes", "not-coco", "annotation-without-image", "image-without-file"],
)
def test_corrupt_coco_annotations_name_the_file(
    tmp_path: Path, damage: object, needles: list[str]
) -> None:
    from tests.test_coco_voc import make_coco

    root = make_coco(tmp_path / "coco", "train2017")
    damage(root / "annotations" / "instances_train2017.json")  # type: ignore[operator]
    config = _dataset_config(tmp_path, {"name": "coco", "root": str(root)})
    result = cli(tmp_path, "train", str(config), "--out", "X", "--no-eval", "-q")
    user_error(result, *needles)
    assert not (tmp_path / "X").exists()


@pytest.mark.parametrize("damaged", ["list", "label"])
def test_corrupt_voc_files_name_the_file(tmp_path: Path, damaged: str) -> None:
    from tests.test_coco_voc import VOC_IDS, make_voc

    root = make_voc(tmp_path / "voc")
    if damaged == "list":
        target = root / "ImageSets" / "Segmentation" / "train.txt"
    else:
        target = root / "SegmentationObject" / f"{VOC_IDS[0]}.png"
    target.write_bytes(b"\xff\xfe\x00" + os.urandom(300))
    config = _dataset_config(tmp_path, {"name": "voc", "root": str(tmp_path / "voc")})
    result = cli(tmp_path, "train", str(config), "--out", "X", "--no-eval", "-q")
    user_error(result, target.name)


# ------------------------------------------------------------------ run directories (more)


def test_eval_on_a_damaged_checkpoint_marker_names_it(tmp_path: Path, trained_run: Path) -> None:
    run = copy_run(trained_run, tmp_path)
    (run / "checkpoint" / "COMPLETE").write_text("not a step")
    result = cli(tmp_path, "eval", "run", "-q")
    user_error(result, str(Path("run") / "checkpoint" / "COMPLETE"), "damaged")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda text: "seed = 0\n", "missing table"),
        (lambda text: text.replace('name = "cnn"', 'name = "resnet9000"'), "resnet9000"),
        (lambda text: text.replace("num_slots = 3", "num_slots = 0"), "num_slots=0"),
    ],
    ids=["no-dataset", "unknown-plugin", "out-of-range"],
)
def test_eval_blames_a_bad_saved_config_on_its_file(
    tmp_path: Path, trained_run: Path, edit: object, needle: str
) -> None:
    run = copy_run(trained_run, tmp_path)
    config = run / "config.toml"
    config.write_text(edit(config.read_text()))  # type: ignore[operator]
    result = cli(tmp_path, "eval", "run", "-q")
    user_error(result, str(Path("run") / "config.toml"), needle)


def test_eval_on_a_file_instead_of_a_run(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    user_error(cli(tmp_path, "eval", "model.safetensors", "-q"), "not a run directory")


# ------------------------------------------------------------------ pretrained weights by path

TINY_VIT = [
    "encoder.name=dino_vits16",
    "encoder.embed_dim=32",
    "encoder.depth=2",
    "encoder.num_heads=2",
    "encoder.block=2",
    "encoder.image_size=32",
    *(o for o in TINY_RUN if not o.startswith("encoder.")),
    "train.steps=1",
]


def _weights_files(folder: Path) -> dict[str, tuple[str, str]]:
    """name -> (file, words the error must contain), each a different kind of bad file."""
    import torch
    from safetensors.torch import save_file

    (folder / "random.pth").write_bytes(os.urandom(2000))
    (folder / "random.safetensors").write_bytes(os.urandom(2000))
    save_file({"w": torch.zeros(512)}, str(folder / "full.safetensors"))
    data = (folder / "full.safetensors").read_bytes()
    (folder / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save([1, 2, 3], folder / "list.pth")
    return {
        "random-pth": ("random.pth", "weights_only"),
        "random-safetensors": ("random.safetensors", "corrupt"),
        "truncated-safetensors": ("cut.safetensors", "corrupt"),
        "not-a-state-dict": ("list.pth", "no state dict"),
        "wrong-keys": ("full.safetensors", "missing keys"),
    }


@pytest.mark.parametrize(
    "case",
    ["random-pth", "random-safetensors", "truncated-safetensors", "not-a-state-dict", "wrong-keys"],
)
def test_a_bad_weights_file_is_named(tmp_path: Path, case: str) -> None:
    name, words = _weights_files(tmp_path)[case]
    result = cli(
        tmp_path, "train", "--out", "X", *TINY_VIT, f"encoder.weights={name}", "--no-eval", "-q"
    )
    user_error(result, name, words)
    assert not (tmp_path / "X").exists()


# ------------------------------------------------------------------ grid and leaderboard files


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[axes\n", ["bad.toml", "TOML"]),
        ('name = 5\n[axes]\n"decoder.name" = ["mlp"]\n', ["bad.toml", "name is 5"]),
        ("axes = 7\n", ["bad.toml", "axes is 7"]),
        ('title = "t"\nrows = 3\n', ["bad.toml", "rows is 3"]),
        ('title = "t"\n[[rows]]\nlabel = 3\n', ["bad.toml", "rows[0].label"]),
        ('[[rows]]\nlabel = "a"\n[rows.published]\nfg_ari = "12"\n', ["published.fg_ari"]),
        ('columns = [3]\n[[rows]]\nlabel = "a"\n', ["bad.toml", "columns[0]"]),
    ],
    ids=["toml", "name", "axes", "rows", "label", "published", "columns"],
)
def test_a_malformed_grid_or_leaderboard_file_is_named(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    (tmp_path / "bad.toml").write_text(text)
    for command in (["grid", "bad.toml", "--db", "r.sqlite", "-q"], ["leaderboard", "bad.toml"]):
        user_error(cli(tmp_path, *command), *needles)
    assert not (tmp_path / "r.sqlite").exists()
