"""``model.init_from``: start a run from a whole trained model (backbone and heads), at step 0.

Unlike ``--resume`` (the same run continues: optimizer, step, RNG) and ``model.weights`` (ImageNet backbone
weights), ``init_from`` loads every weight of a trained model, e.g. an ASG model to adapt. The frozen teacher
stays the ImageNet network, built before the weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from asg.config import Config, load_config
from asg.engine.checkpoint import load_weights
from asg.errors import WeightsError

ADAPTATION_FILE = "adaptation.json"  # written by ``asg adapt``: its final model is the last round's


def init_weights_path(init_from: str, checkpoint: str = "last") -> tuple[Path, Path | None]:
    """(weights file, run folder or None) named by ``init_from``: a ``.safetensors`` file, a run folder of
    ``asg train`` (its ``checkpoint`` weights) or of ``asg adapt`` (its last round's)."""
    from asg.engine.rundir import RunDir

    path = Path(init_from)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise WeightsError(
            f"model.init_from: {path} does not exist (give a run folder of `asg train`/`asg adapt` or a "
            ".safetensors file)"
        )
    if (path / ADAPTATION_FILE).is_file():
        rounds = json.loads((path / ADAPTATION_FILE).read_text()).get("rounds", [])
        if not rounds:
            raise WeightsError(f"model.init_from: the adaptation in {path} has not finished a round yet")
        path = path / rounds[-1]["folder"]
    rd = RunDir(path)
    if not rd.manifest_path.exists():
        raise WeightsError(f"model.init_from: {path} holds no checkpoint ({rd.manifest_path} is missing)")
    return rd.resolve(checkpoint), path


def load_init_weights(model: nn.Module, cfg: Config, num_classes: int, task: str = "classification") -> str:
    """Load ``cfg.model.init_from`` into ``model``; returns the weights file. WeightsError, naming both sides,
    when the source was trained with another backbone, segmenter or number of classes."""
    assert cfg.model.init_from is not None
    weights, run = init_weights_path(cfg.model.init_from, cfg.model.init_checkpoint)
    if run is not None and (run / "config.yaml").is_file():
        theirs = load_config(run / "config.yaml")
        keys = ("backbone", "segmenter") if task == "segmentation" else ("backbone", "hidden_dim")
        for key in keys:
            mine, other = getattr(cfg.model, key), getattr(theirs.model, key)
            if mine != other:
                raise WeightsError(
                    f"model.init_from: {run} was trained with model.{key}={other!r}, this run has {mine!r}; "
                    f"set --set model.{key}={other} or start from another model"
                )
        summary = run / "summary.json"
        if summary.is_file():
            names = json.loads(summary.read_text()).get("class_names")
            if names is not None and len(names) != num_classes:
                raise WeightsError(
                    f"model.init_from: {run} was trained for {len(names)} classes, this run's data has "
                    f"{num_classes}; adapt a model of the same benchmark"
                )
    if not weights.is_file():
        raise WeightsError(f"model.init_from: the weights file {weights} does not exist")
    load_weights(model, weights)
    return str(weights)
