"""Segmentation benchmarks: an item is ``(FloatTensor [3, H, W] RGB in [0, 1], LongTensor [H, W])``, 255 = ignore.

- :mod:`~asg.data.segmentation.digit_scenes`: the embedded toy benchmark ``digit_scenes`` (offline, seconds).
- :mod:`~asg.data.segmentation.street_scenes`: the street-scene datasets (GTA5, SYNTHIA, Cityscapes, BDD100K,
  Mapillary Vistas, ``seglist``): their folder layouts (:mod:`~asg.data.segmentation.street_layouts`), class
  tables (:mod:`~asg.data.segmentation.street_classes`), image/label pairs and paired transforms
  (:mod:`~asg.data.segmentation.pairs`), ``asg data check`` (:mod:`~asg.data.segmentation.street_check`) and
  ``asg data prepare`` (:mod:`~asg.data.segmentation.prepare`).
"""

from asg.data.segmentation.digit_scenes import build_digit_scenes
from asg.data.segmentation.street_scenes import build_segmentation

__all__ = ["build_digit_scenes", "build_segmentation"]
