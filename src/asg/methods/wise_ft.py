"""WiSE-FT baseline (Wortsman et al., CVPR 2022, "Robust fine-tuning of zero-shot models"): weight-space
ensembling of the pretrained and the fine-tuned network, applied after training (``asg evaluate --wise-ft``,
``asg.api.evaluate_wise_ft``).

For a network with a new task head (the head has no pretrained counterpart) only the backbone is interpolated::

    theta_alpha = (1 - alpha) * theta_pretrained + alpha * theta_finetuned     (floating backbone tensors)

and the task head is the fine-tuned one. alpha = 0: the ImageNet backbone under the fine-tuned head; alpha = 1:
the fine-tuned model unchanged. The pretrained backbone is the one the run's config builds with its ImageNet
weights (``build_model(cfg.model, ...)`` before any ``model.init_from``), i.e. the trainer's teacher. Floating
buffers (BatchNorm running statistics) are interpolated as the weights; integer buffers
(``num_batches_tracked``) are the fine-tuned ones. The frozen ImageNet head sits inside the backbone and is the
same in both, so it is unchanged. Segmentation: FCN-8s's fc6/fc7 copies live in its dense head and stay
fine-tuned.

Reconstruction choices: the paper's grid of alpha is evaluated on source-val (the synthetic held-out split) to
choose alpha (:func:`choose_alpha`); real-domain labels are never used for the choice.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from asg.errors import AsgError

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float in [0, 1]; AsgError otherwise."""
    value = float(alpha)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise AsgError(f"WiSE-FT alpha must be in [0, 1] (0 = pretrained backbone, 1 = fine-tuned), got {alpha!r}")
    return value


@torch.no_grad()
def interpolate_state(pretrained: dict[str, Tensor], finetuned: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * pretrained + alpha * finetuned`` for each floating tensor; other tensors from ``finetuned``.

    Both state dicts need the same keys and shapes (AsgError naming the first difference). ``torch.lerp`` is
    exact at the ends: alpha = 0 gives ``pretrained`` and alpha = 1 ``finetuned`` bit for bit.
    """
    alpha = check_alpha(alpha)
    if pretrained.keys() != finetuned.keys():
        diff = sorted(set(pretrained) ^ set(finetuned))
        raise AsgError(f"WiSE-FT: the pretrained and fine-tuned backbones have different tensors (first: {diff[0]})")
    out: dict[str, Tensor] = {}
    for key, ft in finetuned.items():
        pre = pretrained[key]
        if pre.shape != ft.shape:
            raise AsgError(f"WiSE-FT: {key} has shape {tuple(pre.shape)} pretrained but {tuple(ft.shape)} fine-tuned")
        if ft.is_floating_point():
            out[key] = torch.lerp(pre.to(ft.device, ft.dtype), ft, alpha)
        else:
            out[key] = ft.clone()
    return out


@torch.no_grad()
def interpolate_backbone(
    model: nn.Module,
    pretrained_backbone_state: dict[str, Tensor],
    alpha: float,
    finetuned_backbone_state: dict[str, Tensor] | None = None,
) -> None:
    """Set ``model.backbone`` (in place) to the WiSE-FT interpolation at ``alpha``; the task head is untouched.

    ``pretrained_backbone_state``: the ImageNet backbone's ``state_dict()``. ``finetuned_backbone_state``: the
    fine-tuned backbone's (default: ``model.backbone`` as it is now; pass a saved copy to evaluate several alphas
    on one model, since this call overwrites the backbone).
    """
    backbone = cast(nn.Module, model.backbone)  # torch types Module.__getattr__ as Tensor | Module
    finetuned = finetuned_backbone_state if finetuned_backbone_state is not None else backbone.state_dict()
    backbone.load_state_dict(interpolate_state(pretrained_backbone_state, finetuned, alpha))


def choose_alpha(scores: dict[float, float]) -> float:
    """The alpha of the highest score (e.g. source-val mean-class accuracy or mIoU per alpha).

    Ties go to the first alpha in the dict's order, as the demo's other grids pick the first of equal scores in
    grid order; with the ascending default grid that is the smallest alpha, the one closest to the pretrained
    backbone. A NaN score never wins. AsgError for an empty dict.
    """
    if not scores:
        raise AsgError("choose_alpha needs at least one (alpha, score) pair")
    # max() keeps the first of equal keys
    return float(max(scores, key=lambda a: -math.inf if math.isnan(scores[a]) else scores[a]))
