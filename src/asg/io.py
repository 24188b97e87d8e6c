"""Files written whole or not at all, a file's SHA-256, and why a weights-only ``torch.load`` refused a file.

A leaf module: it imports nothing from asg, so every layer (data preparation, models, methods, the engine,
meta-training, adaptation, the demo) may use it without an upward import.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[..., Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file, hex, read in blocks of ``block`` bytes (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def torch_load_problem(exc: BaseException) -> str:
    """One line saying why ``torch.load(..., weights_only=True)`` refused a file (never torch's advice to load it
    with ``weights_only=False``, which would run the file's code)."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f"a pickled Python object ({found.group(1)})" if found else "pickled Python code or objects"
        return (
            f"it holds {what}, which asg never loads (only tensors and plain containers): a file of another "
            "program, or a damaged or tampered one"
        )
    if isinstance(exc, OSError):
        return exc.strerror or text
    first = " ".join(text.split())
    return f"{type(exc).__name__}: {first[:200]}" + ("..." if len(first) > 200 else "")
