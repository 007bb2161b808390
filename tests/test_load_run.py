"""`ocl_bench.load_run`: the model alone (as before), or with the run's resolved config, its
objectives (with their saved state) and its tasks, rebuilt as the run had them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ocl_bench
from ocl_bench.api.contracts import Progress
from ocl_bench.run.compose import SlotModel, build_model, build_objectives
from ocl_bench.run.config import load_config, load_raw, resolve
from ocl_bench.run.train import train
from tests.test_thesis_stages import AUX, TINY_STAGE2, images

TRAIN = [
    "dataset.name=shapes",
    "dataset.train_size=4",
    "dataset.val_size=2",
    "train.steps=2",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.device=cpu",
    "train.threads=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[object, Path]:
    """A 2-step stage-2 run whose objectives carry state (an auxiliary SPOT decoder) and
    whose objective and task params are not their defaults."""
    raw = load_raw(None, [*TINY_STAGE2, *TRAIN])
    raw["objectives"] = {
        "token_cross_entropy": {"label_smoothing": 0.3},
        "auxiliary_decoder": {**AUX, "weight": 0.25},
    }
    raw["tasks"] = {"object_discovery": {"masks": ["attn"], "mask_size": 8}}
    cfg = resolve(raw)
    run = tmp_path_factory.mktemp("runs") / "stage2"
    assert train(cfg, run, progress=False).step == 2
    return cfg, run


def test_load_run_alone_still_returns_the_model(trained) -> None:
    _, run = trained
    model = ocl_bench.load_run(str(run))
    assert isinstance(model, SlotModel)
    loaded = ocl_bench.load_run(run, with_config=True)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_config_objectives_and_tasks_are_the_runs(trained) -> None:
    cfg, run = trained
    loaded = ocl_bench.load_run(run, with_config=True)
    assert isinstance(loaded, ocl_bench.LoadedRun) and loaded.step == 2
    assert loaded.config.digest() == cfg.digest()
    assert [(c.name, c.params) for c in loaded.config.objectives] == [
        (c.name, c.params) for c in cfg.objectives
    ]
    objectives = loaded.objectives()
    assert [type(o) for o in objectives] == [c.cls for c in cfg.objectives]
    assert objectives[0].params.label_smoothing == 0.3 and objectives[1].params.weight == 0.25
    # the auxiliary decoder comes back trained, as the run saved it, not freshly built
    saved = torch.load(loaded.checkpoint_dir / "state.pt", weights_only=True)["objectives"]
    rebuilt = objectives.state_dict()
    assert set(rebuilt) == set(saved) and any(k.startswith("1.decoder.") for k in saved)
    for key, value in saved.items():
        assert torch.equal(rebuilt[key], value), key
    torch.manual_seed(0)
    fresh = build_objectives(cfg, build_model(cfg, (16, 16))).state_dict()
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved if k.startswith("1.decoder."))
    # and they score the loaded model
    batch = images()
    out = loaded.model.eval()(batch)
    terms = {}
    for objective in objectives:
        terms.update(objective(out, batch, Progress(0, 1)))
    assert set(terms) == {"token_cross_entropy", "auxiliary_reconstruction"}

    tasks = loaded.tasks()
    assert [(t.name, t.params) for t in tasks] == [(c.name, c.params) for c in cfg.tasks]
    assert tasks[0].params.masks == ["attn"] and tasks[0].params.mask_size == 8


def test_overrides_apply_on_top_of_the_runs_config(trained) -> None:
    cfg, run = trained
    loaded = ocl_bench.load_run(run, ["eval.batch_size=3"], with_config=True)
    assert loaded.config.eval.batch_size == 3
    assert loaded.config.objectives == load_config(run / "config.toml").objectives
