"""Image/label pairs for segmentation: label decoding, id mapping, paired transforms, and the pair dataset.

A sample is ``(FloatTensor [3, H, W] RGB in [0, 1], LongTensor [H, W])`` holding train ids 0..C-1 and 255
(``IGNORE_INDEX``) for unlabelled pixels. Labels are decoded with PIL (a palette "P" PNG gives its indices, which
are the ids; cv2 would give the palette colours), except 16-bit colour PNGs (SYNTHIA), which PIL truncates to
8 bits: those are decoded with ``torchvision.io.decode_image``. Random choices use torch's global RNG only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from asg.data.bundle import IGNORE_INDEX
from asg.data.images import FileImageDataset, ImageReadError, check_bad_image_mode, open_image
from asg.errors import ConfigError, DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PairTransformFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class LabelIdError(DataError):
    """A label holds ids that its id table does not define (the wrong dataset, protocol or label files)."""


class SizeMismatchError(ImageReadError):
    """An image and its label differ in size (``reason`` says so, and whether the label is transposed)."""


def png_header(path: str | Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file, or None when ``path`` is not a PNG. Reads 26 bytes."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(PNG_SIGNATURE):
        return None
    return head[24], head[25]


def check_pixel_limit(path: str | Path) -> None:
    """PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, an error beyond twice it) for decoders that
    do not apply it: raises ``Image.DecompressionBombError`` from the PNG header's width and height."""
    with open(path, "rb") as f:
        head = f.read(24)
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or len(head) < 24 or not head.startswith(PNG_SIGNATURE):
        return
    pixels = int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")
    if pixels > 2 * limit:
        raise Image.DecompressionBombError(
            f"Image size ({pixels} pixels) exceeds limit of {2 * limit} pixels, could be decompression bomb DOS attack."
        )


def read_label(path: str | Path, channel: int | None = None) -> np.ndarray:
    """Decode a label image -> raw ids, int array [H, W] (uint8, or int32 for 16-bit files).

    ``channel``: the channel holding the id in a multi-channel label (SYNTHIA: 0); None = the label must be
    single-channel (gray, 16-bit gray or palette). Raises what PIL/torchvision raise, or DataError for a colour
    label without ``channel``.
    """
    header = png_header(path)
    if header is not None and header[0] == 16 and header[1] in (2, 6):  # 16-bit RGB(A): PIL keeps 8 bits only
        check_pixel_limit(path)  # (torchvision has no pixel limit)
        with warnings.catch_warnings():  # torchvision 0.29 marks its decoders deprecated (in favour of torchcodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            arr = decode_image(str(path), mode=ImageReadMode.UNCHANGED).to(torch.int32).numpy()  # [C, H, W]
        if channel is None:
            raise DataError(f"label {path} is a 16-bit colour PNG; expected a single-channel image of class ids")
        return arr[channel]
    with Image.open(path) as img:
        img.load()
        if img.mode in ("P", "L", "1"):
            return np.asarray(img, dtype=np.uint8)
        if img.mode.startswith("I"):  # I;16, I;16B, I: wide gray ids
            return np.asarray(img).astype(np.int32)
        if channel is None:
            raise DataError(
                f"label {path} is a {img.mode} colour image; expected a single-channel PNG of class ids "
                f"(gray or palette), not a colour visualisation"
            )
        return np.asarray(img.convert("RGB"))[..., channel]


def map_label(raw: np.ndarray, lut: np.ndarray, label_kind: str, where: str) -> np.ndarray:
    """Raw ids [H, W] -> train ids uint8 [H, W] through ``lut`` (see ``asg.data.segmentation.street_classes``).

    A LabelIdError lists the ids that ``lut`` leaves undefined (-1 or beyond its length), with ``where``
    (the file names) and ``label_kind`` (what the ids should be) in the message.
    """
    top = int(raw.max(initial=0))
    if top >= len(lut) or raw.min(initial=0) < 0:  # ids beyond the table, and those it leaves undefined: all named
        inside = (raw >= 0) & (raw < len(lut))
        undefined = raw[inside][lut[raw[inside]] < 0]
        bad = np.union1d(np.unique(raw[~inside]), np.unique(undefined))
    else:
        mapped = lut[raw]
        if mapped.min(initial=0) >= 0:
            return mapped.astype(np.uint8)
        bad = np.unique(raw[mapped < 0])
    shown = ", ".join(map(str, bad[:10].tolist())) + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else "")
    raise LabelIdError(
        f"{where} holds id(s) {shown} outside {label_kind}; check data.name and data.class_set, "
        f"or that these label files are the dataset's own"
    )


