"""The GPU benchmarks' code on the CPU at tiny sizes, so that it cannot rot without a GPU.

tests/benchmarks/run_gpu_benchmarks.py --tiny trains every family's CPU stand-in for a few
steps through the same path the paper-size GPU run takes (preset + overrides, the trainer,
its train log, the JSON file); here its file is checked field by field, `--compare` is
checked on two files (this script's and pytest-benchmark's), and the pytest benchmarks are
checked to carry the skip that names CUDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.benchmarks import test_bench_gpu_steps
from tests.benchmarks.run_gpu_benchmarks import (
    CUDA_SKIP,
    FAMILIES,
    SCHEMA,
    TINY_STEPS,
    compare,
    load_figures,
    main,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    """(the file, its contents, the work directory) of every family's tiny stand-in on the
    CPU, written by the script."""
    tmp = tmp_path_factory.mktemp("gpu-bench")
    out, work = tmp / "tiny.json", tmp / "work"
    args = ["--tiny", "--device", "cpu", "--out", str(out), "--workdir", str(work)]
    assert main([*args, "--stop-on-error"]) == 0
    return out, json.loads(out.read_text()), work


def test_the_tiny_run_writes_every_family_with_sane_figures(
    tiny_run: tuple[Path, dict[str, Any], Path],
) -> None:
    _, data, work = tiny_run
    assert data["schema"] == SCHEMA and data["settings"]["tiny"] is True
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert {"cuda", "cudnn", "python", "commit"} <= set(env)
    assert "shapes" in data["data"]
    assert list(data["families"]) == list(FAMILIES)
    for name, record in data["families"].items():
        family = FAMILIES[name]
        assert record["status"] == "ok", record
        assert record["preset"] == family.preset and record["tiny"] is True
        assert record["image_size"] == family.tiny_image_size and record["batch_size"] == 2
        assert math.isfinite(record["images_per_s"]) and record["images_per_s"] > 0
        assert 0.0 <= record["data_wait"] <= 1.0
        assert 0 < record["step_s_min"] <= record["step_s_median"]
        assert record["steps_timed"] == TINY_STEPS and math.isfinite(record["loss"])
        # mixed-precision recipes take bf16 (fp16 autocast needs CUDA), the others fp32
        assert record["precision"] == ("bf16" if family.mixed else "fp32")
        assert record["peak_memory_bytes"] is None  # CUDA's counter only
        # the temporary work directory is named by a placeholder, not by its path
        assert not any(str(work) in o for o in record["overrides"])
    teacher = "objectives.spot_self_training.teacher=$WORK/teacher-tiny"
    assert teacher in data["families"]["mage"]["overrides"]


def test_compare_prints_per_family_ratios_of_either_format(
    tiny_run: tuple[Path, dict[str, Any], Path], tmp_path: Path
) -> None:
    path, data, _ = tiny_run
    faster = json.loads(json.dumps(data))
    for record in faster["families"].values():
        record["images_per_s"] *= 2
    faster["families"]["slate"] = {"family": "slate", "status": "error", "error": "OOM"}
    faster_path = tmp_path / "faster.json"
    faster_path.write_text(json.dumps(faster))
    lines = compare(path, faster_path).splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(FAMILIES)
    for name in FAMILIES:
        assert ("2.00x" in rows[name]) == (name != "slate"), rows[name]
    assert "error" in rows["slate"]
    # pytest-benchmark's --benchmark-json output keeps the records in extra_info
    bench = {
        "benchmarks": [
            {"extra_info": {**r, "environment": data["environment"]}}
            for r in data["families"].values()
        ]
    }
    bench_path = tmp_path / "pytest.json"
    bench_path.write_text(json.dumps(bench))
    env, records = load_figures(bench_path)
    assert env == data["environment"] and records.keys() == data["families"].keys()
    assert all(line.split()[3] == "1.00x" for line in compare(bench_path, path).splitlines()[1:])


def test_the_paper_size_benchmarks_skip_without_cuda_naming_it() -> None:
    # The module-wide skipif mark (a pytest run of that file with --benchmark-enable on this
    # machine reports its 7 tests skipped with this reason; a subprocess to show it again
    # would double this file's time).
    mark = test_bench_gpu_steps.pytestmark.mark
    assert mark.name == "skipif" and mark.args == (not torch.cuda.is_available(),)
    assert mark.kwargs["reason"] == CUDA_SKIP and "needs a CUDA GPU" in CUDA_SKIP
