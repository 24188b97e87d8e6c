"""How a model of this package is run on images [B, 3, H, W] in [0, 1] at evaluation: class scores with flip TTA
(:func:`predict_scores`), class probabilities per pixel, whole image or sliding windows (:func:`segmentation_probs`).
Evaluation, pseudo-labelling, the run's figures and ``asg predict`` all call these."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asg.config import Config


def predict_scores(model: nn.Module, x: Tensor, tta_flip: bool) -> Tensor:
    """Class scores [B, C]. With ``tta_flip``: mean of sigmoid(logits) over the image and its mirror,
    as the official VisDA evaluation; without: the logits."""
    logits = model(x).logits.float()
    if not tta_flip:
        return logits
    flipped = model(torch.flip(x, dims=[3])).logits.float()
    return (torch.sigmoid(logits) + torch.sigmoid(flipped)) / 2


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
