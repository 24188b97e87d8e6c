"""YAML recipes (``inherit:`` chains, the recipes shipped in ``asg/recipes``) and ``--set key=value`` overrides,
as nested dicts; ``asg.config.load_config`` turns them into a typed ``Config``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml

from asg.errors import ConfigError


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict.

    A mapping value is merged into an existing section (``optim={lr: 0.1}`` keeps the other ``optim`` keys).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.01)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value ({exc})") from None
        key, value = _renamed(data, key.strip(), raw, value)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last] = _deep_merge(node[last], value)
        else:
            node[last] = value
    return data


def _renamed(data: dict[str, Any], key: str, raw: str, value: Any) -> tuple[str, Any]:
    """An override of a key of an earlier release as today's key; it replaces a value given earlier (the later of
    an old and a new name wins), and a ConfigWarning line says so when the values differ."""
    from asg.config import ConfigWarning, renamed_override

    renamed = renamed_override(key, value)
    if renamed is None:
        return key, value
    new_key, new_value = renamed
    node: Any = data
    for part in new_key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    if node is not _MISSING and node != new_value:
        line = (f"--set {key}={raw}: {key} is the old name of {new_key}; {new_key}={new_value!r} replaces {node!r} "
                "given earlier (of an old and a new name, the one given later wins)")  # fmt: skip
        warnings.warn(ConfigWarning(line), stacklevel=3)
    return new_key, new_value


_MISSING = object()


def recipe_path(name: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a recipe shipped in ``asg/recipes`` (= ``configs/``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = Path(__file__).parent / "recipes" / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in shipped.parent.glob("*.yaml")))
    raise ConfigError(f"config file {name} does not exist; shipped recipes: {available}")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; ``inherit: other.yaml`` (relative to the file) is merged underneath it."""
    path = recipe_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    parent = data.pop("inherit", None)
    from asg.config import upgrade_old_keys  # (asg.config imports this module)

    data = upgrade_old_keys(data, where=str(path))  # today's names, so that a file over its base wins either way
    if parent:
        base = read_recipe(path.parent / parent)
        base.pop("name", None)
        data = _deep_merge(base, data)
    data.setdefault("name", path.stem)
    return data
