"""The toy segmentation benchmark, embedded and offline: "digit scenes" (the street scenes are
:mod:`asg.data.segmentation.street_scenes`).

Synthetic (train + held-out "synthetic" split): 2-4 font-rendered digits (matplotlib's fonts, found by
:func:`asg.data.classification.digits.digit_fonts`) with random font, stroke, size, position, small rotation and
colour, pasted on procedural textures (smooth colour noise, stripes, gradients, blobs). Real ("mnist_photos",
evaluation only): 2-4 handwritten MNIST-5k digits pasted on random crops of the photos shipped in scikit-image /
scikit-learn (:mod:`asg.data.photos`). Nothing is downloaded.

Classes: 0 = background, 1..10 = digits "0".."9". Labels come from each glyph's coverage ``alpha`` in [0, 1]:
``alpha >= CORE`` (0.5) is the digit's class, the anti-aliased edge ``EDGE < alpha < CORE`` is 255 (ignored), and
fainter pixels keep the label underneath. Digits are pasted in order, so a later digit occludes an earlier one.
Each stroke colour contrasts with the local background (dark on light, light on dark), in both domains.

No flip, whatever ``cfg.flip`` says: a mirrored "2", "3" or "7" is no longer that digit, and real digits are never
mirrored. Training samples are therefore fixed (``has_augmentation=False``) and the teacher cache works.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from asg.config import DataConfig
from asg.data.bundle import IGNORE_INDEX, DataBundle, LabeledSubset, stratified_split
from asg.data.classification import digits
from asg.data.classification.pen_digits import pen_digit
from asg.data.npz_cache import cached_arrays
from asg.data.photos import photo_files
from asg.data.targets import ImagesOf, split_halves

CLASSES = ["background", *digits.CLASSES]
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip # colour table
SCENES_VERSION = 5  # bump when rendering changes: it is part of the cache keys (v5: docs/demo/scenes_design.md)
CORE, EDGE = 0.5, 0.15  # glyph coverage thresholds: >= CORE is the digit, (EDGE, CORE) is ignored (255)
SOURCE_VAL, REAL_SET = "synthetic", "mnist_photos"  # set names (source-val as in the digits benchmark)
NUM_REAL, REAL_SEED = 500, 0  # the real set is fixed: always the same 500 scenes at a given image size
DIGIT_HEIGHT = (0.3, 0.55)  # digit height as a fraction of the image side
DIGITS_PER_SCENE = (2, 4)  # fewest and most digits in a scene (both domains)
PEN_FRACTION = 0.6  # synthetic digits drawn with a pen (asg.data.classification.pen_digits); the others come from fonts
DISTRACTORS_PER_SCENE = 2  # most distractor letters in a synthetic scene
PHOTO_CROP = (0.25, 0.9)  # a real background: a square crop of this fraction of a photo's short side
# distractor letters (labelled background): none that a font or a hand draws like a digit (O, I, l, S, Z, B, G, b,
# g, q, ...)
DISTRACTORS = "ACEFHKMNPRTUVWXYacefhkmnrtuvwxy"
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class SceneDataset(Dataset):
    """uint8 images [N, S, S, 3] and masks [N, S, S] -> ``(FloatTensor [3, S, S] in [0, 1], LongTensor [S, S])``.

    ``ids``: each scene's index in the rendered set. Evaluation sets also have ``labels`` (int64 [N], the scene's
    dominant digit class) so :func:`asg.data.balanced_subset` can cap them; the training set has none, since a
    per-image label is no target here (``DataBundle.warnings`` then has nothing to check).
    """

    def __init__(self, images: np.ndarray, masks: np.ndarray, ids: np.ndarray, with_labels: bool = False) -> None:
        self.images, self.masks, self.ids = images, masks, np.asarray(ids, dtype=np.int64)
        if with_labels:
            self.labels = dominant_class(masks)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image(i), torch.from_numpy(self.masks[i].astype(np.int64))

    def image(self, i: int) -> torch.Tensor:
        """Scene i alone (its mask is not read), FloatTensor [3, S, S]."""
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)


def dominant_class(masks: np.ndarray) -> np.ndarray:
    """masks uint8 [N, S, S] -> int64 [N]: the digit class (1..10) with the most pixels in each scene."""
    counts = np.stack([np.bincount(m.ravel(), minlength=256)[1:11] for m in masks]) if len(masks) else np.zeros((0, 10))
    return (counts.argmax(1) + 1).astype(np.int64)


# --------------------------------------------------------------------------- backgrounds


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """float32 [h0, w0] -> [h, w], bilinear (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(arr.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A procedural background, float32 [size, size, 3] in [0, 1]: smooth colour noise, stripes, a gradient,
    multi-octave noise, "dead leaves" (the occlusion statistics of natural images) or soft blobs, in random
    colours, plus a little pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(6)
    c1, c2 = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    if kind == 0:  # smooth colour noise
        k = int(rng.integers(2, 7))
        bg = np.stack([_resize(rng.random((k, k), dtype=np.float32), size, size) for _ in range(3)], -1)
    elif kind in (1, 2):  # stripes or a linear gradient between two colours
        theta = rng.uniform(0, np.pi)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1.5, 6.0) * u + rng.uniform(0, 2 * np.pi)) if kind == 1 else u
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = c1 + t[..., None] * (c2 - c1)
    elif kind == 4:  # multi-octave (1/f-like) colour noise: the clutter statistics of natural images
        bg = np.zeros((size, size, 3), np.float32)
        for octave in range(4):
            k = 2 ** (octave + 2)
            layer = np.stack([_resize(rng.random((k, k), dtype=np.float32), size, size) for _ in range(3)], -1)
            bg += layer / 2**octave
        bg = c1 + (bg / bg.max() - 0.5) * (c2 - c1) * 1.5
    elif kind == 5:  # "dead leaves": overlapping discs and boxes with power-law sizes (natural-image statistics)
        img = Image.new("RGB", (size, size), tuple(int(255 * v) for v in c1))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(30, 120))):
            r = size * 0.03 / max(float(rng.random()), 0.03) ** 0.7  # many small shapes, a few large ones
            cy, cx = rng.uniform(-0.1, 1.1, size=2) * size
            fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=fill)
        bg = np.asarray(img, np.float32) / 255.0
    else:  # soft blobs of random colours on a plain colour
        bg = np.broadcast_to(c1, (size, size, 3)).copy()
        for _ in range(int(rng.integers(3, 9))):
            cy, cx, r = rng.random(), rng.random(), rng.uniform(0.08, 0.3)
            m = np.clip((r - np.hypot(yy - cy, xx - cx)) / 0.03, 0.0, 1.0)[..., None]
            bg += m * (rng.random(3, dtype=np.float32) - bg)
    bg = bg + rng.standard_normal(bg.shape, dtype=np.float32) * rng.uniform(0.0, 0.04)
    return np.clip(bg, 0.0, 1.0).astype(np.float32)


