"""``model.json``: what a trained model needs at inference beyond its weights and config (task, class names, colours,
input geometry, normalisation), written into the run folder when training starts so that ``asg predict`` and
``asg export`` never rebuild the training or evaluation data.

Run folders of an earlier asg have no ``model.json``: :func:`model_info_from_config` recovers the same facts from
``summary.json`` (a finished run) or from the config of a known benchmark, and says what must be given by hand
otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from asg.config import Config, config_to_dict
from asg.data import SEGMENTATION_DATASETS, dataset_task
from asg.engine.rundir.folder import RunDir
from asg.errors import AsgError
from asg.tasks import get_task

MODEL_INFO = "model.json"


@dataclass
class ModelInfo:
    """Inference facts of one trained model. Inputs are RGB in [0, 1]; the network normalises them itself with
    ``mean``/``std`` (recorded for deployments that feed another runtime)."""

    task: str
    class_names: list[str]
    image_size: int  # classification: short side resized to it, then centre-cropped to it
    eval_resize: list[int] | None = None  # segmentation: [h, w] inference input (None: native size)
    sliding_window: list[int] | None = None  # segmentation: [h, w] windows (None: whole image)
    sliding_stride: list[int] | None = None
    tta_flip: bool = False
    mean: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    palette: list[list[int]] | None = None  # segmentation: RGB colour per class
    ignore_index: int = 255
    backbone: str = ""
    segmenter: str | None = None
    config_sha256: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def per_pixel(self) -> bool:
        """One label per pixel (masks, sliding windows, [B, C, H, W] logits), else one per image."""
        return get_task(self.task).per_pixel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def config_sha256(cfg: Config) -> str:
    """SHA-256 of the resolved config (its canonical JSON): which training recipe a model came from."""
    text = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def default_palette(n: int) -> list[list[int]]:
    """``n`` distinct, deterministic RGB colours (golden-ratio hues)."""
    import colorsys

    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 else 0.7)
        out.append([int(255 * r), int(255 * g), int(255 * b)])
    return out


def model_info(
    cfg: Config, class_names: list[str], task: str, mean: Any, std: Any, palette: list | None = None
) -> ModelInfo:
    """The :class:`ModelInfo` of a model of ``cfg`` trained on ``class_names`` (``mean``/``std``: its backbone's);
    the task adds its own fields (a segmenter's input size, windows, segmenter and colours)."""
    colours = [list(map(int, c)) for c in (palette or default_palette(len(class_names)))]
    return ModelInfo(
        task=task,
        class_names=list(class_names),
        image_size=int(cfg.data.image_size),
        tta_flip=bool(cfg.eval.tta_flip),
        mean=[float(v) for v in mean.flatten().tolist()] if hasattr(mean, "flatten") else list(mean),
        std=[float(v) for v in std.flatten().tolist()] if hasattr(std, "flatten") else list(std),
        backbone=cfg.model.backbone,
        config_sha256=config_sha256(cfg),
        **get_task(task).inference_fields(cfg, colours),
    )


def write_model_info(run_dir: Any, cfg: Config, data: Any, model: Any) -> None:
    """Write ``model.json`` into ``run_dir`` (a RunDir) for ``model`` trained on ``data`` (a DataBundle)."""
    backbone = model.backbone
    info = model_info(cfg, data.class_names, data.task, backbone.mean, backbone.std, data.palette)
    run_dir.write_text(MODEL_INFO, json.dumps(info.to_dict(), indent=1))


def known_class_names(cfg: Config) -> tuple[list[str] | None, list | None]:
    """(class names, palette) of ``cfg``'s benchmark when the config alone gives them, without reading any data;
    (None, None) when it does not (an image folder or list file without ``data.class_names``)."""
    name = cfg.data.name
    if name == "digits":
        from asg.data.classification.digits import CLASSES

        return list(CLASSES), None
    if name == "visda17":
        from asg.data.classification.visda17 import CLASSES as VISDA

        return list(VISDA), None
    if name == "digit_scenes":
        from asg.data.segmentation.digit_scenes import CLASSES as SCENES
        from asg.data.segmentation.digit_scenes import PALETTE

        return list(SCENES), [list(c) for c in PALETTE]
    if name in SEGMENTATION_DATASETS:
        from asg.data.segmentation.street_classes import CLASS_SETS, palette
        from asg.data.segmentation.street_scenes import _seglist_names

        names = _seglist_names(cfg.data) if name == "seglist" else list(CLASS_SETS[cfg.data.class_set])
        known = next((cs for cs, cs_names in CLASS_SETS.items() if cs_names == names), None)
        return names, ([list(c) for c in palette(known)] if known is not None else None)
    return (list(cfg.data.class_names) if cfg.data.class_names else None), None


def model_info_from_config(cfg: Config, run_dir: Path | None, class_names: list[str] | None) -> ModelInfo:
    """The :class:`ModelInfo` of a model without ``model.json`` (a weight file, or a run folder of an earlier asg):
    class names from ``class_names``, else the run's ``summary.json``, else the benchmark; AsgError when none
    gives them. Normalisation is filled in by the caller from the built model."""
    task = dataset_task(cfg.data.name)
    names, palette = known_class_names(cfg)
    if class_names:
        names = list(class_names)
    elif run_dir is not None:
        try:
            summary = RunDir(run_dir).read_summary()
        except AsgError:  # unreadable: the names come from elsewhere
            summary = None
        names = (summary.class_names if summary is not None else None) or names
    if not names:
        where = f"{run_dir} has no {MODEL_INFO} (it was trained by an earlier asg)" if run_dir else "the recipe"
        raise AsgError(
            f"{where} and its class names are unknown (data.name={cfg.data.name} without "
            "data.class_names): pass --class-names NAME,NAME,... in label order"
        )
    if palette is not None and len(palette) != len(names):
        palette = None
    return model_info(cfg, names, task, [0.0] * 3, [1.0] * 3, palette)


def read_model_info(run_dir: Path) -> ModelInfo | None:
    """``run_dir/model.json`` as a :class:`ModelInfo`, or None when the run has none."""
    data = RunDir(run_dir).read_json(MODEL_INFO)
    if data is None:
        return None
    try:
        return ModelInfo.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise AsgError(f"cannot read {Path(run_dir) / MODEL_INFO}: {exc}") from None
