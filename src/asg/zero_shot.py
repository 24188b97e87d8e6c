"""CLIP zero-shot classification of a benchmark's classes (``asg evaluate --zero-shot --config RECIPE``): the first
row of a CLIP table, no training.

The recipe's CLIP image tower (``model.backbone`` clip_vitb16 / clip_vitl14 with ``model.weights`` an open_clip
file) with a task head made from the text tower: the normalised mean text embedding of each class name of the
data (``data.class_names`` of the benchmark, underscores read as spaces) over the prompt templates
``model.clip_templates`` (open_clip's 80 OpenAI ImageNet prompts, or its 7 "simple" ones), computed once and
cached as the ImageNet zero-shot head is (``asg.models.guidance.clip_zeroshot_head``). The logits are the cosines
between the projected image feature and each class embedding: CLIP's temperature (x 100) does not change the
argmax, and cosines keep the official VisDA flip-TTA (an average of sigmoids) from saturating at 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asg.errors import ConfigError


def zero_shot_model(cfg: Any, data: Any) -> Any:
    """The recipe's CLIP classifier with its task head replaced by the zero-shot head over ``data``'s classes."""
    from asg.models import build_model
    from asg.models.guidance import ClipZeroShotHead, clip_zeroshot_head
    from asg.models.vit import VITS
    from asg.tasks import task_of

    spec = VITS.get(cfg.model.backbone)
    if spec is None or not spec.clip:
        clips = ", ".join(n for n, s in VITS.items() if s.clip)
        raise ConfigError(
            f"zero-shot evaluation needs a CLIP backbone ({clips}), not model.backbone={cfg.model.backbone}"
        )
    if task_of(data).per_pixel:
        raise ConfigError(
            f"zero-shot evaluation classifies images: it needs a classification benchmark, not {data.task}"
        )
    if not Path(cfg.model.weights).is_file():
        raise ConfigError(
            f"zero-shot evaluation reads the text tower from model.weights, an open_clip file: "
            f"{cfg.model.weights!r} is not a file"
        )
    names = [n.replace("_", " ") for n in data.class_names]
    text = clip_zeroshot_head(
        cfg.model.weights,
        cfg.model.clip_model or spec.open_clip_name,
        cfg.model.clip_templates,
        cfg.model.clip_cache_dir,
        names=names,
    )
    model = build_model(cfg.model, data.num_classes, task=data.task)
    model.head = ClipZeroShotHead(text.proj, text.classifier, 1.0)  # cosines (see the module docstring)
    model.head.requires_grad_(False)
    return model


def evaluate_zero_shot(
    config: str | Path,
    overrides: list[str] | None = None,
    tta_flip: bool | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot evaluation of recipe ``config`` on its evaluation sets (full sets), in ``asg.api.evaluate``'s
    result layout (``checkpoint`` "zero-shot"), so ``asg.api.save_evaluation`` writes it."""
    from asg.data import build_data
    from asg.engine.evaluation.evaluate import evaluate_sets
    from asg.engine.rundir.summary import EvalReport
    from asg.registries import load_checked_config
    from asg.tasks import task_of
    from asg.utils import resolve_device

    cfg = load_checked_config(config, overrides)
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.data)
    model = zero_shot_model(cfg, data).to(device).eval()
    tta = cfg.eval.tta_flip if tta_flip is None else tta_flip
    results = evaluate_sets(
        model,
        data.eval_sets,
        data.num_classes,
        cfg,
        device,
        tta_flip=tta,
        show_progress=show_progress,
        task=data.task,
        class_groups=data.class_groups,
    )
    sets = {
        name: {
            **r.to_dict(),
            "confusion": r.confusion.tolist(),
            "n": int(r.confusion.sum()),
            "role": "source-val" if name == data.source_val_name else "real",
        }
        for name, r in results.items()
    }
    result: dict[str, Any] = {
        "run": cfg.name,
        "checkpoint": "zero-shot",
        "checkpoint_file": str(cfg.model.weights),
        "tta_flip": tta,
        "task": data.task,
        "zero_shot": {
            "templates": cfg.model.clip_templates,
            "class_names": [n.replace("_", " ") for n in data.class_names],
        },
        "sliding_window": None,
        "eval_resize": None,
        "class_names": data.class_names,
        "sets": sets,
        "note": "zero-shot: CLIP's text tower classifies the class names; no training",
    }
    average = EvalReport.of(sets, data.real_set_names, task_of(data).primary_metric).real_average
    if average is not None:
        result["real_average"] = average
    return result
