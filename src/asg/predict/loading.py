"""A trained model without its data: a run folder's (or a weight file's) network with one checkpoint's weights, its
:class:`~asg.engine.rundir.model_info.ModelInfo`, optionally WiSE-FT interpolated. Nothing here opens a dataset."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from torch import nn

from asg.config import Config
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.manifest import EXPORTS
from asg.engine.rundir.model_info import ModelInfo, model_info_from_config, read_model_info
from asg.errors import AsgError, WeightsError


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on CPU) and what produced it."""

    cfg: Config
    model: nn.Module  # ASGClassifier | ASGSegmenter
    info: ModelInfo
    source: Path  # the run folder or weight file
    checkpoint: str
    weights: Path  # the weights file read
    wise_ft_alpha: float | None = None
    notes: list[str] = field(default_factory=list)


def _build(cfg: Config, info: ModelInfo) -> nn.Module:
    from asg.models import build_model

    return build_model(cfg.model, info.num_classes, task=info.task)


def _with_normalisation(info: ModelInfo, model: nn.Module) -> ModelInfo:
    backbone = model.backbone
    info.mean = [float(v) for v in backbone.mean.flatten().tolist()]  # type: ignore[union-attr, operator]
    info.std = [float(v) for v in backbone.std.flatten().tolist()]  # type: ignore[union-attr, operator]
    return info


def load_model(
    source: str | Path,
    checkpoint: str = "last",
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    wise_ft: float | None = None,
    class_names: list[str] | None = None,
) -> LoadedModel:
    """Load a run folder's ``checkpoint`` (``last``, ``source-val``, ``oracle`` or a ``.safetensors`` path), or a
    weight file from elsewhere (official ``.pth.tar``, ``.safetensors``) with the recipe ``config`` that builds it.

    ``class_names`` are needed only for a model whose class names nothing records (AsgError says so).
    ``wise_ft``: the backbone becomes ``(1 - alpha) x ImageNet + alpha x fine-tuned`` (``asg.methods.wise_ft``).
    """
    alpha = None
    if wise_ft is not None:
        from asg.methods.wise_ft import check_alpha

        alpha = check_alpha(wise_ft)
    path = Path(source)
    notes: list[str] = []
    if path.is_file():
        if config is None:
            raise AsgError(
                f"{path} is a weight file, not a run folder: pass --config RECIPE (the recipe that builds "
                "its model, e.g. gta5_cityscapes_fcn8s_vgg16_asg)"
            )
        from asg.engine.rundir.init_from import load_init_weights
        from asg.registries import load_checked_config

        cfg = load_checked_config(config, [*(overrides or []), f"model.init_from={path}"])
        info = model_info_from_config(cfg, None, class_names)
        model = _build(cfg, info)
        load_init_weights(model, cfg, info.num_classes, info.task)
        weights, label = path, path.name
    else:
        path, cfg, info, model, weights, label = _load_run(path, checkpoint, overrides, class_names, notes)
    if alpha is not None:
        from asg.methods.wise_ft import interpolate_backbone

        if cfg.model.weights == "none":
            raise AsgError("WiSE-FT interpolates towards the pretrained backbone, but this model.weights is none")
        if path.is_dir():  # a run folder: its recorded file, the same bytes or a refusal
            from asg.models.base_weights import check_base_weights, read_record

            check_base_weights(read_record(path), cfg.model, "wise-ft")
        pretrained = cast(nn.Module, _build(cfg, info).backbone).state_dict()
        interpolate_backbone(model, pretrained, alpha)
    model.eval()
    return LoadedModel(cfg, model, _with_normalisation(info, model), path, label, weights, alpha, notes)


def _load_run(
    path: Path, checkpoint: str, overrides: list[str] | None, class_names: list[str] | None, notes: list[str]
) -> tuple[Path, Config, ModelInfo, nn.Module, Path, str]:
    from asg.engine.rundir.init_from import ADAPTATION_FILE
    from asg.engine.rundir.weights import load_weights
    from asg.registries import check_registry_names

    if not path.is_dir():
        raise AsgError(f"{path} does not exist (give a run folder of `asg train`, a weight file or a .onnx file)")
    if (path / ADAPTATION_FILE).is_file():  # an `asg adapt` folder: its last round's model
        rounds = json.loads((path / ADAPTATION_FILE).read_text()).get("rounds", [])
        if not rounds:
            raise WeightsError(f"the adaptation in {path} has not finished a round yet")
        path = path / rounds[-1]["folder"]
    rd = RunDir(path)
    missing = f"{path} is not a run folder: {rd.config_path} does not exist (pass the --out folder of `asg train`)"
    cfg = check_registry_names(rd.read_config(overrides, missing=missing))
    if checkpoint not in EXPORTS and not checkpoint.endswith(".safetensors"):
        raise AsgError(f"checkpoint {checkpoint!r}: use {', '.join(EXPORTS)} or the path of a .safetensors file")
    info = read_model_info(path)
    if info is None:
        info = model_info_from_config(cfg, path, class_names)
    elif class_names:
        if len(class_names) != info.num_classes:
            raise AsgError(f"--class-names gives {len(class_names)} names; the model has {info.num_classes} classes")
        info.class_names = list(class_names)
    if checkpoint in EXPORTS:
        if not rd.manifest_path.exists() and not (path / EXPORTS[checkpoint]).exists():
            raise WeightsError(f"{path} holds no checkpoint yet ({rd.manifest_path} is missing)")
        weights, blob = rd.read_checkpoint(checkpoint)
        if not rd.is_done():
            step = _manifest_step(rd)
            notes.append(
                f"{path} has not finished (no 'done' file): predicting with its last committed "
                f"checkpoint{f' (step {step})' if step is not None else ''}"
            )
    else:
        weights = Path(checkpoint)
        if not weights.is_file():
            found = ", ".join(sorted(f.name for f in path.glob("*.safetensors"))) or "none"
            raise WeightsError(f"checkpoint {weights} does not exist (checkpoints in {path}: {found})")
        blob = weights.read_bytes()
    from asg.models.base_weights import check_run_base_weights

    check_run_base_weights(path, cfg.model, "predict")  # LoRA: the backbone is rebuilt from its file
    model = _build(cfg, info)
    load_weights(model, weights, blob)
    return path, cfg, info, model, weights, checkpoint


def _manifest_step(rd: RunDir) -> int | None:
    try:
        return int(rd.read_manifest()["step"])
    except (AsgError, KeyError, ValueError, TypeError):
        return None


def say(notes: list[str]) -> None:
    """Print each note as ``asg: note: ...`` on standard error."""
    for note in notes:
        print(f"asg: note: {note}", file=sys.stderr)