def photo_crop(rng: np.random.Generator, photos: Sequence[np.ndarray], size: int) -> np.ndarray:
    """A random square crop (``PHOTO_CROP`` of the short side) of a random photo, resized: float32 [size, size, 3]."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.uniform(*PHOTO_CROP) * min(h, w))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(crop, np.float32) / 255.0


# --------------------------------------------------------------------------- glyphs and compositing


def _crop_ink(alpha: np.ndarray) -> np.ndarray:
    ink = alpha > 0.02
    if not ink.any():
        return alpha
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_glyph(alpha: np.ndarray, height: float, size: int, angle: float = 0.0) -> np.ndarray:
    """Rotate ``alpha`` (float [h, w]) by ``angle`` degrees, crop to ink and resize to ``height`` pixels tall
    (narrower than ``size``): float32 [h', w'] in [0, 1]."""
    if angle:
        alpha = _crop_ink(np.asarray(Image.fromarray(alpha, mode="F").rotate(angle, Image.Resampling.BILINEAR, True)))
    h, w = alpha.shape
    scale = min(height / h, (size - 1) / w)
    return np.clip(_resize(alpha, max(1, round(w * scale)), max(1, round(h * scale))), 0.0, 1.0)


def paste_digit(
    image: np.ndarray, mask: np.ndarray, alpha: np.ndarray, top: int, left: int, colour: np.ndarray, cls: int
) -> None:
    """In place: blend ``colour`` (float [3]) into ``image`` (float [S, S, 3]) with coverage ``alpha`` (float
    [h, w]) at (top, left), and label ``mask`` (uint8 [S, S]): ``cls`` where alpha >= CORE, 255 on the edge."""
    h, w = alpha.shape
    region, labels = image[top : top + h, left : left + w], mask[top : top + h, left : left + w]
    region += alpha[..., None] * (colour - region)
    if cls > 0:  # a digit; class 0 is a distractor: its core is background, its edge keeps the label below
        labels[(alpha > EDGE) & (alpha < CORE)] = IGNORE_INDEX
    labels[alpha >= CORE] = cls


def _place(
    rng: np.random.Generator, boxes: list[tuple[int, int, int, int]], h: int, w: int, size: int
) -> tuple[int, int]:
    """A position for an h x w glyph: the least overlapping of up to 10 random tries (stops below 15%)."""
    best, best_overlap = (0, 0), np.inf
    for _ in range(10):
        top, left = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
        overlap = sum(
            max(0, min(top + h, t + bh) - max(top, t)) * max(0, min(left + w, lft + bw) - max(left, lft))
            for t, lft, bh, bw in boxes
        ) / (h * w)
        if overlap < best_overlap:
            best, best_overlap = (top, left), overlap
        if overlap < 0.15:
            break
    boxes.append((*best, h, w))
    return best


def compose(
    rng: np.random.Generator, background: np.ndarray, glyphs: Sequence[tuple[np.ndarray, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``glyphs`` ((coverage float [h, w], class 1..10), in order) on ``background`` (float [S, S, 3]), each
    at a random, little-overlapping place, in a colour contrasting with what lies under it (its luminance at least
    0.35 away). Returns (uint8 image [S, S, 3], uint8 mask [S, S])."""
    size = background.shape[0]
    image, mask = background.copy(), np.zeros((size, size), np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for alpha, cls in glyphs:
        h, w = alpha.shape
        top, left = _place(rng, boxes, h, w, size)
        under = image[top : top + h, left : left + w] @ _LUMA
        lum = float((under * alpha).sum() / max(float(alpha.sum()), 1e-6))
        if lum > 0.5:  # dark stroke on a light background
            colour = rng.random(3, dtype=np.float32) * max(lum - 0.35, 0.1)
        else:
            colour = 1.0 - rng.random(3, dtype=np.float32) * max(0.65 - lum, 0.1)
        paste_digit(image, mask, alpha, top, left, colour, cls)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------- renderers


def _heights(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    return rng.uniform(*DIGIT_HEIGHT, size=n) * size


def font_glyph(rng: np.random.Generator, font: ImageFont.FreeTypeFont, text: str) -> np.ndarray:
    """``text`` in ``font`` with a stroke of 0-3 px at the font size, under
    :func:`asg.data.classification.digits.random_affine` (rotation ±15°, shear ±0.3, aspect 0.75-1.15):
    float32 [2 px, 2 px]."""
    px = int(font.size)
    canvas = Image.new("L", (2 * px, 2 * px))
    stroke = int(rng.choice([0, 0, 1, 2, 3]))
    ImageDraw.Draw(canvas).text((px, px), text, font=font, fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255)
    return digits.random_affine(canvas, rng)


def wobble_and_blur(rng: np.random.Generator, alpha: np.ndarray, px: int) -> np.ndarray:
    """A glyph's coverage (float [H, W], glyph about ``px`` tall) -> float32 [h, w] in [0, 1], cropped to its ink:
    with probability 0.5 an elastic wobble (a smooth random displacement field, up to ~5% of the glyph size), with
    probability 0.5 a slight blur (soft edges, as the real digits' upscaled strokes)."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    if rng.random() < 0.5:
        amp, smooth = rng.uniform(0.02, 0.05) * px, px / 6
        field = [gaussian_filter(rng.standard_normal(alpha.shape), smooth) for _ in range(2)]
        field = [f * amp / max(float(np.abs(f).max()), 1e-6) for f in field]
        yy, xx = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float64)
        alpha = map_coordinates(alpha, [yy + field[0], xx + field[1]], order=1).astype(np.float32)
    if rng.random() < 0.5:
        alpha = gaussian_filter(alpha, rng.uniform(0.3, 1.0) * px / 28).astype(np.float32)
        alpha /= max(float(alpha.max()), 1e-6)
    return _crop_ink(np.clip(alpha, 0.0, 1.0).astype(np.float32))


def synthetic_glyph(rng: np.random.Generator, fonts: Sequence[ImageFont.FreeTypeFont], text: str) -> np.ndarray:
    """One synthetic glyph's coverage, float32 [h, w] in [0, 1], cropped to its ink: a digit drawn with a pen
    (:func:`asg.data.classification.pen_digits.pen_digit`, probability ``PEN_FRACTION``) or ``text`` in a random
    font, then :func:`wobble_and_blur`. Letters (distractors) always come from a font."""
    font = fonts[int(rng.integers(len(fonts)))]
    px = int(font.size)
    if text.isdigit() and rng.random() < PEN_FRACTION:
        return wobble_and_blur(rng, pen_digit(rng, int(text), px), px)
    return wobble_and_blur(rng, font_glyph(rng, font, text), px)


def render_synthetic_scenes(
    n: int, seed: int, size: int, fonts: tuple[Path, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` font-digit scenes on textures: (uint8 images [n, size, size, 3], uint8 masks [n, size, size]).

    Deterministic for ``(n, seed, size, fonts)``. Each scene: a texture, 0-2 distractor letters (labelled
    background: strokes that are not digits), then 2-4 digits of random classes, each drawn with a pen
    or from a random font (:func:`synthetic_glyph`).
    """
    fonts = digits.digit_fonts() if fonts is None else fonts
    loaded = [ImageFont.truetype(str(p), max(digits.FONT_PX, size)) for p in fonts]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 16180]))
    images, masks = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, size, size), np.uint8)
    for i in range(n):
        glyphs = []
        for _ in range(int(rng.integers(0, DISTRACTORS_PER_SCENE + 1))):
            letter = DISTRACTORS[int(rng.integers(len(DISTRACTORS)))]
            glyphs.append((fit_glyph(synthetic_glyph(rng, loaded, letter), _heights(rng, size, 1)[0], size), 0))
        for _ in range(int(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1))):
            cls = int(rng.integers(10))
            glyphs.append((fit_glyph(synthetic_glyph(rng, loaded, str(cls)), _heights(rng, size, 1)[0], size), cls + 1))
        images[i], masks[i] = compose(rng, texture(rng, size), glyphs)
    return images, masks


