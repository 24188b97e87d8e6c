"""Pen-drawn synthetic digits: each digit a few strokes through hand-placed control points, jittered, smoothed
and drawn with a round pen of random width, then slanted and rotated.

A second synthetic source beside the fonts (as a simulator adds a second renderer): fonts give printed shapes
only, people write with a pen. The templates are written here from the shapes' common forms (open and closed 4,
1 with and without a flag, 7 with and without a bar...); no real image is used to make them. Coordinates are in a
unit box, x to the right, y down.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from asg.data.classification.digits import random_affine

Stroke = list[tuple[float, float]]

# digit -> variants -> strokes -> control points
TEMPLATES: dict[int, list[list[Stroke]]] = {
    0: [[[(0.5, 0.0), (0.18, 0.2), (0.15, 0.65), (0.45, 1.0), (0.82, 0.75), (0.85, 0.3), (0.55, 0.0), (0.45, 0.05)]]],
    1: [
        [[(0.5, 0.0), (0.5, 1.0)]],
        [[(0.25, 0.25), (0.55, 0.0), (0.52, 1.0)]],
    ],
    2: [
        [[(0.15, 0.25), (0.4, 0.0), (0.75, 0.08), (0.75, 0.4), (0.15, 1.0), (0.9, 0.97)]],
        [[(0.2, 0.2), (0.5, 0.0), (0.8, 0.25), (0.55, 0.6), (0.15, 0.98), (0.45, 0.85), (0.9, 1.0)]],
    ],
    3: [
        [[(0.15, 0.12), (0.5, 0.0), (0.8, 0.2), (0.45, 0.48), (0.85, 0.7), (0.55, 1.0), (0.12, 0.88)]],
        [[(0.15, 0.05), (0.8, 0.05), (0.4, 0.45), (0.85, 0.65), (0.55, 1.0), (0.15, 0.85)]],
    ],
    4: [
        [[(0.7, 1.0), (0.7, 0.0), (0.1, 0.68), (0.92, 0.68)]],
        [[(0.3, 0.0), (0.15, 0.6), (0.88, 0.6)], [(0.68, 0.25), (0.68, 1.0)]],
    ],
    5: [
        [[(0.8, 0.02), (0.3, 0.02), (0.25, 0.45), (0.62, 0.4), (0.82, 0.68), (0.6, 0.98), (0.15, 0.88)]],
        [[(0.3, 0.02), (0.25, 0.45), (0.62, 0.4), (0.82, 0.68), (0.6, 0.98), (0.15, 0.88)], [(0.3, 0.02), (0.85, 0.0)]],
    ],
    6: [[[(0.72, 0.0), (0.35, 0.3), (0.18, 0.7), (0.45, 1.0), (0.8, 0.78), (0.55, 0.5), (0.22, 0.65)]]],
    7: [
        [[(0.12, 0.05), (0.88, 0.05), (0.4, 1.0)]],
        [[(0.12, 0.05), (0.88, 0.05), (0.4, 1.0)], [(0.35, 0.5), (0.8, 0.5)]],
    ],
    8: [
        [
            [(0.55, 0.48), (0.2, 0.25), (0.5, 0.0), (0.8, 0.22), (0.5, 0.5), (0.15, 0.75), (0.5, 1.0), (0.85, 0.75)]
            + [(0.55, 0.48)]
        ]
    ],
    9: [
        [[(0.8, 0.3), (0.5, 0.02), (0.2, 0.25), (0.4, 0.5), (0.8, 0.32)], [(0.8, 0.3), (0.72, 1.0)]],
        [[(0.8, 0.28), (0.5, 0.02), (0.2, 0.25), (0.4, 0.5), (0.8, 0.32), (0.75, 0.7), (0.45, 1.0)]],
    ],
}


def smooth_path(points: Stroke, per_segment: int = 12) -> np.ndarray:
    """A Catmull-Rom spline through ``points`` (ends repeated): float [(n - 1) * per_segment + 1, 2]."""
    p = np.asarray(points, np.float64)
    if len(p) < 3:
        t = np.linspace(0.0, 1.0, per_segment + 1)[:, None]
        return p[0] + t * (p[-1] - p[0])
    ext = np.concatenate([p[:1], p, p[-1:]])
    t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        out.append(
            0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
        )
    return np.concatenate([*out, p[-1:]])


def pen_digit(rng: np.random.Generator, digit: int, px: int = 48) -> np.ndarray:
    """One pen-drawn ``digit``: coverage float32 [2 px, 2 px] in [0, 1], the digit about ``px`` tall in the middle.

    A random variant; every control point jittered (sd 4% of the box), the box's aspect 0.55-0.8, pen width
    9-18% of the height with round ends and joints, drawn at 2x and averaged down (anti-aliased coverage),
    then :func:`asg.data.classification.digits.random_affine` (rotation, shear, aspect).
    """
    variant = TEMPLATES[digit][int(rng.integers(len(TEMPLATES[digit])))]
    scale, aspect = 2 * px, rng.uniform(0.55, 0.8)
    width = max(2, round(rng.uniform(0.09, 0.18) * scale))
    canvas = Image.new("L", (4 * px, 4 * px))
    draw = ImageDraw.Draw(canvas)
    left, top = 2 * px - aspect * scale / 2, px
    for stroke in variant:
        pts = np.asarray(stroke) + rng.normal(0.0, 0.04, size=(len(stroke), 2))
        path = smooth_path([tuple(q) for q in pts])
        xy = [(left + x * aspect * scale, top + y * scale) for x, y in path]
        draw.line(xy, fill=255, width=width, joint="curve")
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=255)
    small = canvas.resize((2 * px, 2 * px), Image.Resampling.BOX)
    return random_affine(small, rng)
