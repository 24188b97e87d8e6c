"""Small shared helpers: progress bars, seeding, device choice, versions."""

from __future__ import annotations

import platform
import random
import sys
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from asg.config_checks import DEVICE_PATTERN
from asg.errors import AsgError, ConfigError


def progress(it: Iterable, desc: str = "", enabled: bool = True, **kwargs) -> Iterable:
    """A tqdm progress bar (to stderr), or the bare iterable when disabled."""
    return tqdm(it, desc=desc, dynamic_ncols=True, **kwargs) if enabled else it


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The torch device of ``train.device`` (auto | cpu | cuda | cuda:N); AsgError if the GPU is not there."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AsgError(
                f"train.device={name} but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                "use train.device=auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise AsgError(
                f"train.device={name} but only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1}); "
                "use train.device=cuda or a visible index"
            )
    return device


def versions() -> dict[str, str]:
    """Versions of Python, the package and the libraries that change results."""
    import torchvision

    import asg

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "asg": asg.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out