def pair_to_tensors(img: Image.Image, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL image ("L" or "RGB") and uint8 ids [H, W] -> (uint8 image [3, H, W], uint8 label [H, W])."""
    arr = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8))
    return arr.permute(2, 0, 1).contiguous(), torch.from_numpy(np.ascontiguousarray(ids, dtype=np.uint8))


def _size(hw: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if hw is None:
        return None
    if len(hw) != 2 or min(int(v) for v in hw) < 1:
        raise ConfigError(f"{what} must be [height, width] with positive values, got {list(hw)}")
    return int(hw[0]), int(hw[1])


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image [3, H, W] bilinearly (antialiased) and label [H, W] by nearest neighbour (pixel centres)."""
    if tuple(image.shape[-2:]) == size:
        return image, label
    image = F.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    label = F.resize(label[None], list(size), interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return image, label


class PairTransform:
    """Training transform of an (image [3, H, W], label [H, W]) pair; uint8 or float images alike.

    Steps: resize to ``train_resize`` [h, w]; rescale by s ~ U[lo, hi] of ``scale_range`` (image bilinear, label
    nearest: labels are never interpolated); pad to at least ``crop_size`` (image 0, label 255); random crop of
    ``crop_size``; horizontal flip with p = 0.5 when ``flip``. Uses torch's global RNG only.
    """

    def __init__(
        self,
        train_resize: Sequence[int] | None = None,
        scale_range: Sequence[float] = (1.0, 1.0),
        crop_size: Sequence[int] | None = None,
        flip: bool = False,
    ) -> None:
        self.train_resize = _size(train_resize, "data.train_resize")
        self.crop_size = _size(crop_size, "data.crop_size")
        if len(scale_range) != 2 or not 0 < float(scale_range[0]) <= float(scale_range[1]):
            raise ConfigError(f"data.scale_range must be [lo, hi] with 0 < lo <= hi, got {list(scale_range)}")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)

    @property
    def is_random(self) -> bool:
        """True when a pair may come out differently per call (random scale, a crop that can move, or flip)."""
        lo, hi = self.scale_range
        if self.flip or lo != hi:
            return True
        if self.crop_size is None:
            return False
        if self.train_resize is None:  # native sizes vary: assume the crop can move
            return True
        h, w = (max(1, round(v * lo)) for v in self.train_resize)
        return h > self.crop_size[0] or w > self.crop_size[1]

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [3, H, W], label [H, W]) -> (image [3, h, w], label [h, w]) aligned pixel for pixel."""
        if self.train_resize is not None:
            image, label = resize_pair(image, label, self.train_resize)
        lo, hi = self.scale_range
        if (lo, hi) != (1.0, 1.0):
            s = lo if lo == hi else float(torch.empty(()).uniform_(lo, hi))
            h, w = image.shape[-2:]
            image, label = resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))
        if self.crop_size is not None:
            ch, cw = self.crop_size
            h, w = image.shape[-2:]
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            if ph or pw:  # pad right and bottom
                image = F.pad(image, [0, 0, pw, ph], fill=0)
                label = F.pad(label[None], [0, 0, pw, ph], fill=IGNORE_INDEX)[0]
                h, w = image.shape[-2:]
            top = int(torch.randint(0, h - ch + 1, ())) if h > ch else 0
            left = int(torch.randint(0, w - cw + 1, ())) if w > cw else 0
            image, label = image[:, top : top + ch, left : left + cw], label[top : top + ch, left : left + cw]
        if self.flip and float(torch.rand(())) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image, label

    def __repr__(self) -> str:
        return (
            f"PairTransform(train_resize={self.train_resize}, scale_range={self.scale_range}, "
            f"crop_size={self.crop_size}, flip={self.flip})"
        )


class EvalPairTransform:
    """Evaluation transform: the image is resized to ``eval_resize`` [h, w] (bilinear) when given; the label keeps
    its native resolution (metrics are computed there; predictions are upsampled to it)."""

    is_random = False

    def __init__(self, eval_resize: Sequence[int] | None = None) -> None:
        self.eval_resize = _size(eval_resize, "data.eval_resize")

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [3, H, W], label [H, W]) -> (image [3, h, w], the same label [H, W])."""
        if self.eval_resize is not None and tuple(image.shape[-2:]) != self.eval_resize:
            image = F.resize(image, list(self.eval_resize), interpolation=InterpolationMode.BILINEAR, antialias=True)
        return image, label

    def __repr__(self) -> str:
        return f"EvalPairTransform(eval_resize={self.eval_resize})"


def image_size(path: str | Path, verify: bool = False) -> tuple[int, int]:
    """(W, H) of an image as :func:`asg.data.images.read_image` returns it (EXIF rotation applied), from the header
    only unless ``verify`` (then the pixels are decoded too). Raises what PIL raises."""
    with Image.open(path) as img:
        if verify:
            img.load()
        w, h = img.size
        try:
            rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap width and height
        except Exception:  # a malformed EXIF block: read_image keeps the pixels as stored
            rotated = False
    return (h, w) if rotated else (w, h)


def size_problem(image_size: tuple[int, int], label_shape: tuple[int, ...]) -> str | None:
    """Why an image of PIL ``size`` (W, H) and a label of shape (H, W) do not match, or None when they do."""
    w, h = image_size
    lh, lw = label_shape[:2]
    if (lh, lw) == (h, w):
        return None
    transposed = " (transposed: height and width swapped)" if (lh, lw) == (w, h) else ""
    return f"is {w}x{h} (WxH) but its label is {lw}x{lh}{transposed}"


