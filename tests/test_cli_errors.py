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
    from ocl_bench.params import describe
    from ocl_bench.registry import discover

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
