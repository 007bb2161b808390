"""Evaluation protocols (ocl_bench.run.protocol): a named bundle of dataset and task settings that a
run config names, applied when the config resolves, owning its keys, recorded in config.toml
but not hashed, and swappable on a saved run (`ocl-bench eval RUN --protocol NAME`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocl_bench.api.errors import ConfigError
from ocl_bench.run.config import apply_overrides, load_raw, resolve
from ocl_bench.run.protocol import (
    check_protocol,
    load_protocol,
    parse_protocol,
    protocol_names,
    switch_protocol,
)
from ocl_bench.run.registry import registry

STRICT = """
summary = "a strict COCO evaluation"
follows = "a test"
[coco.dataset]
mask_size = 64
crowd = "drop"
interpolation = "bilinear"
[coco.tasks.object_discovery]
mask_size = 64
background_segment = true
[voc.dataset]
mask_size = 48
"""
LOOSE = """
summary = "another COCO evaluation"
[coco.dataset]
mask_size = 32
[coco.tasks.object_discovery]
mask_size = 32
"""


@pytest.fixture
def protocols(tmp_path: Path) -> tuple[str, str]:
    strict, loose = tmp_path / "strict.toml", tmp_path / "loose.toml"
    strict.write_text(STRICT)
    loose.write_text(LOOSE)
    return str(strict), str(loose)


def _coco(protocol: str, *more: str) -> dict:
    return load_raw(None, ["dataset.name=coco", f"protocol={protocol!r}".replace("'", '"'), *more])


def test_a_protocol_sets_the_dataset_and_task_settings_of_its_dataset(protocols) -> None:
    strict, _ = protocols
    cfg = resolve(_coco(strict))
    assert cfg.protocol == strict
    assert (cfg.dataset.params.mask_size, cfg.dataset.params.crowd) == (64, "drop")
    assert cfg.dataset.params.interpolation == "bilinear"
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    assert (task.params.mask_size, task.params.background_segment) == (64, True)
    assert cfg.to_dict()["protocol"] == strict


def test_the_name_is_recorded_but_the_hash_covers_only_the_settings(protocols) -> None:
    strict, _ = protocols
    named = resolve(_coco(strict))
    spelled_out = resolve(
        load_raw(
            None,
            [
                "dataset.name=coco",
                "dataset.mask_size=64",
                'dataset.crowd="drop"',
                'dataset.interpolation="bilinear"',
                "tasks.object_discovery.mask_size=64",
                "tasks.object_discovery.background_segment=true",
            ],
        )
    )
    assert spelled_out.protocol == "" and spelled_out.to_dict()["protocol"] == ""
    assert named.digest() == spelled_out.digest()
    assert resolve(_coco("")).digest() != named.digest()


def test_a_setting_that_contradicts_the_protocol_is_refused(protocols) -> None:
    strict, _ = protocols
    with pytest.raises(ConfigError, match=r"dataset.mask_size = 320 contradicts protocol"):
        resolve(_coco(strict, "dataset.mask_size=320"))
    # the same value is no contradiction; a config saved under the protocol resolves again
    cfg = resolve(_coco(strict, "dataset.mask_size=64"))
    assert resolve(cfg.to_dict()).digest() == cfg.digest()


def test_a_dataset_the_protocol_does_not_cover_runs_under_no_protocol(protocols) -> None:
    strict, _ = protocols
    cfg = resolve(load_raw(None, [f'protocol="{strict}"', "dataset.name=shapes"]))
    assert cfg.protocol == "" and cfg.to_dict()["protocol"] == ""
    assert resolve(load_raw(None, ["dataset.name=shapes"])).digest() == cfg.digest()


def test_a_wrapping_dataset_passes_the_settings_to_the_dataset_it_wraps(protocols) -> None:
    strict, _ = protocols
    raw = load_raw("glass-coco", [f'protocol="{strict}"'])
    raw["dataset"].pop("source_params", None)
    raw["tasks"]["object_discovery"].pop("mask_size", None)
    cfg = resolve(raw)
    assert cfg.protocol == strict
    assert cfg.dataset.name == "generated"
    assert cfg.dataset.params.source_params["mask_size"] == 64
    assert cfg.dataset.params.source_params["crowd"] == "drop"


def test_switching_protocols_resets_what_the_old_one_set(protocols) -> None:
    strict, loose = protocols
    saved = resolve(_coco(strict)).to_dict()
    cfg = resolve(apply_overrides(saved, switch_protocol(saved, loose, registry())))
    assert cfg.protocol == loose
    assert cfg.dataset.params.mask_size == 32
    assert cfg.dataset.params.crowd == "keep"  # the strict protocol's, back to the default
    task = next(t for t in cfg.tasks if t.name == "object_discovery")
    assert (task.params.mask_size, task.params.background_segment) == (32, False)
    none = resolve(apply_overrides(saved, switch_protocol(saved, "", registry())))
    assert none.protocol == "" and none.dataset.params.mask_size == 320
    with pytest.raises(ConfigError, match="does not cover dataset 'shapes'"):
        shapes = resolve(load_raw(None, [])).to_dict()
        switch_protocol(shapes, strict, registry())


def test_bad_protocols_fail_in_one_line() -> None:
    with pytest.raises(ConfigError, match="unknown protocol 'nope'; known protocols"):
        load_protocol("nope")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        parse_protocol("x", 'summary = "s"\ncolour = "red"\n[coco.dataset]\nmask_size = 1\n')
    with pytest.raises(ConfigError, match="'summary'"):
        parse_protocol("x", "[coco.dataset]\nmask_size = 1\n")
    with pytest.raises(ConfigError, match="must agree"):
        parse_protocol(
            "x",
            'summary = "s"\n[coco.dataset]\nmask_size = 1\n'
            "[coco.tasks.object_discovery]\nmask_size = 2\n",
        )
    typo = parse_protocol("x", 'summary = "s"\n[coco.dataset]\nmask_sise = 1\n')
    with pytest.raises(ConfigError, match="'mask_sise' is not a param of dataset 'coco'"):
        check_protocol(typo, registry())


@pytest.mark.parametrize("name", protocol_names())
def test_every_packaged_protocol_names_real_params_and_its_evidence(name: str) -> None:
    protocol = load_protocol(name)
    check_protocol(protocol, registry())
    assert protocol.follows or all(r.follows for r in protocol.datasets.values())


def test_slate_is_slotdiffusions_evaluation_on_every_dataset_it_covers() -> None:
    # SLATE released no COCO/VOC evaluation; the SLATE numbers the boards quote are
    # SlotDiffusion's re-implementation, scored by SlotDiffusion's own loaders
    slate, slotdiffusion = load_protocol("slate"), load_protocol("slotdiffusion")
    assert set(slate.datasets) == set(slotdiffusion.datasets) == {"coco", "voc"}
    for ds, rules in slate.datasets.items():
        assert rules.dataset == slotdiffusion.datasets[ds].dataset
        assert rules.tasks == slotdiffusion.datasets[ds].tasks
