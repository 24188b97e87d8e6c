"""Weights read from a file must be finite: a NaN in a loaded tensor makes every prediction the same class (an
evaluation "at chance" with exit 0), so each loader refuses it, naming the file and the tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from asg.errors import WeightsError


def non_finite(state: Mapping[str, object]) -> list[str]:
    """``"name (n NaN, m Inf)"`` for each floating tensor of ``state`` holding NaN or infinite values. An additive
    attention mask (a key ending in ``attn_mask``) may hold -inf by design; its NaN still counts."""
    out = []
    for key, value in state.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if bool(torch.isfinite(value).all()):
            continue
        nan = int(torch.isnan(value).sum())
        inf = 0 if key.endswith("attn_mask") else int(torch.isinf(value).sum())
        counts = [f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n]
        if counts:
            out.append(f"{key} ({', '.join(counts)})")
    return out


def check_finite(state: Mapping[str, object], source: str) -> None:
    """WeightsError when a floating tensor of ``state`` (read from ``source``, e.g. "weight file X") holds NaN or
    infinite values."""
    bad = non_finite(state)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise WeightsError(
            f"{source} holds non-finite values (NaN or Inf) in {len(bad)} tensor(s): {', '.join(bad[:3])}{more}; "
            "a network with them predicts nonsense (one class everywhere): the file is damaged or was saved from a "
            "diverged run, use another"
        )
