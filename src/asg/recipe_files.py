"""YAML recipes (``inherit:`` chains, the recipes shipped in ``asg/recipes``) and ``--set key=value`` overrides,
as nested dicts; ``asg.config.load_config`` turns them into a typed ``Config``. The keys of earlier releases they
may use (``RENAMED``, ``REMOVED``, ``train.amp``) are read as today's here, so that files of every release load."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import yaml

from asg.errors import ConfigError

# keys of earlier releases -> (section, key) now; recipes and run folders written with them keep loading
RENAMED: dict[tuple[str | None, str], tuple[str, str]] = {
    **{
        ("method", f"teacher_{k}"): ("teacher", k)
        for k in ("cache_storage", "cache_topk", "cache_dir", "cache_key", "fuse_bn")
    },
    ("method", "teacher_cache"): ("teacher", "cache"),
    (None, "lr_controller"): ("l2o", "controller"),
}
REMOVED = {("eval", "selection")}  # never read: every run reports last, source-val and oracle, each labelled


class ConfigWarning(UserWarning):
    """A config that loads, with a line to read (an old key name that replaced a value given earlier)."""


def _dotted(section: str | None, key: str) -> str:
    return key if section is None else f"{section}.{key}"


def upgrade_old_keys(data: dict[str, Any], where: str = "the config") -> dict[str, Any]:
    """Map keys of earlier releases to today's (``RENAMED``, ``REMOVED``, ``train.amp`` -> ``train.precision``)
    in one layer (one recipe file, one dict). One rule for an old key and its new name: given in different layers
    (a ``--set`` over a recipe, a recipe over the one it inherits) the later wins (``asg.recipe_files``, with a
    line); given in the same layer at different values they are refused (ConfigError naming both)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    pairs = [(*old, *new) for old, new in RENAMED.items()] + [("train", "amp", "train", "precision")]
    for section, key, new_section, new_key in pairs:
        old = data if section is None else data.get(section)
        if not isinstance(old, dict) or key not in old:
            continue
        value = old.pop(key)
        if (section, key) == ("train", "amp"):  # before train.precision: amp meant bf16 autocast
            value = "bf16" if value else "fp32"
        target = data.setdefault(new_section, {})
        if isinstance(target, dict) and new_key in target and target[new_key] != value:
            raise ConfigError(
                f"{where}: {_dotted(section, key)} (the old name of {_dotted(new_section, new_key)}, here "
                f"{value!r}) and {_dotted(new_section, new_key)}={target[new_key]!r} are both given: keep one (of "
                "an old and a new name in different places, the one given later wins)"
            )
        target[new_key] = value
    for section, key in REMOVED:
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    return data


def renamed_override(key: str, value: Any) -> tuple[str, Any] | None:
    """``(new dotted key, value)`` for an override that uses a key of an earlier release, else None."""
    if key == "train.amp":
        return "train.precision", "bf16" if value else "fp32"
    section, _, leaf = key.rpartition(".")
    new = RENAMED.get((section or None, leaf))
    return (f"{new[0]}.{new[1]}", value) if new is not None else None


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
    renamed = renamed_override(key, value)
    if renamed is None:
        return key, value
    new_key, new_value = renamed
    node: Any = data
    for part in new_key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    if node is not _MISSING and node != new_value:
        line = (
            f"--set {key}={raw}: {key} is the old name of {new_key}; {new_key}={new_value!r} replaces {node!r} "
            "given earlier (of an old and a new name, the one given later wins)"
        )
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
    data = upgrade_old_keys(data, where=str(path))  # today's names, so that a file over its base wins either way
    if parent:
        base = read_recipe(path.parent / parent)
        base.pop("name", None)
        data = _deep_merge(base, data)
    data.setdefault("name", path.stem)
    return data
