"""A tiny GTA5 -> Cityscapes run through the CLI: prepare, check, train with random crops, evaluate."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from asg.cli import main

CS_IDS = [0, 7, 8, 11, 21, 23, 26]  # labelIds: unlabeled, road, sidewalk, building, vegetation, sky, car


def _pair(image_path, label_path, seed, h, w):
    rng = np.random.default_rng(seed)
    ids = rng.choice(CS_IDS, size=(h, w)).astype(np.uint8)
    rgb = np.stack([ids * 7, ids * 3, 255 - ids * 5], axis=-1).astype(np.uint8)  # colour tells the class
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(image_path)
    label = Image.fromarray(ids).convert("P")
    label.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    label.save(label_path)


def _trees(tmp_path):
    gta, cs = tmp_path / "gta5", tmp_path / "cityscapes"
    for k in range(1, 7):
        _pair(gta / "images" / f"{k:05d}.png", gta / "labels" / f"{k:05d}.png", k, 24, 40)
    for k, city in enumerate(["aachen", "bremen"]):
        base = f"{city}_000000_{k:06d}"
        _pair(
            cs / "leftImg8bit" / "val" / city / f"{base}_leftImg8bit.png",
            cs / "gtFine" / "val" / city / f"{base}_gtFine_labelIds.png",
            100 + k,
            24,
            48,
        )
    return gta, cs


@pytest.mark.slow
def test_gta5_to_cityscapes_through_the_cli(tmp_path, capsys):
    gta, cs = _trees(tmp_path)
    assert main(["data", "check", "gta5", str(gta), "--split", "all"]) == 0
    assert "road" in capsys.readouterr().out  # per-class pixel counts name the classes

    assert main(["data", "prepare", "gta5", str(gta), str(tmp_path / "gta5_ready")]) == 0
    written = sorted((tmp_path / "gta5_ready" / "labels").rglob("*.png"))
    assert len(written) == 6 and set(np.unique(np.asarray(Image.open(written[0])))) <= {0, 1, 2, 8, 10, 13, 255}

    recipe = {
        "inherit": "digit_scenes_base.yaml",
        "data": {
            "name": "gta5",
            "root": str(tmp_path / "gta5_ready"),
            "split": "all",
            "eval_roots": {"cityscapes": str(cs)},
            "scale_range": [0.75, 1.25],
            "crop_size": [16, 16],
            "flip": True,
            "batch_size": 3,
            "eval_batch_size": 2,
            "source_val_fraction": 0.2,
            "num_workers": 2,
        },
        "model": {"weights": "none"},
        "method": {"name": "asg", "kl_weight": 75.0},
        "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "progress": False},
        "eval": {"retention": False, "sliding_window": [16, 16]},
    }
    from asg.recipe_files import recipe_path

    recipe["inherit"] = str(recipe_path("digit_scenes_base"))
    path = tmp_path / "gta5_tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 0
    assert "mIoU %" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[-1]["metrics"]) == {"source_val", "cityscapes"}
    assert rows[-1]["sliding_window"] == [16, 16] and rows[-1]["class_set"] == 19 and rows[-1]["split"] == "all"
    cityscapes = rows[-1]["metrics"]["cityscapes"]
    assert len(cityscapes["per_class_iou"]) == 19 and 0.0 <= cityscapes["miou"] <= 1.0
    report = (out / "report.md").read_text()
    assert "Per-class IoU" in report and "| road |" in report
    assert (out / "predictions.png").stat().st_size > 1000

    assert main(["evaluate", str(out), "--tta-flip"]) == 0
    saved = json.loads((out / "eval_last_tta.json").read_text())
    assert saved["task"] == "segmentation" and saved["tta_flip"] is True
    # the whole Cityscapes label is counted at its own resolution: 2 images of 24 x 48, 'unlabeled' ignored
    confusion = np.asarray(saved["sets"]["cityscapes"]["confusion"])
    labelled = sum(int((np.asarray(Image.open(p)) != 0).sum()) for p in sorted((cs / "gtFine").rglob("*_labelIds.png")))
    assert confusion.shape == (19, 19) and confusion.sum() == labelled
