"""The tests' shared datasets, models and file fixtures: one module that test files (and the scripts that tests run
in subprocesses, after putting this folder on ``sys.path``) import, instead of importing each other.

Importing it imports torch and asg but not pytest, so a spawned script stays light."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from asg.data import DataBundle
from asg.engine.callbacks import Callback
from asg.models.classifier import ModelOutput

# ----------------------------------------------------------------------------------------- the tiny training run


class RandomImages(Dataset):
    """Fixed random images whose label is encoded in a bright patch position (learnable, tiny)."""

    def __init__(self, n: int, num_classes: int = 3, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g).tolist()
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.3
        for i, y in enumerate(self.labels):
            self.images[i, :, :8, 8 * y : 8 * y + 8] = 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def tiny_data() -> DataBundle:
    """48 training images of 3 classes, a source-val set and a 'real' set of 12 each (the ``tiny_bundle`` fixture)."""
    sets = {"source_val": RandomImages(12, seed=1), "real": RandomImages(12, seed=2)}
    return DataBundle(RandomImages(48, seed=0), sets, "source_val", ["a", "b", "c"])


# the tiny run of the trainer tests (also used by the spawned processes of test_distributed and the fault tests)
TINY_OVERRIDES = [
    "data.batch_size=8",
    "data.image_size=32",
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.progress=false",
    "optim.lr=0.05",
    "optim.warmup_steps=0",
    "eval.retention=false",
    "name=tiny",
    "method.name=asg",
    "method.kl_weight=1",
]


class CrashAt(Callback):
    """Stop a run as a crash would, when the trainer is about to take step ``step + 1``: raise ``error``
    (``KeyboardInterrupt`` by default), or with ``kill=True`` die by SIGKILL (no handler, no clean-up);
    ``when(trainer)``: only in the trainers it holds for (e.g. one round of an adaptation, one rank)."""

    def __init__(self, step: int, error: type[BaseException] = KeyboardInterrupt, kill: bool = False, when=None):
        self.step, self.error, self.kill, self.when = step, error, kill, when

    def on_step_start(self, trainer, batch) -> None:
        if trainer.step == self.step and (self.when is None or self.when(trainer)):
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise self.error(f"CrashAt({self.step})")


class ImagesLabelsRaise(Dataset):
    """Target images whose labels raise on any access: adaptation must never read them."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base.images[i]

    @property
    def labels(self):
        raise AssertionError("a target label was read")


# ----------------------------------------------------------------------------------------- segmentation


