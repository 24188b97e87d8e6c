"""The registries' names a recipe may give (datasets, methods, backbones, segmenters, guidance heads, learning-rate
controllers, rewards) and the check that a loaded config gives only registered ones.

Checked where a recipe is loaded to build things (``asg.api``, ``asg.predict``, the sweep, the demo and the CLI's
``--resume`` note), right after ``load_config``: a typo fails as the recipe loads, not hours later. ``asg.config``
itself knows no registry (loading and validating a recipe imports no torch).
"""

from __future__ import annotations

from pathlib import Path

from asg.config import Config, load_config
from asg.data import DATASETS
from asg.errors import ConfigError
from asg.l2o import CONTROLLERS, REWARDS
from asg.methods import METHODS
from asg.models.backbones import BACKBONES
from asg.models.guidance import GUIDANCE_HEADS
from asg.models.segmenter import SEGMENTERS


def registry_names() -> dict[str, list[str]]:
    """Config keys whose value names an entry of a registry -> the registered names."""
    return {
        "data.name": sorted(DATASETS),
        "method.name": sorted(METHODS),
        "l2o.controller": sorted(CONTROLLERS),
        "l2o.reward": sorted(REWARDS),
        "model.backbone": sorted(BACKBONES),
        "model.segmenter": sorted(SEGMENTERS),
        "model.guidance_head": ["auto", *GUIDANCE_HEADS],
    }


def check_registry_names(cfg: Config) -> Config:
    """``cfg`` when every registry name of it is registered; else ConfigError naming the key."""
    for key, names in registry_names().items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        if value not in names:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(names)}")
    return cfg


def load_checked_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """``load_config(path, overrides)`` whose registry names are checked: a recipe about to build things."""
    return check_registry_names(load_config(path, overrides))
