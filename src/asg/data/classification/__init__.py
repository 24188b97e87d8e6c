"""Classification benchmarks: an item is ``(FloatTensor [3, S, S] RGB in [0, 1], int label)``.

``digits`` (embedded, offline: font-rendered and pen-drawn digits -> MNIST-5k and UCI digits), ``visda17``, and
the generic ``listfile`` / ``imagefolder`` datasets.
"""

from asg.data.classification.digits import build_digits
from asg.data.classification.listfile import (
    ImageFolderDataset,
    ListFileDataset,
    build_imagefolder,
    build_listfile,
)
from asg.data.classification.visda17 import build_visda17

__all__ = [
    "ImageFolderDataset",
    "ListFileDataset",
    "build_digits",
    "build_imagefolder",
    "build_listfile",
    "build_visda17",
]
