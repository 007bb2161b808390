"""Run configs: override parsing, validation errors that list what is allowed, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocl_bench.api.errors import ConfigError, DataError, UnknownPluginError
from ocl_bench.run.config import (
    RunConfig,
    apply_overrides,
    default_text,
    load_config,
    load_raw,
    parse_override,
    resolve,
    tomllib,
)

# The embedded default config's slot count, read from the file itself.
DEFAULT_SLOTS = tomllib.loads(default_text())["grouping"]["num_slots"]


def resolved(*overrides: str) -> RunConfig:
    return resolve(load_raw(None, list(overrides)))


# ------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.steps=200", ["train", "steps"], 200),
        ("train.lr=4e-4", ["train", "lr"], 4e-4),
        ("train.lr=0.5", ["train", "lr"], 0.5),
        ("grouping.pre_mlp=true", ["grouping", "pre_mlp"], True),
        ("grouping.pre_mlp=false", ["grouping", "pre_mlp"], False),
        ("decoder.name=spatial_broadcast", ["decoder", "name"], "spatial_broadcast"),
        ('decoder.name="mlp"', ["decoder", "name"], "mlp"),
        ("dataset.shapes=['square', 'circle']", ["dataset", "shapes"], ["square", "circle"]),
        ("a.b=[1, 2, 3]", ["a", "b"], [1, 2, 3]),
        ("seed=7", ["seed"], 7),
        # not valid TOML values: kept as the literal string
        ("train.steps=abc", ["train", "steps"], "abc"),
        ("x.y=[1,", ["x", "y"], "[1,"),
        ("x.y=1.2.3", ["x", "y"], "1.2.3"),
        ("x.y=a=b", ["x", "y"], "a=b"),
        ("x.y=", ["x", "y"], ""),
    ],
)
def test_parse_override(text: str, key: list[str], value: object) -> None:
    parts, parsed = parse_override(text)
    assert parts == key
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("text", ["train.steps", "a..b=1", ".a=1", "a.=1"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_apply_overrides_creates_nested_keys_and_leaves_input_alone() -> None:
    raw = {"train": {"steps": 1}}
    out = apply_overrides(raw, ["eval.num_images=8", "a.b.c=true", "train.steps=5"])
    assert out == {"train": {"steps": 5}, "eval": {"num_images": 8}, "a": {"b": {"c": True}}}
    assert raw == {"train": {"steps": 1}}


def test_apply_overrides_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match="'seed' is a value"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_switching_decoder_drops_old_params() -> None:
    raw = load_raw(None, ["decoder.hidden=32", "decoder.name=spatial_broadcast"])
    assert raw["decoder"] == {"name": "spatial_broadcast"}
    cfg = resolve(raw)  # 'hidden' is not a spatial_broadcast param: would fail if kept
    assert cfg.decoder.name == "spatial_broadcast"
    # params given after the switch stay
    raw = load_raw(None, ["decoder.name=mlp", "decoder.hidden=32"])
    assert raw["decoder"]["name"] == "mlp" and raw["decoder"]["hidden"] == 32
    assert resolve(raw).decoder.params.hidden == 32


def test_switching_grouping_to_same_name_keeps_params() -> None:
    raw = load_raw(None, ["grouping.name=slot_attention"])
    assert raw["grouping"]["num_slots"] == DEFAULT_SLOTS


# ------------------------------------------------------------------ resolve


def test_default_config_resolves() -> None:
    cfg = resolved()
    assert cfg.dataset.name == "shapes"
    assert cfg.encoder.name == "cnn"
    assert cfg.grouping.name == "slot_attention"
    assert cfg.grouping.params.num_slots == DEFAULT_SLOTS
    assert cfg.decoder.name == "mlp"
    assert [c.name for c in cfg.objectives] == ["reconstruction"]
    assert [c.name for c in cfg.tasks] == ["object_discovery", "property_prediction"]


def test_overrides_reach_the_params() -> None:
    cfg = resolved("grouping.num_slots=3", "train.lr=1", "decoder.target=features")
    assert cfg.grouping.params.num_slots == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.decoder.params.target == "features"


def test_unknown_top_level_key_lists_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        resolved("trian.steps=3")
    msg = str(err.value)
    assert "'trian'" in msg
    for allowed in ("seed", "dataset", "encoder", "grouping", "decoder", "train", "eval"):
        assert allowed in msg


def test_unknown_plugin_param_names_dotted_key_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        resolved("grouping.num_slotz=3")
    msg = str(err.value)
    assert "grouping.num_slotz" in msg
    assert "num_slots" in msg and "slot_dim" in msg and "iterations" in msg


def test_unknown_train_key_names_key_and_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        resolved("train.stepz=3")
    assert "train.stepz" in str(err.value)
    assert "steps" in str(err.value) and "batch_size" in str(err.value)


def test_unknown_collection_param_names_key() -> None:
    with pytest.raises(ConfigError, match=r"tasks\.object_discovery\.maskz.*masks"):
        resolved("tasks.object_discovery.maskz=['attn']")


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("grouping.num_slots=seven", "grouping.num_slots", "int"),
        ("train.lr=fast", "train.lr", "float"),
        ("grouping.num_slots=true", "grouping.num_slots", "int"),
        ("train.steps=1.5", "train.steps", "int"),
        ("grouping.pre_mlp=1", "grouping.pre_mlp", "bool"),
        ("eval.split=3", "eval.split", "str"),
        ("dataset.shapes=square", "dataset.shapes", "list"),
        ("tasks.object_discovery.masks=[1]", "tasks.object_discovery.masks[0]", "str"),
    ],
)
def test_wrong_type_names_key_and_expected_type(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolved(override)
    msg = str(err.value)
    assert key in msg
    assert f"expected {expected}" in msg or f"({expected}" in msg


def test_bad_seed_type() -> None:
    with pytest.raises(ConfigError, match="seed.*int"):
        resolved("seed=abc")


def test_literal_param_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        resolved("decoder.target=bogus")
    msg = str(err.value)
    assert "decoder.target" in msg and "'bogus'" in msg
    assert "'pixels'" in msg and "'features'" in msg
    with pytest.raises(ConfigError, match=r"train\.device.*'auto'.*'cpu'.*'cuda'"):
        resolved("train.device=tpu")


def test_unknown_plugin_name_lists_known_of_that_kind() -> None:
    with pytest.raises(UnknownPluginError) as err:
        resolved("encoder.name=resnet9000")
    msg = str(err.value)
    assert "resnet9000" in msg and "cnn" in msg
    assert "mlp" not in msg  # a decoder, not an encoder
    with pytest.raises(UnknownPluginError, match="known tasks: .*object_discovery"):
        resolved("tasks.nope.x=1")
    with pytest.raises(UnknownPluginError, match="known objectives: .*reconstruction"):
        resolved("objectives.nope.weight=1.0")


def test_missing_stage_table() -> None:
    raw = load_raw(None)
    del raw["encoder"]
    with pytest.raises(ConfigError, match=r"\[encoder\]"):
        resolve(raw)


def test_stage_without_name_lists_choices() -> None:
    raw = load_raw(None)
    del raw["decoder"]["name"]
    with pytest.raises(ConfigError) as err:
        resolve(raw)
    assert "decoder.name" in str(err.value)
    assert "mlp" in str(err.value) and "spatial_broadcast" in str(err.value)


def test_stage_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match="'encoder' must be a table"):
        resolve({**load_raw(None), "encoder": "cnn"})


# ------------------------------------------------------------------ serialisation


def test_to_toml_round_trips(tmp_path: Path) -> None:
    cfg = resolved("grouping.num_slots=3", "decoder.name=spatial_broadcast", "train.lr=1e-3")
    path = tmp_path / "run.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again.digest() == cfg.digest()
    assert again.to_dict() == cfg.to_dict()
    assert again.decoder.name == "spatial_broadcast"
    assert again.grouping.params.num_slots == 3


def test_digest_is_stable_and_changes_with_any_param() -> None:
    base = resolved()
    assert resolved().digest() == base.digest()
    same = f"grouping.num_slots={DEFAULT_SLOTS}"
    assert resolved(same).digest() == base.digest()  # same as the default
    changed = {
        resolved(o).digest()
        for o in ("grouping.num_slots=5", "train.lr=1e-3", "seed=1", "decoder.hidden=8")
    }
    assert base.digest() not in changed
    assert len(changed) == 4


def test_load_config_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(DataError, match="absent.toml"):
        load_config(path)


def test_load_config_invalid_toml_names_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[encoder\nname = 'cnn'\n")
    with pytest.raises(DataError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert "TOML" in str(err.value)


def test_load_config_binary_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(DataError, match="binary.toml"):
        load_config(path)


def test_load_config_applies_overrides_on_top_of_file(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(resolved().to_toml())
    cfg = load_config(path, ["train.steps=3"])
    assert cfg.train.steps == 3


# ------------------------------------------------------------------ param ranges


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("grouping.num_slots=0", "grouping.num_slots=0", ">= 1"),
        ("grouping.slot_dim=-100", "grouping.slot_dim=-100", ">= 1"),
        ("grouping.mlp_hidden=-100", "grouping.mlp_hidden=-100", ">= 1"),
        ("grouping.eps=0", "grouping.eps=0", "> 0"),
        ("decoder.hidden=-100", "decoder.hidden=-100", ">= 1"),
        ("train.steps=0", "train.steps=0", ">= 1"),
        ("train.steps=-5", "train.steps=-5", ">= 1"),
        ("train.lr=-0.001", "train.lr=-0.001", ">= 0"),
        ("eval.num_images=-1", "eval.num_images=-1", ">= 0"),
        ("dataset.min_size=1.5", "dataset.min_size=1.5", "(0, 1]"),
        ("dataset.min_visible=-0.1", "dataset.min_visible=-0.1", "[0, 1]"),
        ("tasks.property_prediction.iou_threshold=2", "iou_threshold=2", "[0, 1]"),
        ("objectives.reconstruction.weight=-1", "objectives.reconstruction.weight=-1", ">= 0"),
    ],
)
def test_value_outside_the_declared_range_names_key_value_and_range(
    override: str, key: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as err:
        resolved(override)
    msg = str(err.value)
    assert key in msg
    assert f"allowed: {allowed}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_is_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match="train.lr.*not a finite number"):
        resolved(f"train.lr={value}")


def test_range_boundaries_are_accepted() -> None:
    cfg = resolved(
        "grouping.num_slots=1",
        "train.steps=1",
        "train.warmup_steps=0",
        "train.lr=0",
        "dataset.min_visible=0",
        "dataset.max_size=1",
        "dataset.num_colours=1",
    )
    assert cfg.grouping.params.num_slots == 1
    assert cfg.train.steps == 1
    assert cfg.dataset.params.max_size == 1.0


def _numeric(tp: object) -> bool:
    """int or float, alone or in an Optional/Union (bool excluded: it is an int to Python)."""
    import types
    import typing

    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(tp))
    return False


def test_every_numeric_param_declares_a_range() -> None:
    import dataclasses
    import typing

    from ocl_bench.api.params import field_bounds
    from ocl_bench.run.config import EvalSettings, TrainSettings
    from ocl_bench.run.registry import registry

    owners = {"train": TrainSettings, "eval": EvalSettings}
    owners |= {f"{i.kind} {i.name}": i.cls.Params for i in registry().infos if i.cls is not None}
    missing = []
    for owner, cls in owners.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _numeric(hints[f.name]) and not field_bounds(f):
                missing.append(f"{owner}: {f.name}")
    assert not missing, f"numeric params without a range: {missing}"
    assert len(owners) > 10  # the check saw the registry, not an empty list


def test_param_refuses_a_default_outside_its_own_range() -> None:
    from ocl_bench.api.params import param

    with pytest.raises(ValueError, match="out of range"):
        param(0, "slots", ge=1)
    with pytest.raises(TypeError, match="numeric"):
        param("abc", "a name", ge=1)
    with pytest.raises(TypeError, match="one lower bound"):
        param(1, "x", ge=0, gt=0)


def test_range_is_described_for_plugins_show() -> None:
    from ocl_bench.api.params import describe, range_text
    from ocl_bench.run.registry import registry

    params = describe(registry().get("grouping", "slot_attention").Params)
    assert params["num_slots"]["range"] == ">= 1"
    assert params["num_slots"]["bounds"] == {"ge": 1}
    assert params["init"]["range"] is None
    assert range_text({"gt": 0, "le": 1}) == "(0, 1]"
    assert range_text({"ge": 0, "lt": 1}) == "[0, 1)"
    assert range_text({"le": 0.5}) == "<= 0.5"


def test_fixed_length_tuple_params_coerce_each_value_with_its_own_type() -> None:
    from ocl_bench.api.params import _coerce

    assert _coerce([1, 2.5], tuple[float, float], "p") == (1.0, 2.5)
    assert _coerce(["a", 3], tuple[str, int], "p") == ("a", 3)
    with pytest.raises(ConfigError, match=r"p\[1\]: expected int"):
        _coerce(["a", "b"], tuple[str, int], "p")
    with pytest.raises(ConfigError, match="expected 2 values"):
        _coerce([1.0], tuple[float, float], "p")
