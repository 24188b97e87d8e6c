"""Class-balanced pseudo-label selection (CBST, Zou et al., ECCV 2018).

For a portion p, class c's threshold lambda_c is the confidence of the ceil(p * n_c)-th most confident item
(sample or pixel) predicted as c (n_c items predicted c), so each class keeps about the same *fraction* of its
predictions and frequent, easy classes cannot crowd out rare ones. An item is then labelled
``argmax_c p_c / lambda_c`` and kept when that maximum is >= 1 (CBST's normalised selection; it keeps every item
whose predicted class clears its threshold, possibly re-assigned to a class it clears by a wider margin).
``global`` uses one threshold, from all items together (CBST's non-balanced baseline).
A class nothing is predicted as gets an infinite threshold (it cannot be selected).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from asg.data.bundle import IGNORE_INDEX


def _top_k_threshold(sorted_desc: np.ndarray, portion: float) -> float:
    k = max(1, math.ceil(portion * len(sorted_desc)))
    return float(sorted_desc[k - 1])


def class_thresholds(
    conf: np.ndarray, pred: np.ndarray, portion: float, num_classes: int, rule: str = "class_balanced"
) -> np.ndarray:
    """Thresholds float64 [C] from every item's top confidence ``conf`` [N] and predicted class ``pred`` [N]."""
    conf, pred = np.asarray(conf, dtype=np.float64), np.asarray(pred, dtype=np.int64)
    out = np.full(num_classes, np.inf)
    if rule == "global":
        if len(conf):
            out[:] = _top_k_threshold(np.sort(conf)[::-1], portion)
        return out
    for c in range(num_classes):
        mine = conf[pred == c]
        if len(mine):
            out[c] = _top_k_threshold(np.sort(mine)[::-1], portion)
    return out


class ConfidenceHistogram:
    """Streaming version of :func:`class_thresholds` for pixels: per-class histograms of the top confidence
    with ``bins`` equal bins over [0, 1]. A threshold is the lower edge of the bin holding the ceil(p * n_c)-th
    most confident pixel (so it may keep a few more pixels than exact sorting: at most one bin's worth)."""

    def __init__(self, num_classes: int, bins: int = 10_000) -> None:
        self.num_classes, self.bins = num_classes, bins
        self.counts = np.zeros((num_classes, bins), dtype=np.int64)

    def add(self, conf: Tensor, pred: Tensor) -> None:
        """conf, pred: any shape (e.g. [H, W]); conf in [0, 1]."""
        b = (conf.flatten().double() * self.bins).long().clamp_(0, self.bins - 1)
        flat = pred.flatten().long() * self.bins + b
        self.counts += (
            torch.bincount(flat.cpu(), minlength=self.num_classes * self.bins).view(self.num_classes, self.bins).numpy()
        )

    def thresholds(self, portion: float, rule: str = "class_balanced") -> np.ndarray:
        hists = self.counts.sum(0, keepdims=True) if rule == "global" else self.counts
        out = np.full(self.num_classes, np.inf)
        for c, hist in enumerate(hists):
            n = int(hist.sum())
            if n == 0:
                continue
            k = max(1, math.ceil(portion * n))
            from_top = np.cumsum(hist[::-1])
            top_bin = self.bins - 1 - int(np.searchsorted(from_top, k))
            out[c] = top_bin / self.bins
        if rule == "global":
            out[:] = out[0]
        return out


def select(probs: Tensor, thresholds: np.ndarray) -> tuple[Tensor, Tensor]:
    """(pseudo-labels, normalised confidence) of class probabilities ``probs`` [N, C] or [C, H, W].

    Labels are ``argmax_c p_c / lambda_c`` (int64, [N] or [H, W]) with ``IGNORE_INDEX`` where the normalised
    maximum is below 1 (not selected).
    """
    dim = 1 if probs.ndim == 2 else 0
    shape = [1] * probs.ndim
    shape[dim] = -1
    lam = torch.as_tensor(thresholds, dtype=torch.float64, device=probs.device).view(shape)
    scores, labels = (probs.double() / lam).max(dim=dim)
    labels = labels.masked_fill(scores < 1.0, IGNORE_INDEX)
    return labels, scores