def _photos() -> list[np.ndarray]:
    """The packaged photos as uint8 RGB arrays, short side at most 320 px."""
    out = []
    for path in photo_files().values():
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            rgb.thumbnail((rgb.width * 320 // min(rgb.size), rgb.height * 320 // min(rgb.size)))
            out.append(np.asarray(rgb))
    return out


def render_real_scenes(n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of MNIST-5k digits on photo crops: (uint8 images [n, size, size, 3], uint8 masks)."""
    mnist, labels = digits.mnist5k()
    photos = _photos()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 31415]))
    images, masks = np.zeros((n, size, size, 3), np.uint8), np.zeros((n, size, size), np.uint8)
    for i in range(n):
        k = int(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1))
        picks, heights = rng.integers(len(mnist), size=k), _heights(rng, size, k)
        glyphs = [
            (fit_glyph(_crop_ink(mnist[j] / np.float32(255.0)), hgt, size), int(labels[j]) + 1)
            for j, hgt in zip(picks, heights)
        ]
        images[i], masks[i] = compose(rng, photo_crop(rng, photos, size), glyphs)
    return images, masks


# --------------------------------------------------------------------------- cache


def _key(names: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:10]


def _cached(
    path: Path, n: int, size: int, render: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) from the ``.npz`` at ``path`` if it holds ``n`` scenes of ``size``, else rendered and saved."""
    shapes: dict[str, tuple[int, ...] | None] = {"images": (n, size, size, 3), "masks": (n, size, size)}
    z = cached_arrays(path, lambda: dict(zip(("images", "masks"), render())), "rendered scenes", shapes)
    return z["images"], z["masks"]


def _folder(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else digits.default_cache_dir()


def synthetic_scenes(
    n: int, seed: int, size: int, cache_dir: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_synthetic_scenes` through the cache
    ``<cache_dir>/scenes_v<version>_n<n>_seed<seed>_s<size>_fonts<hash>.npz`` (default ``~/.cache/asg/digits``)."""
    fonts = digits.digit_fonts()
    name = f"scenes_v{SCENES_VERSION}_n{n}_seed{seed}_s{size}_fonts{_key([p.name for p in fonts])}.npz"
    return _cached(_folder(cache_dir) / name, n, size, lambda: render_synthetic_scenes(n, seed, size, fonts))


def real_scenes(n: int, seed: int, size: int, cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_real_scenes` through the cache ``<cache_dir>/mnistphotos_v<version>_n<n>_seed<seed>_s<size>_
    photos<hash>.npz`` (the hash of the photo names found on this machine)."""
    name = f"mnistphotos_v{SCENES_VERSION}_n{n}_seed{seed}_s{size}_photos{_key(list(photo_files()))}.npz"
    return _cached(_folder(cache_dir) / name, n, size, lambda: render_real_scenes(n, seed, size))


def build_digit_scenes(cfg: DataConfig, num_real: int = NUM_REAL) -> DataBundle:
    """Train on ``cfg.num_train`` synthetic scenes (seed ``cfg.split_seed``) minus a held-out "synthetic" split
    (a random ``cfg.source_val_fraction`` of the scenes); evaluate on it and on ``num_real`` "mnist_photos"
    scenes (seed fixed). Images are rendered at ``cfg.image_size``; the cache lives in ``cfg.root``."""
    images, masks = synthetic_scenes(cfg.num_train, cfg.split_seed, cfg.image_size, cfg.root)
    ids = np.arange(len(images))
    held = np.zeros(0, np.int64)
    if cfg.source_val_fraction > 0:
        ids, held = stratified_split(np.zeros(len(images)), cfg.source_val_fraction, cfg.split_seed)  # one stratum
    eval_sets: dict[str, Dataset] = {}
    if len(held):
        eval_sets[SOURCE_VAL] = SceneDataset(images[held], masks[held], held, with_labels=True)
    real_images, real_masks = real_scenes(num_real, REAL_SEED, cfg.image_size, cfg.root)
    real = SceneDataset(real_images, real_masks, np.arange(num_real), with_labels=True)
    targets: dict[str, Dataset] = {}
    truth: dict[str, Dataset] = {}
    if cfg.real_split == "all":
        eval_sets[REAL_SET] = real
    else:  # halves balanced over each scene's dominant digit
        adapt, test = split_halves(real.labels, cfg.real_split_seed)
        eval_sets[f"{REAL_SET}_test"] = LabeledSubset(real, test)
        truth[f"{REAL_SET}_adapt"] = LabeledSubset(real, adapt)
        targets[f"{REAL_SET}_adapt"] = ImagesOf(SceneDataset(real_images[adapt], real_masks[adapt], adapt))
    return DataBundle(
        target_sets=targets,
        target_truth=truth,
        train=SceneDataset(images[ids], masks[ids], ids),
        eval_sets=eval_sets,
        source_val_name=SOURCE_VAL if len(held) else None,
        class_names=list(CLASSES),
        has_augmentation=False,
        task="segmentation",
        palette=list(PALETTE),
        class_groups={"digit": tuple(range(1, len(CLASSES))), "background": (0,)},
    )
