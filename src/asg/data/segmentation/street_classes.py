"""Class sets and id tables of the street-scene segmentation benchmarks (facts, no I/O).

Every raw label is mapped to the 19 Cityscapes train classes first, then, for the SYNTHIA protocols, reduced to
16 or 13 classes. A lookup table (LUT) is an int16 array indexed by the raw id: a train id, 255 (``IGNORE_INDEX``,
unlabelled on purpose) or -1 (an id the dataset does not define: an error when a label contains it). Ids at or
beyond the table's length are undefined too.

Mapillary Vistas v1.2 (66 classes) -> 19 Cityscapes classes, as in ``lhoyer/HRDA``
``tools/convert_datasets/mapillary.py`` (also ``tue-mps/benchmark-vfm-ss`` ``datasets/mappings.py``), the
conversion used for Mapillary as an unseen real domain in the syn-to-real generalisation literature:

=========================================  ===============
Mapillary v1.2 id (name)                   Cityscapes class
=========================================  ===============
13 Road, 24 Lane Marking - General,        road
41 Manhole
2 Curb, 15 Sidewalk                        sidewalk
17 Building                                building
6 Wall                                     wall
3 Fence                                    fence
45 Pole, 47 Utility Pole                   pole
48 Traffic Light                           traffic light
50 Traffic Sign (Front)                    traffic sign
30 Vegetation                              vegetation
29 Terrain                                 terrain
27 Sky                                     sky
19 Person                                  person
20 Bicyclist, 21 Motorcyclist,             rider
22 Other Rider
55 Car                                     car
61 Truck                                   truck
54 Bus                                     bus
58 On Rails                                train
57 Motorcycle                              motorcycle
52 Bicycle                                 bicycle
every other id 0..65                       ignored (255)
=========================================  ===============
"""

from __future__ import annotations

import numpy as np

from asg.data.bundle import IGNORE_INDEX
from asg.errors import ConfigError

UNDEFINED = -1  # LUT entry of a raw id the dataset does not define

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip # a table in train-id order
CITYSCAPES_PALETTE: list[tuple[int, int, int]] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip # a table in train-id order

# the SYNTHIA protocols keep these Cityscapes classes, in Cityscapes order
CLASS_SETS: dict[int, list[str]] = {
    19: list(CITYSCAPES_CLASSES),
    16: [c for c in CITYSCAPES_CLASSES if c not in ("terrain", "truck", "train")],
    13: [c for c in CITYSCAPES_CLASSES if c not in ("terrain", "truck", "train", "wall", "fence", "pole")],
}

# Cityscapes labelIds 0..33 (GTA5 labels use the same ids) -> trainId; 255 (license plate, -1 as uint8) ignored
CITYSCAPES_ID_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip # a table: dataset id -> train id
CITYSCAPES_DEFINED = [*range(34), 255]

# SYNTHIA-RAND-CITYSCAPES ids 0..22 (its README) -> Cityscapes trainId. Terrain (16), truck (18) and train (20)
# are defined by SYNTHIA but have no pixels; the 16- and 13-class protocols drop them anyway.
SYNTHIA_ID_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
    10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip # a table: dataset id -> train id
SYNTHIA_DEFINED = list(range(23))  # 0 void, 13 parking slot, 14 road work, 22 lane marking: ignored

# Mapillary Vistas v1.2 ids 0..65 -> Cityscapes trainId (table in the module docstring); 65 "Unlabeled"
MAPILLARY_ID_TO_TRAIN = {
    13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9,
    27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18,
}  # fmt: skip # a table: dataset id -> train id
MAPILLARY_DEFINED = list(range(66))


def check_class_set(class_set: int) -> int:
    """``class_set`` if it is 19, 16 or 13, else a ConfigError."""
    if class_set not in CLASS_SETS:
        raise ConfigError(f"data.class_set must be one of {', '.join(map(str, CLASS_SETS))}, got {class_set!r}")
    return class_set


def class_names(class_set: int = 19) -> list[str]:
    """Names of the classes of ``class_set`` (19, 16 or 13), in train-id order."""
    return list(CLASS_SETS[check_class_set(class_set)])


def palette(class_set: int = 19) -> list[tuple[int, int, int]]:
    """Cityscapes colour of each class of ``class_set``, in train-id order."""
    return [CITYSCAPES_PALETTE[CITYSCAPES_CLASSES.index(c)] for c in class_names(class_set)]


def make_lut(table: dict[int, int], defined: list[int], size: int = 256) -> np.ndarray:
    """int16 LUT [size]: ``table[id]`` for listed ids, 255 for other ``defined`` ids, -1 (undefined) elsewhere."""
    lut = np.full(size, UNDEFINED, dtype=np.int16)
    lut[np.asarray(defined, dtype=np.int64)] = IGNORE_INDEX
    for raw, train in table.items():
        lut[raw] = train
    return lut


def identity_lut(num_classes: int) -> np.ndarray:
    """LUT of labels that already hold train ids: 0..num_classes-1 and 255 are valid, every other id undefined."""
    return make_lut({c: c for c in range(num_classes)}, [IGNORE_INDEX])


def reduce_lut(class_set: int) -> np.ndarray:
    """LUT [256] from a 19-class Cityscapes train id to the train id of ``class_set`` (dropped classes -> 255)."""
    names = class_names(class_set)
    table = {i: names.index(c) for i, c in enumerate(CITYSCAPES_CLASSES) if c in names}
    return make_lut(table, [*range(19), IGNORE_INDEX])


def to_class_set(lut19: np.ndarray, class_set: int) -> np.ndarray:
    """Compose a raw-id -> 19-class LUT with the reduction to ``class_set``; undefined entries stay -1."""
    if class_set == 19:
        return lut19.copy()
    reduced = reduce_lut(class_set)
    return np.where(lut19 >= 0, reduced[np.clip(lut19, 0, 255)], UNDEFINED).astype(np.int16)


def cityscapes_lut(class_set: int = 19) -> np.ndarray:
    """Cityscapes (and GTA5) labelId -> train id of ``class_set``."""
    return to_class_set(make_lut(CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_DEFINED), class_set)


def synthia_lut(class_set: int = 16) -> np.ndarray:
    """SYNTHIA-RAND-CITYSCAPES class id -> train id of ``class_set`` (16 or 13 in the standard protocols)."""
    return to_class_set(make_lut(SYNTHIA_ID_TO_TRAIN, SYNTHIA_DEFINED), class_set)


def mapillary_lut(class_set: int = 19) -> np.ndarray:
    """Mapillary Vistas v1.2 class id -> train id of ``class_set``."""
    return to_class_set(make_lut(MAPILLARY_ID_TO_TRAIN, MAPILLARY_DEFINED), class_set)


def trainid_lut(class_set: int = 19) -> np.ndarray:
    """Labels stored as 19-class Cityscapes train ids (BDD100K, Cityscapes ``labelTrainIds``) -> ``class_set``."""
    return to_class_set(identity_lut(19), class_set)
