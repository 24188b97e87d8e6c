"""A handful of real colour photos that ship inside scikit-image and scikit-learn (for weight/preprocessing checks).

Files are read straight from the packages' folders, so nothing is ever downloaded; missing ones are skipped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image

from asg.data.transforms import pil_to_tensor

# natural colour photographs in scikit-image's distribution (grayscale, synthetic and texture images left out)
SKIMAGE_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
SKLEARN_PHOTOS = {"china": "china.jpg", "flower": "flower.jpg"}


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (importing sklearn takes ~2 s)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return Path("/nonexistent")
    return Path(list(spec.submodule_search_locations)[0])


def photo_files() -> dict[str, Path]:
    """Name -> file of every packaged photo that is present on this machine."""
    folders = {
        _package_dir("skimage") / "data": SKIMAGE_PHOTOS,
        _package_dir("sklearn") / "datasets" / "images": SKLEARN_PHOTOS,
    }
    files = {name: folder / f for folder, names in folders.items() for name, f in names.items()}
    return {name: path for name, path in files.items() if path.is_file()}


def real_photos(size: int = 224) -> tuple[torch.Tensor, list[str]]:
    """Packaged colour photos, short side resized to ``size`` and centre-cropped: (FloatTensor [N, 3, size, size]
    in [0, 1], names). N is 11 with current scikit-image/scikit-learn."""
    files = photo_files()
    images = []
    for path in files.values():
        with Image.open(path) as img:
            images.append(pil_to_tensor(img.convert("RGB"), size))
    return torch.stack(images), list(files)
