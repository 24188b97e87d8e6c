"""Atomic checkpoint files: model weights in safetensors, trainer state in a weights-only torch file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file
from torch import nn

from asg.errors import AsgError, WeightsError
from asg.io import atomic_write, torch_load_problem
from asg.models.finite import check_finite


def save_weights(
    weights: nn.Module | dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a model's (or a state dict's) tensors to a safetensors file, atomically."""
    state_dict = weights.state_dict() if isinstance(weights, nn.Module) else weights
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata))


def load_weights(model: nn.Module, path: Path, data: bytes | None = None) -> None:
    """Load a safetensors file written by ``save_weights`` into ``model`` (``data``: its bytes, read earlier).

    Raises WeightsError (one line, naming the file) when it is missing, unreadable, corrupt or truncated, or
    does not fit the model (other keys or shapes: another backbone, head size or number of classes).
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        state = load_file(str(path)) if data is None else load(data)
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:
        detail = " ".join(str(exc).split())
        raise WeightsError(f"cannot read checkpoint {path}: the file is corrupt or truncated ({detail})") from None
    check_finite(state, f"checkpoint {path}")
    upgrade = getattr(model, "upgrade_state_dict", None)  # weights of an earlier release's key layout
    if upgrade is not None:
        state = upgrade(state)
    own = model.state_dict()
    if getattr(model, "saves_trainable_only", False):  # LoRA / frozen backbone: the rest came from the recipe
        trained = cast(Any, model).trainable_state_dict()
        own = {k: v for k, v in own.items() if k in trained}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise WeightsError(
            f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]} "
            "(was it trained with another backbone or number of classes?)"
        )
    wrong = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if wrong:
        shapes = "; ".join(
            f"{k} is {list(state[k].shape)} in the file but {list(own[k].shape)} in the model" for k in wrong[:3]
        )
        cause = (
            "another number of classes or model.hidden_dim"
            if all(k.startswith("head.") for k in wrong)
            else "another backbone (model.backbone)"
        )
        raise WeightsError(
            f"{path} does not fit the model: {len(wrong)} tensor(s) differ in shape: {shapes} "
            f"(was it trained with {cause}?)"
        )
    model.load_state_dict(state, strict=len(own) == len(model.state_dict()))


def weights_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` holds (``checkpoint_state_dict``: all, or for LoRA what trains)."""
    return cast(Any, model).checkpoint_state_dict() if hasattr(model, "checkpoint_state_dict") else model.state_dict()


def save_state(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """Load trainer state without executing pickled code (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AsgError(f"cannot resume: {path} does not exist (no checkpoint was written in this run folder)") from None
    except Exception as exc:  # corrupt or foreign file
        raise AsgError(f"cannot read checkpoint state {path}: {torch_load_problem(exc)}") from None
