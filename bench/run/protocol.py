"""Evaluation protocols: the named bundles of settings that decide what a number means.

A protocol (`protocols/<name>.toml`, installed as `ocl_bench.protocols`) holds, per dataset
plugin it covers, the dataset params (geometry: resize library and rule, long-side rounding,
crop rule, mask size and interpolation; annotation handling: crowd, overlap painting, ignore)
and the task params (what is scored: background as a segment, class masks, mask size) that
make ocl-bench's evaluation equal one official pipeline. A run config names it with a
top-level `protocol = "<name>"`; when the config resolves, the protocol's settings for the
run's evaluated dataset are applied. A protocol owns those keys: a config that sets one to
another value is refused, so a number stored under a protocol's name was measured under
exactly its settings.

The evaluated dataset is `dataset.name`, or for a dataset built from another one (a plugin
with a classmethod `wrapped_setting`, e.g. `generated`) the one it wraps, whose params the
protocol's dataset settings then reach. A run on a dataset the protocol does not cover (the
tiny `shapes` runs of a COCO row) is evaluated under no protocol, and says so.

The protocol's name is recorded in the run's config.toml but is not part of the config hash:
the hash covers the settings the protocol expands to, so a row whose settings did not change
when it was given a protocol keeps its stored results.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import ConfigError, UnknownPluginError
from ocl_bench.run.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# What a protocol file may hold at the top and in each dataset table.
_TOP_KEYS = {"summary": str, "follows": str, "test": str}
_DATASET_KEYS = {"follows": str, "dataset": dict, "tasks": dict}


@dataclass(frozen=True)
class DatasetRules:
    """A protocol's settings for one dataset plugin."""

    dataset: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    follows: str = ""

    def settings(self, dataset_prefix: str, tasks: list[str]) -> dict[str, Any]:
        """Dotted key -> value for a config whose evaluated dataset's params sit under
        `dataset_prefix` and which runs `tasks` (a task it does not run is not scored, so
        its settings do not apply)."""
        out = {f"{dataset_prefix}.{k}": v for k, v in self.dataset.items()}
        for task, values in self.tasks.items():
            if task in tasks:
                out.update({f"tasks.{task}.{k}": v for k, v in values.items()})
        return out


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    follows: str
    test: str
    datasets: dict[str, DatasetRules]

    def describe(self, dataset: str | None = None) -> str:
        """One line: the summary, and what it follows (for `dataset` when it says more)."""
        rules = self.datasets.get(dataset or "")
        follows = rules.follows if rules is not None and rules.follows else self.follows
        return f"{self.name}: {self.summary}" + (f" (follows {follows})" if follows else "")


def _folder() -> Any:
    return resources.files("ocl_bench.protocols")


def protocol_names() -> list[str]:
    """The packaged protocols (protocols/*.toml), by name."""
    folder = _folder()
    if not folder.is_dir():
        return []
    return sorted(f.name[: -len(".toml")] for f in folder.iterdir() if f.name.endswith(".toml"))


def _check(table: dict[str, Any], allowed: dict[str, type], where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}'; allowed: {', '.join(allowed)}")
        if not isinstance(value, allowed[key]):
            raise ConfigError(f"{where}: '{key}' must be a {allowed[key].__name__}")


def parse_protocol(name: str, text: str) -> Protocol:
    """A protocol from its TOML text; a malformed file fails in one line naming the key."""
    where = f"protocol '{name}'"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from None
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    _check(top, _TOP_KEYS, where)
    if not isinstance(data.get("summary"), str) or not data["summary"]:
        raise ConfigError(f"{where}: 'summary' (one line: whose evaluation this is) is required")
    datasets = {}
    for ds, table in data.items():
        if not isinstance(table, dict):
            continue
        _check(table, _DATASET_KEYS, f"{where} [{ds}]")
        tasks = table.get("tasks", {})
        for task, values in tasks.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{where} [{ds}.tasks]: '{task}' must be a table of params")
        datasets[ds] = DatasetRules(
            dict(table.get("dataset", {})),
            {t: dict(v) for t, v in tasks.items()},
            table.get("follows", ""),
        )
        _check_agreement(datasets[ds], f"{where} [{ds}]")
    if not datasets:
        raise ConfigError(f"{where}: no dataset table (e.g. [coco.dataset])")
    return Protocol(name, data["summary"], data.get("follows", ""), data.get("test", ""), datasets)


def _check_agreement(rules: DatasetRules, where: str) -> None:
    """A key set on both the dataset and a task (mask_size) must have one value: the task
    scores at the resolution the dataset delivers."""
    for task, values in rules.tasks.items():
        for key, value in values.items():
            if key in rules.dataset and rules.dataset[key] != value:
                raise ConfigError(
                    f"{where}: dataset.{key} = {rules.dataset[key]!r} but tasks.{task}.{key} ="
                    f" {value!r}; they must agree"
                )


def load_protocol(name: str) -> Protocol:
    """A packaged protocol by name, or a protocol file (a path ending in .toml: a user's own
    protocol, recorded by that path); an unknown name lists the known ones."""
    if name.endswith(".toml"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"protocol file not found: {path}")
        return parse_protocol(name, path.read_text())
    if name not in protocol_names():
        known = ", ".join(protocol_names()) or "none"
        raise ConfigError(f"unknown protocol '{name}'; known protocols: {known}")
    return parse_protocol(name, _folder().joinpath(f"{name}.toml").read_text())


def _default(cls: type, key: str) -> Any:
    for f in dataclasses.fields(cls.Params):
        if f.name == key:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    return None


