"""The files a network is rebuilt from (``model.weights``, ``model.guidance_file``), fingerprinted when a run starts.

A checkpoint of a LoRA run (or of a frozen backbone) holds only what trained: the adapters and the head. The rest
of the network, WiSE-FT's pretrained endpoint and the teacher of a resumed run are rebuilt from the recipe's weight
files. Another file at the same path would give another model without a word, so the run folder records each
file's size and SHA-256 (``base_weights.json``) when the run starts, and evaluate, resume, WiSE-FT and predict
refuse a file whose bytes changed, naming both fingerprints. A file moved elsewhere with the same bytes is fine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from asg.config import ModelConfig
from asg.errors import AsgError, WeightsError

BASE_WEIGHTS = "base_weights.json"  # in the run folder
USES = {  # what rebuilding from a changed file would do, by the use that reads it
    "evaluate": "the run's checkpoints hold only what trained (adapters, head) and the rest of the backbone is "
    "rebuilt from that file, so evaluate would report another model's numbers",
    "predict": "the run's checkpoints hold only what trained (adapters, head) and the rest of the backbone is "
    "rebuilt from that file, so predict would give another model's predictions",
    "resume": "the resumed run would rebuild its frozen parts and its teacher from another file, and continue as "
    "another experiment",
    "wise-ft": "WiSE-FT's pretrained endpoint is rebuilt from that file, so the interpolation would lead to "
    "another backbone",
}


def base_files(cfg: ModelConfig) -> dict[str, Path]:
    """``{"model.weights": file, "model.guidance_file": file}`` of the files ``cfg`` builds its network from
    ("imagenet" resolved to the packaged or cached file; "none" and files that cannot be found are left out)."""
    out: dict[str, Path] = {}
    weights = cfg.weights
    try:
        if weights == "imagenet":
            from asg.models.backbones import _LITE_PACKAGES, _TV_URL, RESNET_CACHE_FILES, packaged_weights_path
            from asg.models.base import hub_cache_file

            if cfg.backbone in _LITE_PACKAGES:
                out["model.weights"] = Path(packaged_weights_path(cfg.backbone))
            elif cfg.backbone in RESNET_CACHE_FILES:
                files = RESNET_CACHE_FILES[cfg.backbone]
                out["model.weights"] = hub_cache_file(cfg.backbone, files, _TV_URL, "torchvision or timm layout")
            elif cfg.backbone == "vgg16":
                from asg.models.vgg import cached_weights_path

                out["model.weights"] = cached_weights_path()
        elif weights != "none":
            out["model.weights"] = Path(weights)
    except WeightsError:  # no file: building the model says so
        pass
    if cfg.guidance_file:
        out["model.guidance_file"] = Path(cfg.guidance_file)
    return {role: path for role, path in out.items() if path.is_file()}


def fingerprint(path: Path) -> dict[str, Any]:
    """``{"file", "size", "sha256"}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": str(Path(path).resolve()), "size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def record_base_weights(cfg: ModelConfig) -> dict[str, dict[str, Any]]:
    """The fingerprint of each file ``cfg`` builds its network from, by config key."""
    return {role: fingerprint(path) for role, path in base_files(cfg).items()}


def check_base_weights(
    record: dict[str, Any] | None, cfg: ModelConfig, use: str, roles: tuple[str, ...] = ("model.weights",)
) -> None:
    """WeightsError when a file of ``roles`` that ``record`` fingerprints now has other bytes (``use``: a key of
    ``USES``, or words of the caller's own). Nothing to check without a record (a run of an earlier asg)."""
    if not record:
        return
    now = base_files(cfg)
    for role in roles:
        then = record.get(role)
        if not isinstance(then, dict) or role not in now:
            continue  # no file then, or none now (building the model says so)
        path = now[role]
        current = fingerprint(path)
        size, sha = current["size"], current["sha256"]
        if size == then.get("size") and sha == then.get("sha256"):
            continue
        moved = "" if str(path.resolve()) == then.get("file") else f"; the run started with {then.get('file')}"
        why = USES.get(use, use)
        raise WeightsError(
            f"{role} {path} changed since the run started ({then.get('size'):,} bytes, SHA-256 "
            f"{str(then.get('sha256'))[:16]}... then; {size:,} bytes, SHA-256 {sha[:16]}... now{moved}): {why}. "
            f"Put the original file back, or point --set {role}=PATH at a copy of it"
        )


def write_record(run_dir: Any, cfg: ModelConfig) -> None:
    """Write ``base_weights.json`` into ``run_dir`` (a RunDir) for a run of ``cfg`` that starts now."""
    run_dir.write_text(BASE_WEIGHTS, json.dumps(record_base_weights(cfg), indent=1))


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``base_weights.json`` of a run folder, or None (a run of an earlier asg, or a weight file)."""
    path = Path(folder) / BASE_WEIGHTS
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AsgError(f"cannot read {path}: {exc}") from None
    return record if isinstance(record, dict) else None


def check_run_base_weights(folder: str | Path, cfg: ModelConfig, use: str) -> None:
    """For a run whose checkpoints hold only what trained (LoRA, frozen backbone): the check of ``use``."""
    if cfg.lora_rank > 0 or cfg.freeze_backbone:
        check_base_weights(read_record(folder), cfg, use)
