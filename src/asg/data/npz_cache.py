"""Arrays computed once (rendered digits and scenes, parsed real digits) and kept as an ``.npz`` file."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cached_arrays(
    path: Path,
    build: Callable[[], dict[str, np.ndarray]],
    what: str,
    shapes: dict[str, tuple[int, ...] | None],
    compressed: bool = False,
) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` at ``path`` when it holds every key of ``shapes`` with that shape (None: any);
    otherwise ``build()``, written with a temporary file and a rename. An unreadable or unwritable cache is a
    warning naming ``what``, never an error."""
    if path.is_file():
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            if all(k in arrays and s in (None, arrays[k].shape) for k, s in shapes.items()):
                return arrays
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"ignoring unreadable {what} cache {path} ({exc}); making it again", stacklevel=3)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            save: Callable[..., None] = np.savez_compressed if compressed else np.savez
            save(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not cache {what} at {path} ({exc})", stacklevel=3)
    return arrays
