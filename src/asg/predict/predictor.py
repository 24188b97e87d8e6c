"""``Predictor``: a trained model applied to a person's images, with the evaluation's own inference code.

Classification: each image is resized and centre-cropped to the training size as the datasets do, and scored by
:func:`asg.engine.evaluation.evaluate.predict_scores` (flip TTA included), so its class is the one
``asg evaluate`` counts. Segmentation: each image at its native size (or ``data.eval_resize``), whole or in sliding
windows, optional flip and multi-scale, by :func:`asg.engine.evaluation.evaluate.segmentation_probs`; probabilities
are upsampled to the input's own size before the argmax, as the evaluation upsamples them to the label's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import pil_to_tensor as pil_to_image_tensor

from asg.data.files import same_size_groups
from asg.data.segmentation.pairs import EvalPairTransform
from asg.data.transforms import pil_to_tensor
from asg.engine.rundir.model_info import ModelInfo
from asg.errors import AsgError
from asg.models.inference import predict_scores, segmentation_probs
from asg.predict.inputs import to_pil

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClassPrediction:
    """One image's class: ``label`` (index), ``name``, its ``probability`` and the ``top_k`` (name, probability)
    pairs; ``probs`` [C] (softmax, averaged over the flip with TTA)."""

    label: int
    name: str
    probability: float
    top_k: list[tuple[str, float]]
    probs: np.ndarray


@dataclass
class MaskPrediction:
    """One image's segmentation: ``mask`` [H, W] (train ids, uint8) at the input's size, the fraction of pixels
    of each class, and the mean winning probability ``confidence``."""

    mask: np.ndarray
    fractions: dict[str, float]
    confidence: float
    probs: Tensor | None = field(default=None, repr=False)  # [C, H, W], kept only when asked


class Predictor:
    """Apply ``model`` (returns ``ModelOutput``; an ``asg`` network or an ONNX session wrapper) to images.

    ``tta_flip`` (None: the recipe's ``eval.tta_flip``); ``sliding_window`` "auto" (the recipe's), None (whole
    image) or (h, w); ``scales``: multi-scale factors whose probabilities are averaged (segmentation);
    ``precision`` fp32 | bf16 | fp16 (autocast; fp16 only on a GPU).
    """

    def __init__(
        self,
        model: nn.Module,
        info: ModelInfo,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        tta_flip: bool | None = None,
        sliding_window: Sequence[int] | str | None = "auto",
        sliding_stride: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        precision: str = "fp32",
        top_k: int = 5,
    ) -> None:
        self.model, self.info = model.eval(), info
        self.device = torch.device(device)
        if batch_size < 1:
            raise AsgError(f"batch size must be at least 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise AsgError(f"precision {precision!r}: use {', '.join(PRECISIONS)}")
        if precision == "fp16" and self.device.type != "cuda":
            raise AsgError("precision fp16 needs a GPU (--device cuda); on the CPU use fp32 or bf16")
        if not scales or any(s <= 0 for s in scales):
            raise AsgError(f"scales must be positive factors, got {list(scales)}")
        self.batch_size, self.precision, self.top_k = batch_size, precision, max(1, top_k)
        self.tta_flip = info.tta_flip if tta_flip is None else tta_flip
        window = info.sliding_window if sliding_window == "auto" else sliding_window
        stride = sliding_stride if sliding_stride is not None else (info.sliding_stride if window else None)
        self.window = (int(window[0]), int(window[1])) if window else None
        self.stride = (int(stride[0]), int(stride[1])) if stride else None
        self.scales = tuple(float(s) for s in scales)
        self.resize = EvalPairTransform(info.eval_resize)

    # ------------------------------------------------------------------ public
    def predict(self, images: Iterable[Any] | Any) -> list[ClassPrediction] | list[MaskPrediction]:
        """Predictions of ``images`` (PIL images, numpy arrays, tensors or paths; one or an iterable), in order.
        An unreadable path raises ``asg.data.images.ImageReadError``."""
        if isinstance(images, (Image.Image, np.ndarray, Tensor, str)) or not isinstance(images, Iterable):
            images = [images]
        out: list[Any] = []
        for chunk in _chunks([to_pil(img) for img in images], self.batch_size):
            out += self.predict_batch(chunk)
        return out

    def predict_batch(self, images: list[Image.Image]) -> list[Any]:
        """Predictions of up to ``batch_size`` decoded images ("L" or "RGB")."""
        if self.info.per_pixel:
            return self._segment([self._seg_input(img) for img in images], [img.size[::-1] for img in images])
        x = torch.stack([pil_to_tensor(img, self.info.image_size) for img in images])
        return self._classify(x)

    # ------------------------------------------------------------------ classification
    @torch.no_grad()
    def _classify(self, x: Tensor) -> list[ClassPrediction]:
        """x [B, 3, S, S] in [0, 1] -> one ClassPrediction per image (class: the evaluation's argmax)."""
        x = x.to(self.device)
        with self._autocast():
            if not self.tta_flip:
                scores = predict_scores(self.model, x, False)  # [B, C] logits; evaluate's decision rule
                probs = torch.softmax(scores, dim=1)
            else:  # one forward per view: predict_scores' sigmoid mean decides, the softmax mean is reported
                logits = self.model(x).logits.float()
                flipped = self.model(torch.flip(x, dims=[3])).logits.float()
                scores = (torch.sigmoid(logits) + torch.sigmoid(flipped)) / 2
                probs = (torch.softmax(logits, dim=1) + torch.softmax(flipped, dim=1)) / 2
        names, k = self.info.class_names, min(self.top_k, scores.shape[1])
        order = scores.float().argsort(dim=1, descending=True)[:, :k].cpu()
        probs_np = probs.float().cpu().numpy()
        out = []
        for row, p in zip(order.tolist(), probs_np):
            top = [(names[c], float(p[c])) for c in row]
            out.append(ClassPrediction(row[0], names[row[0]], float(p[row[0]]), top, p))
        return out

    # ------------------------------------------------------------------ segmentation
    def _seg_input(self, img: Image.Image) -> Tensor:
        """An "L"/"RGB" image -> [3, h, w] in [0, 1] at ``eval_resize`` (else its own size), as evaluated."""
        x = pil_to_image_tensor(img.convert("RGB")).float().div_(255.0)  # as the segmentation datasets read it
        return self.resize(x, torch.empty(0))[0]

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> Tensor:
        """x [B, 3, h, w] in [0, 1] -> class probabilities [B, C, h, w]: whole image or sliding windows, flip TTA,
        averaged over ``scales`` (each scale's probabilities resized back to h x w)."""
        x = x.to(self.device)
        total: Tensor | None = None
        with self._autocast():
            for s in self.scales:
                xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                p = segmentation_probs(self.model, xs, tta_flip=self.tta_flip, window=self.window, stride=self.stride)
                if p.shape[-2:] != x.shape[-2:]:
                    p = F.interpolate(p, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                total = p if total is None else total + p
        assert total is not None
        return total / len(self.scales)

    def _segment(self, xs: list[Tensor], sizes: list[tuple[int, int]]) -> list[MaskPrediction]:
        out: list[MaskPrediction | None] = [None] * len(xs)
        for group in same_size_groups([(x, i) for i, x in enumerate(xs)]):
            probs = self.probabilities(torch.stack([x for x, _ in group]))
            for p, (_, i) in zip(probs, group):
                h, w = sizes[i]
                if tuple(p.shape[1:]) != (h, w):
                    p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                conf, mask = p.max(dim=0)
                counts = torch.bincount(mask.flatten(), minlength=p.shape[0]).cpu().numpy()
                fractions = {n: float(c) / mask.numel() for n, c in zip(self.info.class_names, counts)}
                out[i] = MaskPrediction(mask.cpu().numpy().astype(np.uint8), fractions, float(conf.mean()))
        return [m for m in out if m is not None]

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
