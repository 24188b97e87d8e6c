"""Image -> tensor conversion shared by every dataset: resize the short side, centre-crop, scale to [0, 1].

No normalisation here: the model applies its own (ImageNet mean/std or EfficientNet's ``(x - 127) / 128``).
The geometry matches torchvision's ``Resize(size)`` + ``CenterCrop(size)`` on PIL images.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the short side is ``size`` (bilinear, antialiased when shrinking), then centre-crop ``size``²."""
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        if (new_w, new_h) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    return img


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image (any mode) -> FloatTensor [3, size, size] RGB in [0, 1]; grayscale is replicated to 3 channels."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    img = resize_center_crop(img, size)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    if arr.ndim == 2:
        return (arr.float().div_(255.0)).unsqueeze(0).expand(3, -1, -1).contiguous()
    return arr.permute(2, 0, 1).float().div_(255.0)


def array_to_tensor(arr: np.ndarray, size: int) -> torch.Tensor:
    """uint8 array [H, W] (gray) or [H, W, 3] (RGB) -> FloatTensor [3, size, size] in [0, 1]."""
    return pil_to_tensor(Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)), size)


class ResizeCrop:
    """Picklable default transform: ``PIL.Image -> FloatTensor [3, size, size]`` in [0, 1]."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_tensor(img, self.size)

    def __repr__(self) -> str:
        return f"ResizeCrop({self.size})"
