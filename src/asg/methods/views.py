"""The two augmented views of CSG (query and key), drawn per image from seeds, applied a batch at a time.

``randaugment``: torchvision's RandAugment (``transforms.v2.RandAugment``: 14 operations, ``num_ops`` of them per
image at ``magnitude`` of 31 bins, signed operations negated with probability 1/2), drawn independently for the
query and the key view of every image, as CSG trains on VisDA-17 (RandAugment with N = 1, M = 6). The images of a
batch that drew the same operation and sign go through it together (one call of torchvision's operation on the
group instead of one per image: the same result, about 10x faster on the CPU).

``jitter``: the query is the image itself and the key gets a colour jitter (brightness, contrast, saturation by a
factor in [1 - s, 1 + s], hue by up to s, s = ``strength``, in a random order), as CSG's GTA5 loader makes the
key view; nothing geometric, so a segmentation label stays aligned with the query and the key's patches with the
query's.

Every random choice comes from a generator seeded by (step, dataset index, view), not from the global RNG: the
views of an image at a step are the same after a resume, on any number of processes, and in the trainer's extra
forward pass before a checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

AUGMENTS = ("randaugment", "jitter", "none")
QUERY, KEY = 0, 1


def view_generator(step: int, index: int, view: int) -> torch.Generator:
    """The generator of one image's random choices: seeded by (step, dataset index, view)."""
    seed = ((int(step) * 1_000_003 + int(index)) * 8 + view) % (2**63)
    return torch.Generator().manual_seed(seed)


class RandAugmentBatch:
    """torchvision's RandAugment (``num_ops``, ``magnitude``) with per-image draws from seeded generators."""

    def __init__(self, num_ops: int = 1, magnitude: int = 6) -> None:
        from torchvision.transforms import v2

        self.num_ops, self.magnitude = num_ops, magnitude
        self.tv = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.ops = list(self.tv._AUGMENTATION_SPACE.items())  # name -> (magnitudes(num_bins, h, w), signed)

    def draw(self, gen: torch.Generator) -> list[tuple[int, bool]]:
        """``num_ops`` (operation index, negate) pairs, drawn as torchvision draws them."""
        out = []
        for _ in range(self.num_ops):
            op = int(torch.randint(len(self.ops), (1,), generator=gen))
            out.append((op, bool(torch.rand((), generator=gen) <= 0.5)))
        return out

    def apply(self, x: Tensor, op: int, negate: bool) -> Tensor:
        """Operation ``op`` on images ``x`` [n, 3, H, W] in [0, 1] (torchvision's own implementation)."""
        name, (magnitudes_fn, signed) = self.ops[op]
        magnitudes = magnitudes_fn(self.tv.num_magnitude_bins, x.shape[-2], x.shape[-1])
        magnitude = 0.0
        if magnitudes is not None and magnitudes.ndim > 0:
            magnitude = float(magnitudes[self.magnitude])
            if signed and negate:
                magnitude = -magnitude
        fill: Any = self.tv._fill
        return self.tv._apply_image_or_video_transform(x, name, magnitude, self.tv.interpolation, fill)

    def __call__(self, x: Tensor, gens: list[torch.Generator]) -> Tensor:
        """Each image of ``x`` [B, 3, H, W] (in [0, 1]) through its own draws (``gens[i]``)."""
        draws = [self.draw(g) for g in gens]
        out = x
        for k in range(self.num_ops):
            groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
            for i, d in enumerate(draws):
                groups[d[k]].append(i)
            nxt = out.clone()
            for (op, negate), members in groups.items():
                idx = torch.tensor(members, device=x.device)
                nxt[idx] = self.apply(out[idx], op, negate).to(nxt.dtype)
            out = nxt
        return out


def color_jitter(x: Tensor, gens: list[torch.Generator], strength: float) -> Tensor:
    """Each image of ``x`` [B, 3, H, W] in [0, 1] colour-jittered with its generator (see the module docstring)."""
    from torchvision.transforms.v2 import functional as F

    if strength <= 0:
        return x
    out = []
    s = float(strength)
    for img, g in zip(x, gens):
        factors = (1 + s * (2 * torch.rand(3, generator=g) - 1)).tolist()
        hue = float(min(s, 0.5) * (2 * torch.rand((), generator=g) - 1))
        for j in torch.randperm(4, generator=g).tolist():
            if j == 0:
                img = F.adjust_brightness(img, factors[0])
            elif j == 1:
                img = F.adjust_contrast(img, factors[1])
            elif j == 2:
                img = F.adjust_saturation(img, factors[2])
            else:
                img = F.adjust_hue(img, hue)
        out.append(img)
    return torch.stack(out)


class Views:
    """``(query, key) = views(x, idx, step)``: the two views of a batch ``x`` [B, 3, H, W] in [0, 1] whose
    dataset indices are ``idx`` [B] at optimizer step ``step``; ``augment`` one of ``AUGMENTS``."""

    def __init__(self, augment: str, num_ops: int = 1, magnitude: int = 6, jitter: float = 0.4) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown CSG augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
        self.augment, self.jitter = augment, jitter
        self.rand_augment = RandAugmentBatch(num_ops, magnitude) if augment == "randaugment" else None

    def __call__(self, x: Tensor, idx: Tensor, step: int) -> tuple[Tensor, Tensor]:
        if self.augment == "none":
            return x, x
        index = [int(i) for i in idx.tolist()]
        keys = [view_generator(step, i, KEY) for i in index]
        if self.augment == "jitter":
            return x, _like(color_jitter(_wide(x), keys, self.jitter), x)
        assert self.rand_augment is not None
        queries = [view_generator(step, i, QUERY) for i in index]
        xf = _wide(x)
        return _like(self.rand_augment(xf, queries), x), _like(self.rand_augment(xf, keys), x)


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _like(view: Tensor, x: Tensor) -> Tensor:
    """``view`` in ``x``'s dtype and memory format (channels_last batches stay channels_last)."""
    view = view.to(x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        view = view.contiguous(memory_format=torch.channels_last)
    return view
