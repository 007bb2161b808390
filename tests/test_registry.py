"""Plugin discovery via the "ocl_bench" entry-point group, broken plugins, `ocl-bench plugins`."""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import textwrap
from pathlib import Path

import pytest

from ocl_bench.api.errors import UnknownPluginError
from ocl_bench.api.params import describe
from ocl_bench.cli import main
from ocl_bench.run import registry as registry_module
from ocl_bench.run.registry import Registry, discover

BUILTINS = {
    "shapes": "dataset",
    "image_folder": "dataset",
    "cnn": "encoder",
    "slot_attention": "grouping",
    "mlp": "decoder",
    "spatial_broadcast": "decoder",
    "reconstruction": "objective",
    "object_discovery": "task",
    "property_prediction": "task",
}


@pytest.fixture(scope="module")
def reg() -> Registry:
    return discover()


def _with_extra_entry_points(monkeypatch: pytest.MonkeyPatch, *extra: md.EntryPoint) -> None:
    """Make ocl_bench.run.registry.discover() see `extra` beside the installed entry points."""
    real = md.entry_points

    def fake(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "ocl_bench":
            found += list(extra)
        return found

    monkeypatch.setattr(registry_module.md, "entry_points", fake)


def _plugin_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


# ------------------------------------------------------------------ discovery


def test_builtins_are_registered_as_entry_points_of_the_distribution() -> None:
    eps = {ep.name: ep for ep in md.entry_points(group="ocl_bench")}
    for name in BUILTINS:
        assert name in eps, f"no 'ocl_bench' entry point named {name!r}"
        assert eps[name].dist is not None and eps[name].dist.name == "ocl-bench"


@pytest.mark.parametrize(("name", "kind"), sorted(BUILTINS.items()))
def test_builtin_plugin_is_discovered_with_kind_and_distribution(
    reg: Registry, name: str, kind: str
) -> None:
    found = reg.find(name)
    assert found, f"{name} not discovered"
    info = found[0]
    assert not info.broken, f"{name} is broken: {info.error}"
    assert info.kind == kind
    assert info.distribution == "ocl-bench"
    assert name in reg.names(kind)
    cls = reg.get(kind, name)
    assert cls.name == name and cls.kind == kind


def test_no_builtin_is_broken(reg: Registry) -> None:
    broken = {i.name: i.error for i in reg.infos if i.broken and i.name in BUILTINS}
    assert broken == {}


def test_unknown_plugin_name_lists_known_names_of_that_kind(reg: Registry) -> None:
    with pytest.raises(UnknownPluginError) as err:
        reg.get("decoder", "no_such_decoder")
    msg = str(err.value)
    assert "no_such_decoder" in msg
    assert "mlp" in msg and "spatial_broadcast" in msg
    # only names of that kind are listed
    assert "cnn" not in msg and "slot_attention" not in msg


def test_unknown_plugin_of_another_kind_is_unknown(reg: Registry) -> None:
    # 'cnn' exists, but as an encoder, not a decoder
    with pytest.raises(UnknownPluginError, match="known decoders: .*mlp"):
        reg.get("decoder", "cnn")


# ------------------------------------------------------------------ broken plugins


def test_missing_module_is_reported_broken_and_the_rest_still_resolves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ghost = md.EntryPoint(name="ghost", value="no_such_module_xyz", group="ocl_bench")
    _with_extra_entry_points(monkeypatch, ghost)
    reg = discover()
    broken = [i for i in reg.infos if i.name == "ghost"]
    assert len(broken) == 1
    assert broken[0].broken and broken[0].cls is None
    assert "ModuleNotFoundError" in broken[0].error
    assert "no_such_module_xyz" in broken[0].error
    # the real plugins are unaffected
    assert reg.get("encoder", "cnn").name == "cnn"
    assert {"mlp", "spatial_broadcast"} <= set(reg.names("decoder"))
    # and asking for the broken one says why
    with pytest.raises(UnknownPluginError, match="broken.*ModuleNotFoundError"):
        reg.get("encoder", "ghost")


def test_broken_plugin_shows_in_plugins_listing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ghost = md.EntryPoint(name="ghost", value="no_such_module_xyz", group="ocl_bench")
    _with_extra_entry_points(monkeypatch, ghost)
    monkeypatch.setattr("ocl_bench.run.registry.registry", discover)
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ghost"]["broken"] is True
    assert "ModuleNotFoundError" in rows["ghost"]["error"]
    assert rows["cnn"]["broken"] is False


def test_class_without_params_or_kind_is_reported_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plugin_module(
        tmp_path,
        monkeypatch,
        "ocl_bench_test_bad_class",
        """
        class NoKind:
            name = "no_kind"

        class BadKind:
            name = "bad_kind"
            kind = "sandwich"
            from dataclasses import dataclass as _dc

            @_dc
            class Params:
                x: int = 1

        def ocl_bench_plugins():
            return [NoKind, BadKind]
        """,
    )
    ep = md.EntryPoint(name="badclass", value="ocl_bench_test_bad_class", group="ocl_bench")
    _with_extra_entry_points(monkeypatch, ep)
    reg = discover()
    no_kind = [i for i in reg.infos if i.name == "no_kind"]
    assert len(no_kind) == 1 and no_kind[0].broken
    assert "kind" in no_kind[0].error and "Params" in no_kind[0].error
    bad_kind = [i for i in reg.infos if i.name == "bad_kind"]
    assert len(bad_kind) == 1 and bad_kind[0].broken
    assert "sandwich" in bad_kind[0].error
    assert reg.get("grouping", "slot_attention").name == "slot_attention"


def test_module_without_hook_is_reported_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plugin_module(tmp_path, monkeypatch, "ocl_bench_test_no_hook", "X = 1\n")
    ep = md.EntryPoint(name="nohook", value="ocl_bench_test_no_hook", group="ocl_bench")
    _with_extra_entry_points(monkeypatch, ep)
    reg = discover()
    info = [i for i in reg.infos if i.name == "nohook"]
    assert len(info) == 1 and info[0].broken
    assert "ocl_bench_plugins" in info[0].error


def test_module_raising_on_import_is_reported_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _plugin_module(
        tmp_path, monkeypatch, "ocl_bench_test_raises", "raise RuntimeError('boom at import')\n"
    )
    ep = md.EntryPoint(name="raises", value="ocl_bench_test_raises", group="ocl_bench")
    _with_extra_entry_points(monkeypatch, ep)
    reg = discover()
    info = [i for i in reg.infos if i.name == "raises"]
    assert len(info) == 1 and info[0].broken
    assert "RuntimeError" in info[0].error and "boom at import" in info[0].error
    # the rest of the registry is intact
    tasks = {"object_discovery", "property_prediction", "conditional_generation"}
    assert tasks <= set(reg.names("task"))


# ------------------------------------------------------------------ the CLI


def test_plugins_json_lists_every_plugin_with_typed_documented_params(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list)
    by_name = {r["name"]: r for r in rows}
    assert set(BUILTINS) <= set(by_name)
    for row in rows:
        assert {"kind", "name", "distribution", "params"} <= set(row)
        assert isinstance(row["params"], dict)
        for pname, spec in row["params"].items():
            assert set(spec) >= {"type", "default", "doc"}, (row["name"], pname)
            assert isinstance(spec["doc"], str) and spec["doc"].strip(), (
                f"{row['kind']} {row['name']}: param {pname!r} has no doc"
            )
    for name, kind in BUILTINS.items():
        assert by_name[name]["kind"] == kind
        assert by_name[name]["distribution"] == "ocl-bench"
    sa = by_name["slot_attention"]["params"]
    assert sa["num_slots"]["type"] == "int"
    assert sa["num_slots"]["default"] == 7
    assert sa["eps"]["type"] == "float"
    assert by_name["cnn"]["params"]["patch_size"]["default"] == 2


def test_plugins_table_names_every_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["kind", "name", "distribution"]
    for name, kind in BUILTINS.items():
        row = [line for line in lines if line.split()[1:2] == [name]]
        assert row, f"{name} missing from the table"
        assert row[0].split()[0] == kind
        assert "ocl-bench" in row[0]


def test_plugins_show_prints_each_param_with_its_default(
    capsys: pytest.CaptureFixture[str], reg: Registry
) -> None:
    assert main(["plugins", "show", "slot_attention"]) == 0
    out = capsys.readouterr().out
    assert "grouping" in out and "slot_attention" in out
    lines = out.splitlines()
    params = describe(reg.get("grouping", "slot_attention").Params)
    assert {"num_slots", "slot_dim", "iterations", "eps"} <= set(params)
    for pname, spec in params.items():
        row = [line for line in lines if line.split()[:1] == [pname]]
        assert row, f"param {pname} not shown"
        assert json.dumps(spec["default"]) in row[0], (pname, row[0])
        assert spec["doc"].split()[0] in row[0]


def test_plugins_show_unknown_exits_2_listing_known_plugins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plugins", "show", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("ocl-bench: error:")
    assert "'nope'" in lines[0]
    for name in BUILTINS:
        assert name in lines[0]