class SegmentationPairs(FileImageDataset):
    """(image file, label file) pairs -> ``(FloatTensor [3, H, W] in [0, 1], LongTensor [H, W])``.

    Args:
        images, labels: paths, one label per image.
        lut: int LUT raw id -> train id / 255 / -1 (undefined: an error); see ``asg.data.segmentation.street_classes``.
        label_kind: what the raw ids are, for error messages (e.g. "Cityscapes labelIds (0..33)").
        transform: ``(uint8 image [3, H, W], uint8 label [H, W]) -> (image, label)``; None keeps the pair as is.
        where: per pair, where it is listed (``LIST:LINE``) or "".
        label_channel: channel of a multi-channel label holding the id (SYNTHIA: 0); None = single-channel.
        on_bad_image: "skip" returns None (and logs ``PATH: reason``) for a pair whose image or label is missing
            or undecodable, or whose sizes differ; "error" raises. Undefined ids always raise.

    No ``labels`` attribute (that is for classification); ``image_path(i)`` and ``label_path(i)`` name the files.
    """

    def __init__(
        self,
        images: Sequence[str | Path],
        labels: Sequence[str | Path],
        lut: np.ndarray,
        label_kind: str,
        transform: PairTransformFn | None = None,
        where: Sequence[str] | None = None,
        label_channel: int | None = None,
        on_bad_image: str = "error",
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = [Path(p) for p in images]
        self.label_files = [Path(p) for p in labels]
        self.lut = np.asarray(lut, dtype=np.int16)
        self.label_kind = label_kind
        self.pair_transform = transform
        self.wheres = list(where) if where is not None else [""] * len(self.images)
        self.label_channel = label_channel
        self.on_bad_image = check_bad_image_mode(on_bad_image)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, i: int) -> Path:
        return self.images[i]

    def label_path(self, i: int) -> Path:
        return self.label_files[i]

    def where(self, i: int) -> str:
        return self.wheres[i]

    def select(self, indices: Sequence[int] | np.ndarray, transform: PairTransformFn | None) -> SegmentationPairs:
        """The pairs at ``indices`` with another transform (e.g. a held-out split with the evaluation transform)."""
        idx = [int(i) for i in indices]
        out = SegmentationPairs(
            [self.images[i] for i in idx],
            [self.label_files[i] for i in idx],
            self.lut,
            self.label_kind,
            transform,
            [self.wheres[i] for i in idx],
            self.label_channel,
            self.on_bad_image,
        )
        out.skip_log = self.skip_log
        return out

    def describe(self, i: int) -> str:
        """``label L of image I (listed at W)``: both files of pair ``i``, for messages."""
        where = f" (listed at {self.wheres[i]})" if self.wheres[i] else ""
        return f"label {self.label_files[i]} of image {self.images[i]}{where}"

    def read_label_ids(self, i: int) -> np.ndarray:
        """Train ids uint8 [H, W] of pair ``i`` (no transform); ImageReadError / LabelIdError name both files."""
        path = self.label_files[i]
        try:
            raw = read_label(path, self.label_channel)
        except FileNotFoundError:
            why = f"does not exist ({self.describe(i)}); every image needs its label file"
            raise ImageReadError(f"label file {path} {why}", path, why) from None
        except DataError as exc:
            raise ImageReadError(f"{exc} (image {self.images[i]})", path, str(exc)) from None
        except Exception as exc:  # PIL/torchvision raise many types for corrupt files
            why = f"cannot decode {self.describe(i)}: {type(exc).__name__}: {exc}"
            raise ImageReadError(why, path, why) from None
        return map_label(raw, self.lut, self.label_kind, self.describe(i))

    def read_pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(PIL image, train ids uint8 [H, W]) of pair ``i``, sizes checked; DataErrors name both files."""
        img = open_image(self.images[i], where=self.wheres[i])
        ids = self.read_label_ids(i)
        why = size_problem(img.size, ids.shape)
        if why is not None:
            where = f" (listed at {self.wheres[i]})" if self.wheres[i] else ""
            why = f"{why}: {self.label_files[i]}{where}"
            raise SizeMismatchError(
                f"image {self.images[i]} {why}; fix or remove the pair, or set data.on_bad_image=skip to leave "
                f"such pairs out",
                self.images[i],
                why,
            )
        return img, ids

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:  # type: ignore[override]
        try:
            img, ids = self.read_pair(i)
        except LabelIdError:
            raise
        except ImageReadError as exc:
            if self.on_bad_image != "skip":
                raise
            self.log_skipped(f"{exc.path}: {exc.reason}")
            return None
        image, label = pair_to_tensors(img, ids)
        if self.pair_transform is not None:
            image, label = self.pair_transform(image, label)
        return image.float().div_(255.0), label.long()
