"""Training precision (``train.precision``) and the optional ``torch.compile`` (``train.compile``).

``bf16`` and ``fp16`` run the forward passes (student and teacher) under ``torch.autocast``; weights, optimizer
state and the loss reduction stay fp32 (autocast runs softmax, log-softmax and the KL in fp32). ``fp16`` also
scales the loss with a ``torch.amp.GradScaler``: a step whose gradients overflow is skipped and the scale halved,
as usual with fp16; many overflowing steps in a row stop the run as diverged. Evaluation always runs in fp32, so
the reported numbers do not depend on the training precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from asg.errors import AsgError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_OVERFLOW_STREAK = 25  # fp16: this many skipped steps in a row (loss scale / 2^25) is divergence, not noise


class Precision:
    """Autocast and gradient scaling of ``train.precision`` on ``device``."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.dtype = DTYPES[name]
        if self.dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise AsgError(
                f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support: "
                "use train.precision=fp16 (with loss scaling) or fp32"
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
        self.overflow_streak = 0  # consecutive fp16 steps skipped for non-finite gradients

    def autocast(self) -> torch.autocast:
        """The forward passes' context: autocast to bf16/fp16, or a disabled one for fp32."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaling else {}, "overflow_streak": self.overflow_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss scale (a checkpoint of another precision leaves the fresh scaler as it is)."""
        if self.scaling and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self.overflow_streak = int(state.get("overflow_streak", 0))

    def describe(self, channels_last: bool, compile_backend: str | None) -> dict[str, Any]:
        """What ``versions.json`` records about how the run computed."""
        return {
            "precision": self.name,
            "autocast_dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "grad_scaler": self.scaling,
            "channels_last": channels_last,
            "compile": compile_backend,
        }


def compile_modules(backend: str, *modules: nn.Module) -> None:
    """``torch.compile`` each module in place (``nn.Module.compile``): parameters, state-dict keys and layer groups
    stay those of the module, so optimizers, checkpoints and L2O see no wrapper."""
    try:
        import torch._dynamo  # noqa: F401  (fails early on a build without the compiler)
    except ImportError as exc:
        raise AsgError(f"train.compile=true but this PyTorch cannot compile ({exc}); set train.compile=false") from None
    for module in modules:
        module.compile(backend=backend)
