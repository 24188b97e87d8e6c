"""Inference and evaluation: class scores (flip TTA) and segmentation probabilities (whole image or sliding
window, flip TTA), one confusion matrix per model and set (:func:`evaluate`), and the package's one evaluation path
(:func:`evaluate_sets`). The metrics are in :mod:`asg.engine.metrics`, ImageNet retention in
:mod:`asg.engine.retention`; their names are importable from here too."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from asg.config import Config
from asg.data.files import collate_skip_none
from asg.engine.metrics import PRIMARY_METRIC, EvalResult, confusion_matrix, real_average
from asg.engine.retention import imagenet_retention, teacher_photo_logits
from asg.models.fusion import inference_copy
from asg.utils import progress

__all__ = ["PRIMARY_METRIC", "EvalResult", "confusion_matrix", "evaluate", "evaluate_sets", "imagenet_retention",
           "list_collate", "predict_scores", "real_average", "same_size_groups", "segmentation_probs",
           "sliding_options", "teacher_photo_logits"]  # fmt: skip


def predict_scores(model: nn.Module, x: Tensor, tta_flip: bool) -> Tensor:
    """Class scores [B, C]. With ``tta_flip``: mean of sigmoid(logits) over the image and its mirror,
    as the official VisDA evaluation; without: the logits."""
    logits = model(x).logits.float()
    if not tta_flip:
        return logits
    flipped = model(torch.flip(x, dims=[3])).logits.float()
    return (torch.sigmoid(logits) + torch.sigmoid(flipped)) / 2


def list_collate(batch: list) -> list:
    """Keep samples as a list (segmentation images and labels may differ in size); skipped (None) ones dropped."""
    return [item for item in batch if item is not None]


def same_size_groups(items: list) -> list[list]:
    """``items`` (image, target) pairs as one group when all images have one size, else one group per item,
    so that each group's images can be stacked into a batch."""
    return [items] if len({tuple(img.shape) for img, _ in items}) == 1 else [[item] for item in items]


def sliding_options(cfg: Config) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(window, stride) of :func:`segmentation_probs` from ``cfg.eval`` (None: whole image / default stride)."""
    window, stride = cfg.eval.sliding_window, cfg.eval.sliding_stride
    return (
        (int(window[0]), int(window[1])) if window else None,
        (int(stride[0]), int(stride[1])) if stride else None,
    )


def segmentation_probs(
    model: nn.Module,
    x: Tensor,
    *,
    tta_flip: bool = False,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
) -> Tensor:
    """Class probabilities [B, C, H, W] of images x [B, 3, H, W] in [0, 1].

    ``window`` (h, w): sliding-window inference, each window's softmax averaged where windows overlap (stride
    default 2/3 of the window); an image smaller than the window is padded with zeros and the padding cropped
    off. ``tta_flip``: mean with the prediction on the mirrored image, flipped back.
    """

    def whole(inp: Tensor) -> Tensor:
        probs = torch.softmax(model(inp).logits.float(), dim=1)
        if tta_flip:
            mirrored = torch.softmax(model(torch.flip(inp, dims=[3])).logits.float(), dim=1)
            probs = (probs + torch.flip(mirrored, dims=[3])) / 2
        return probs

    if window is None:
        return whole(x)
    b, _, h, w = x.shape
    wh, ww = window
    sh, sw = stride or (max(wh * 2 // 3, 1), max(ww * 2 // 3, 1))
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    xp = nn.functional.pad(x, (0, pw, 0, ph))
    hp, wp = xp.shape[2:]
    total: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=x.device)
    tops = sorted({min(t, hp - wh) for t in range(0, hp - wh + sh, sh)})
    lefts = sorted({min(left, wp - ww) for left in range(0, wp - ww + sw, sw)})
    for top in tops:
        for left in lefts:
            probs = whole(xp[:, :, top : top + wh, left : left + ww])
            if total is None:
                total = torch.zeros(b, probs.shape[1], hp, wp, device=x.device)
            total[:, :, top : top + wh, left : left + ww] += probs
            count[:, :, top : top + wh, left : left + ww] += 1
    assert total is not None
    return (total / count)[:, :, :h, :w]


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
    task: str = "classification",
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    ignore_index: int = 255,
) -> EvalResult:
    """Evaluate ``model`` (returns ``ModelOutput``) on ``dataset`` of (image [3,H,W], target).

    Classification: targets are int labels; flip TTA averages sigmoids (official VisDA protocol).
    Segmentation: targets [H, W] with ``ignore_index``; probabilities (whole image or sliding ``window``, optional
    flip) are bilinearly upsampled to each label's size before the argmax, so metrics are at label resolution.
    """
    was_training = model.training
    model.eval()
    segmentation = task == "segmentation"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=list_collate if segmentation else collate_skip_none)  # fmt: skip
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def prepare(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    for batch in progress(loader, desc=desc, enabled=show_progress, leave=False):
        if not batch:  # every image of the batch was skipped (data.on_bad_image=skip)
            continue
        if not segmentation:
            x, y = batch
            preds = predict_scores(model, prepare(x), tta_flip).argmax(dim=1).cpu()
            confusion += confusion_matrix(y, preds, num_classes)
            continue
        for group in same_size_groups(batch):
            x = prepare(torch.stack([img for img, _ in group]))
            probs = segmentation_probs(model, x, tta_flip=tta_flip, window=window, stride=stride)
            for p, (_, y) in zip(probs, group):
                if tuple(p.shape[1:]) != tuple(y.shape):
                    p = nn.functional.interpolate(p[None], size=tuple(y.shape), mode="bilinear", align_corners=False)[0]
                confusion += confusion_matrix(y, p.argmax(dim=0).cpu(), num_classes, ignore_index)
    model.train(was_training)
    return EvalResult(confusion, task=task)


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, Dataset],
    num_classes: int,
    cfg: Config,
    device: torch.device | str,
    *,
    tta_flip: bool | None = None,
    show_progress: bool = True,
    task: str = "classification",
) -> dict[str, EvalResult]:
    """Evaluate ``model`` on each named set with the protocol of ``cfg`` (batch size, workers, TTA, layout,
    sliding window for segmentation).

    The one evaluation path of the package: the trainer's curves and selections and ``asg evaluate`` both use it.
    ``tta_flip`` overrides ``cfg.eval.tta_flip`` when given.
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
        )
        for name, ds in sets.items()
    }