class Scenes(Dataset):
    """Two-class scenes: the red left half is class 1. ``label_scale``: labels at that multiple of the image size
    (2 = what ``data.eval_resize`` gives: images resized, labels kept at their native size)."""

    def __init__(self, n: int, size: int = 32, label_scale: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.2
        self.images[:, 0, :, : size // 2] += 0.8
        h = size * label_scale
        self.label = torch.zeros(h, h, dtype=torch.long)
        self.label[:, : h // 2] = 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.label


class SizedScenes(Dataset):
    """Images of the given ``sizes`` in two colour halves (left red: class 1); labels at twice the image resolution
    (as eval_resize makes them), their first row unlabelled (255)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        h, w = self.sizes[i]
        img = torch.zeros(3, h, w)
        img[0, :, : w // 2] = 1.0  # left half red -> class 1, right half black -> class 0
        label = torch.zeros(2 * h, 2 * w, dtype=torch.long)
        label[:, :w] = 1
        label[0] = 255
        return img, label


class RedIsOne(nn.Module):
    """A segmenter that is right on ``SizedScenes``: class 1 where the red channel is above 0.5."""

    def forward(self, x):
        logits = torch.stack([torch.zeros_like(x[:, 0]), 10 * (x[:, 0] - 0.5)], dim=1)
        return ModelOutput(logits, torch.zeros(len(x), 1000), torch.zeros(len(x), 8))


# ----------------------------------------------------------------------------------------- segmentation files

H, W = 8, 12  # the size of the fixture images of the segmentation datasets


def write_png16(path: Path, arr: np.ndarray) -> None:
    """16-bit RGB PNG (the SYNTHIA GT/LABELS format), written by hand: PIL cannot write it."""
    arr = np.asarray(arr, dtype=">u2")
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def save_image(path: Path, seed: int, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def random_ids(seed: int, values: list[int], h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).choice(values, size=(h, w)).astype(np.int64)


def tree_hash(root: Path) -> str:
    """One hash of a folder's names and file contents."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- teacher-logit cache

N, SIZE, BATCH = 20, 8, 8  # images, their size and the batch of the cache tests
ALL = torch.arange(N)


class CountingTeacher(nn.Module):
    """[B, 3, 8, 8] -> [B, 1000] logits (flatten + Linear, fixed seed); counts calls, can fail on call ``fail_on``."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(3 * SIZE * SIZE, 1000)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(1000, 3 * SIZE * SIZE, generator=g) * 0.3 * scale)
            self.fc.bias.copy_(torch.randn(1000, generator=g) * scale)
        self.calls = 0
        self.fail_on: int | None = None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("teacher crashed")
        return self.fc(x.flatten(1))


def digits(seed: int = 0, n: int = N, size: int = SIZE):
    """``n`` random 8x8 digit-like images (an ``ArrayDataset`` at ``size``)."""
    from asg.data.classification.digits import ArrayDataset

    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8), np.arange(n) % 10, size)


def exact_logits(ds, teacher) -> torch.Tensor:
    """The teacher's logits over ``ds`` in the same batches as the cache builds (bitwise-comparable)."""
    with torch.no_grad():
        chunks = [torch.stack([ds[i][0] for i in range(s, min(s + BATCH, len(ds)))]) for s in range(0, len(ds), BATCH)]
        out = torch.cat([teacher(x) for x in chunks])
    teacher.calls = 0
    return out


def build_cache(root, ds, teacher, storage="fp32", k=32):
    """(key, cache) of ``ds`` under ``root``: built, or opened when complete."""
    from asg.engine.teacher.cache import TeacherLogitCache
    from asg.engine.teacher.keys import cache_key

    key = cache_key(ds, "size=8", teacher, storage, k)
    cache = TeacherLogitCache.build_or_open(
        root, key, ds, teacher, storage=storage, k=k, batch_size=BATCH, description="test digits"
    )
    return key, cache


# ----------------------------------------------------------------------------------------- foundation backbones

TINY_VIT = {"depth": 4, "embed_dim": 64, "num_heads": 2}  # timm kwargs of the tiny DINOv2 / CLIP image towers


def dinov2_files(folder: Path, grid: int = 6) -> tuple[str, str]:
    """A tiny DINOv2 backbone file in the original layout (mask_token, pos_embed at another grid) and its linear head
    (``weight`` [1000, 2 x 64], ``bias``)."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=14 * grid, **TINY_VIT)
    state = net.state_dict()
    state["mask_token"] = torch.zeros(1, 64)
    backbone = folder / "dinov2_vits14_pretrain.pth"
    torch.save(state, backbone)
    head = folder / "dinov2_vits14_linear_head.pth"
    torch.save({"weight": torch.randn(1000, 128) * 0.05, "bias": torch.randn(1000) * 0.1}, head)
    return str(backbone), str(head)


def tiny_clip(folder: Path):
    """A tiny open_clip CLIP (vision width 64, 4 layers, patch 16, 64 px; text width 32) saved as a state dict,
    and its config as JSON."""
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg, quick_gelu=True).eval()
    path = folder / "open_clip_model.pth"
    torch.save(model.state_dict(), path)
    cfg_path = folder / "tiny_clip.json"
    cfg_path.write_text(json.dumps(cfg))
    return model, str(path), str(cfg_path)


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of the run folder ``run`` (e.g. the ``erm_run`` fixture's) at ``dst``, for a test that changes it."""
    import shutil

    shutil.copytree(run, dst, symlinks=True)
    return dst
