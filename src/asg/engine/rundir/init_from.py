"""``model.init_from``: start a run from a whole trained model (backbone and heads), at step 0.

Unlike ``--resume`` (the same run continues: optimizer, step, RNG) and ``model.weights`` (ImageNet backbone
weights), ``init_from`` loads every weight of a trained model, e.g. an ASG model to adapt. The frozen teacher
stays the ImageNet network, built before the weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from asg.config import Config
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.weights import load_weights
from asg.errors import WeightsError
from asg.io import sha256_file
from asg.tasks import CLASSIFICATION, get_task

ADAPTATION_FILE = "adaptation.json"  # written by ``asg adapt``: its final model is the last round's


def init_weights_path(init_from: str, checkpoint: str = "last") -> tuple[Path, Path | None]:
    """(weights file, run folder or None) named by ``init_from``: a ``.safetensors`` file, a run folder of
    ``asg train`` (its ``checkpoint`` weights) or of ``asg adapt`` (its last round's)."""
    path = Path(init_from)
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise WeightsError(
            f"model.init_from: {path} does not exist (give a run folder of `asg train`/`asg adapt` or a "
            ".safetensors file)"
        )
    adaptation = RunDir(path).read_json(ADAPTATION_FILE)
    if adaptation is not None:
        rounds = adaptation.get("rounds", [])
        if not rounds:
            raise WeightsError(f"model.init_from: the adaptation in {path} has not finished a round yet")
        path = path / rounds[-1]["folder"]
    rd = RunDir(path)
    if not rd.manifest_path.exists():
        raise WeightsError(f"model.init_from: {path} holds no checkpoint ({rd.manifest_path} is missing)")
    return rd.resolve(checkpoint), path


def init_record(init_from: str, checkpoint: str = "last", allow_unfinished: bool = False) -> dict[str, Any]:
    """What ``init_from`` names, for an adaptation's files: weights file, its SHA-256, its step and whether its run
    finished. WeightsError for a run that is still running, or (unless ``allow_unfinished``) never finished."""
    weights, run = init_weights_path(init_from, checkpoint)
    record: dict[str, Any] = {"file": str(weights), "step": None, "finished": None}
    top = Path(init_from)
    if run is not None:
        rd, top_rd = RunDir(run), RunDir(top)
        holder = top_rd.holder() or rd.holder()
        if holder is not None:
            raise WeightsError(
                f"model.init_from: {top} is being written by a running asg process ({holder}); "
                "wait until it finishes, then start this run"
            )
        manifest = rd.read_manifest()
        entry = manifest["weights"] if checkpoint == "last" else manifest.get("best", {}).get(checkpoint, {})
        record["step"] = entry.get("step", manifest.get("step"))
        record["finished"] = top_rd.is_done()
        if not record["finished"] and not allow_unfinished:
            raise WeightsError(
                f"model.init_from: {top} never finished (no 'done' file; its last checkpoint is of step "
                f"{manifest.get('step')}): resume it to the end first, or start from that checkpoint anyway with "
                "adapt.from_unfinished=true (asg adapt --from-unfinished; asg train --set adapt.from_unfinished=true)"
            )
    if not weights.is_file():
        raise WeightsError(f"model.init_from: the weights file {weights} does not exist")
    record["sha256"] = sha256_file(weights)
    return record


def load_init_weights(model: nn.Module, cfg: Config, num_classes: int, task: str = CLASSIFICATION.name) -> str:
    """Load ``cfg.model.init_from`` into ``model``; returns the weights file. WeightsError, naming both sides,
    when the source was trained with another backbone, segmenter or number of classes."""
    assert cfg.model.init_from is not None
    weights, run = init_weights_path(cfg.model.init_from, cfg.model.init_checkpoint)
    if run is not None and not cfg.adapt.from_unfinished:  # as `asg adapt`: not a running or unfinished run
        init_record(cfg.model.init_from, cfg.model.init_checkpoint)
    rd = RunDir(run) if run is not None else None
    if rd is not None and rd.config_path.is_file():
        theirs = rd.read_config()
        for key in get_task(task).model_keys:
            mine, other = getattr(cfg.model, key), getattr(theirs.model, key)
            if mine != other:
                raise WeightsError(
                    f"model.init_from: {run} was trained with model.{key}={other!r}, this run has {mine!r}; "
                    f"set --set model.{key}={other} or start from another model"
                )
        summary = rd.read_summary()
        names = summary.class_names if summary is not None else []
        if names and len(names) != num_classes:
            raise WeightsError(
                f"model.init_from: {run} was trained for {len(names)} classes, this run's data has "
                f"{num_classes}; adapt a model of the same benchmark"
            )
    if not weights.is_file():
        raise WeightsError(f"model.init_from: the weights file {weights} does not exist")
    if weights.suffix != ".safetensors":
        from asg.models.official import load_official_checkpoint

        print(f"model.init_from: {load_official_checkpoint(model, weights)}")
        return str(weights)
    load_weights(model, weights)
    return str(weights)
