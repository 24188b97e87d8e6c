"""The storage modes of the teacher-logit cache: how a batch of logits becomes the rows of the data files and back.

``fp32`` (exact) and ``fp16`` store the logits; ``topk`` stores the k largest log-probabilities, their classes,
the log-sum-exp and the log of the rest mass, and spreads the rest mass uniformly over the other classes when it
reconstructs (see :mod:`asg.engine.teacher.cache` for the files). Also here: the cache's error type, the checks of
a storage mode and its k, and the KL that measures what a mode loses.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from asg.errors import AsgError

STORAGES = ("fp32", "fp16", "topk")
FORMAT_VERSION = 1
LOGP_FLOOR = -1.0e4  # log-prob of classes whose share underflows: finite, so 0 * (logp - floor) stays 0


class TeacherCacheError(AsgError):
    """A teacher-logit cache that is missing, incomplete, corrupt or built for something else."""


def check_storage(storage: str, k: int) -> int:
    """The k that counts for ``storage`` (0 unless "topk"); TeacherCacheError for an unknown mode or a bad k."""
    if storage not in STORAGES:
        raise TeacherCacheError(f"teacher cache storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage != "topk":
        return 0
    if not 1 <= int(k) <= 32768:
        raise TeacherCacheError(f"teacher cache top-k must be in [1, 32768], got {k}")
    return int(k)


def _layout(storage: str, n: int, c: int, k: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of each data file."""
    if storage != "topk":
        return {"logits": (np.dtype(np.float32 if storage == "fp32" else np.float16), (n, c))}
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    return {
        "topk_logp": (f16, (n, k)),
        "topk_idx": (np.dtype(np.int16), (n, k)),
        "lse": (f32, (n,)),
        "rest": (f32, (n,)),
    }


def _encode(logits: Tensor, storage: str, k: int) -> dict[str, np.ndarray]:
    """Logits [B, C] -> the rows of each data file."""
    z = logits.detach().float().cpu()
    if storage == "fp32":
        return {"logits": z.numpy()}
    if storage == "fp16":
        half = z.half()
        if not bool(torch.isfinite(half).all()):
            raise TeacherCacheError("teacher logits exceed the float16 range (|z| > 65504): use storage fp32 or topk")
        return {"logits": half.numpy()}
    logp = torch.log_softmax(z.double(), dim=1)
    top, idx = logp.topk(k, dim=1)
    rest = logp.scatter(1, idx, -math.inf).logsumexp(dim=1)  # -inf when k == C
    return {
        "topk_logp": top.clamp(min=LOGP_FLOOR).half().numpy(),
        "topk_idx": idx.short().numpy(),
        "lse": z.double().logsumexp(dim=1).float().numpy(),
        "rest": rest.float().numpy(),
    }


def _decode(rows: dict[str, np.ndarray], storage: str, num_classes: int) -> Tensor:
    """Rows of each data file -> logits [B, C] float32 (topk: reconstructed log-probs)."""
    if storage != "topk":
        return torch.from_numpy(np.asarray(rows["logits"], dtype=np.float32))
    top = torch.from_numpy(np.asarray(rows["topk_logp"], dtype=np.float32))
    idx = torch.from_numpy(np.asarray(rows["topk_idx"], dtype=np.int64))
    out = torch.full((len(top), num_classes), LOGP_FLOOR)
    if top.shape[1] < num_classes:
        rest = torch.from_numpy(np.asarray(rows["rest"], dtype=np.float32))
        out[:] = (rest - math.log(num_classes - top.shape[1])).clamp(min=LOGP_FLOOR)[:, None]
    return out.scatter_(1, idx, top)


def kl_rows(exact: Tensor, stored: Tensor) -> Tensor:
    """KL(softmax(exact) || softmax(stored)) per row, both [B, C] -> [B] float64 (nats)."""
    lp, lq = torch.log_softmax(exact.double(), dim=1), torch.log_softmax(stored.double(), dim=1)
    return (lp.exp() * (lp - lq)).sum(dim=1)


def measure_storage_error(exact_logits: Tensor, storage: str, k: int = 32) -> dict[str, float]:
    """``{"kl_max", "kl_mean"}`` of KL(p_exact || p_stored) over the rows of ``exact_logits`` [N, C]."""
    k = check_storage(storage, k)
    kl = kl_rows(exact_logits, _decode(_encode(exact_logits, storage, k), storage, exact_logits.shape[1]))
    return {"kl_max": float(kl.max()), "kl_mean": float(kl.mean())}
