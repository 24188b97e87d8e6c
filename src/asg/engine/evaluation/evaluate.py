"""Evaluation: one confusion matrix per model and set (:func:`evaluate`), each batch scored by the task
(``asg.tasks``), and the package's one evaluation path (:func:`evaluate_sets`). The metrics are the task's
(:class:`~asg.engine.evaluation.metrics.EvalResult`), ImageNet retention is in :mod:`asg.engine.evaluation.retention`,
the inference itself (flip TTA, sliding windows) in :mod:`asg.models.inference`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from asg.config import Config
from asg.engine.evaluation.metrics import EvalResult
from asg.errors import AsgError
from asg.models.fusion import inference_copy
from asg.models.inference import sliding_options
from asg.tasks import CLASSIFICATION, get_task
from asg.utils import progress


def refuse_non_finite_logits(out: object, desc: str) -> None:
    """AsgError when a model's evaluation logits hold NaN or Inf: their argmax is class 0 (or any), so the metrics
    would be those of a constant guess, reported as if real."""
    logits = getattr(out, "logits", None)
    if not isinstance(logits, Tensor) or bool(torch.isfinite(logits).all()):
        return
    flat = logits.detach().reshape(logits.shape[0], -1)
    bad = int((~torch.isfinite(flat)).any(dim=1).sum())
    raise AsgError(
        f"{desc}: the model's logits are NaN or infinite for {bad} of {flat.shape[0]} images; its weights or the "
        "images hold non-finite values (a diverged or damaged model), so no metric is reported"
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    *,
    batch_size: int = 128,
    tta_flip: bool = False,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    desc: str = "eval",
    show_progress: bool = True,
    channels_last: bool = False,
    task: str = CLASSIFICATION.name,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    ignore_index: int = 255,
    class_groups: dict[str, tuple[int, ...]] | None = None,
) -> EvalResult:
    """Evaluate ``model`` (returns ``ModelOutput``) on ``dataset`` of (image [3,H,W], target) of the task ``task``
    (its name), which scores each batch: classification targets are int labels, flip TTA averaging sigmoids
    (official VisDA protocol); segmentation targets are [H, W] with ``ignore_index``, predicted whole or in sliding
    ``window``s and compared at the label's resolution. ``class_groups``: see ``EvalResult``.
    """
    was_training = model.training
    model.eval()
    scorer = get_task(task)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=scorer.eval_collate
    )
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def prepare(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    hook = model.register_forward_hook(lambda _m, _x, out: refuse_non_finite_logits(out, desc))
    try:
        for batch in progress(loader, desc=desc, enabled=show_progress, leave=False):
            if not batch:  # every image of the batch was skipped (data.on_bad_image=skip)
                continue
            confusion += scorer.batch_confusion(
                model,
                batch,
                num_classes,
                prepare,
                tta_flip=tta_flip,
                window=window,
                stride=stride,
                ignore_index=ignore_index,
            )
    finally:
        hook.remove()
    model.train(was_training)
    return EvalResult(confusion, task=task, class_groups=dict(class_groups or {}))


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, Dataset],
    num_classes: int,
    cfg: Config,
    device: torch.device | str,
    *,
    tta_flip: bool | None = None,
    show_progress: bool = True,
    task: str = CLASSIFICATION.name,
    class_groups: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, EvalResult]:
    """Evaluate ``model`` on each named set with the protocol of ``cfg`` (batch size, workers, TTA, layout,
    sliding window for segmentation).

    The one evaluation path of the package: the trainer's curves and selections and ``asg evaluate`` both use it.
    ``tta_flip`` overrides ``cfg.eval.tta_flip`` when given; ``class_groups`` (``DataBundle.class_groups``) adds
    each group's mean per-class metric.
    """
    window, stride = sliding_options(cfg)
    if cfg.eval.fuse_bn:
        model = inference_copy(model)
    return {
        name: evaluate(
            model,
            ds,
            num_classes,
            batch_size=cfg.data.eval_batch_size,
            tta_flip=cfg.eval.tta_flip if tta_flip is None else tta_flip,
            device=device,
            num_workers=cfg.data.num_workers,
            desc=f"eval {name}",
            show_progress=show_progress,
            channels_last=cfg.model.channels_last,
            task=task,
            window=window,
            stride=stride,
            class_groups=class_groups,
        )
        for name, ds in sets.items()
    }