def evaluated_dataset(raw: dict[str, Any], reg: Registry) -> tuple[str, str]:
    """(name of the dataset a config is evaluated on, dotted prefix of its params): the
    config's dataset, or the one a wrapping dataset plugin is built from."""
    section = raw.get("dataset", {})
    name = section.get("name", "") if isinstance(section, dict) else ""
    try:
        cls = reg.get("dataset", name)
    except UnknownPluginError:
        return name, "dataset"
    source_key = cls.wrapped_setting("name")
    if source_key is None:
        return name, "dataset"
    route = cls.wrapped_setting
    source = section.get(source_key, _default(cls, source_key))
    inner = route("KEY")  # where a param of the wrapped dataset goes: "source_params.KEY"
    prefix = "dataset." + inner[: -len(".KEY")] if inner.endswith(".KEY") else "dataset"
    return str(source), prefix


def _get(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return norm(a) == norm(b)


def protocol_settings(
    protocol: Protocol, raw: dict[str, Any], reg: Registry
) -> tuple[str, dict[str, Any] | None]:
    """(evaluated dataset, dotted key -> value the protocol sets for this config), the
    settings None when the protocol does not cover that dataset."""
    dataset, prefix = evaluated_dataset(raw, reg)
    rules = protocol.datasets.get(dataset)
    if rules is None:
        return dataset, None
    return dataset, rules.settings(prefix, list(raw.get("tasks", {}) or {}))


def apply_protocol(raw: dict[str, Any], reg: Registry) -> tuple[dict[str, Any], str]:
    """The config with its protocol's settings, and the protocol's name ('' when the config
    names none, or its evaluated dataset is one the protocol does not cover). A setting of
    the config that contradicts the protocol is refused."""
    name = raw.get("protocol", "")
    if not isinstance(name, str):
        raise ConfigError(f"protocol: expected a protocol name, got {name!r}")
    if not name:
        return raw, ""
    protocol = load_protocol(name)
    dataset, settings = protocol_settings(protocol, raw, reg)
    if settings is None:
        return raw, ""
    out = _copy(raw)
    for key, value in settings.items():
        present, current = _get(out, key)
        if present and not _same(current, value):
            raise ConfigError(
                f"{key} = {current!r} contradicts protocol '{name}' ({value!r} on {dataset}):"
                ' a protocol fixes it; drop the setting, or set protocol = "" to evaluate'
                " with your own settings (the results then compare with no published number)"
            )
        _set(out, key, value)
    return out, name


def switch_protocol(raw: dict[str, Any], new: str, reg: Registry) -> list[str]:
    """Dotted overrides that move a run's saved config (config.toml) to protocol `new` ('' =
    none): every key the old protocol set goes back to its plugin default unless `new`
    sets it, then `new`'s settings. The model's settings are untouched."""
    old_name = raw.get("protocol", "") or ""
    old = {}
    if old_name:
        _, found = protocol_settings(load_protocol(old_name), raw, reg)
        old = found or {}
    target: dict[str, Any] = {}
    if new:
        dataset, found = protocol_settings(load_protocol(new), raw, reg)
        if found is None:
            covered = ", ".join(load_protocol(new).datasets)
            raise ConfigError(
                f"protocol '{new}' does not cover dataset '{dataset}' (it covers {covered})"
            )
        target = found
    overrides = []
    for key in old:
        if key not in target:
            overrides.append(f"{key}={_toml_value(_plugin_default(raw, key, reg))}")
    for key, value in target.items():
        overrides.append(f"{key}={_toml_value(value)}")
    overrides.append(f"protocol={_toml_value(new)}")
    return overrides


def _toml_value(value: Any) -> str:
    """A value as an override's right-hand side (TOML: strings quoted, booleans lower)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _plugin_default(raw: dict[str, Any], dotted: str, reg: Registry) -> Any:
    """The default of the param a dotted key names (dataset.KEY, dataset.source_params.KEY,
    tasks.TASK.KEY)."""
    parts = dotted.split(".")
    if parts[0] == "tasks":
        return _default(reg.get("task", parts[1]), parts[2])
    dataset, prefix = evaluated_dataset(raw, reg)
    return _default(reg.get("dataset", dataset), parts[-1])


def _copy(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def check_protocol(protocol: Protocol, reg: Registry) -> None:
    """Every setting names a param of its dataset or task plugin (a typo fails here, in the
    conformance test over every packaged protocol, not in a user's run)."""
    for ds, rules in protocol.datasets.items():
        cls = reg.get("dataset", ds)
        names = {f.name for f in dataclasses.fields(cls.Params)}
        for key in rules.dataset:
            if key not in names:
                raise ConfigError(
                    f"protocol '{protocol.name}' [{ds}.dataset]: '{key}' is not a param of"
                    f" dataset '{ds}'"
                )
        for task, values in rules.tasks.items():
            tcls = reg.get("task", task)
            tnames = {f.name for f in dataclasses.fields(tcls.Params)}
            for key in values:
                if key not in tnames:
                    raise ConfigError(
                        f"protocol '{protocol.name}' [{ds}.tasks.{task}]: '{key}' is not a"
                        f" param of task '{task}'"
                    )


def stored_protocol(config: dict[str, Any]) -> str:
    """The protocol a stored cell's config was evaluated under, as `ocl-bench results` shows
    it: its name, 'none', or 'before protocols' for a config stored before they existed (its
    settings are what it was measured with; a leaderboard row with the same hash names them)."""
    if "protocol" not in config:
        return "before protocols"
    return str(config["protocol"]) or "none"
