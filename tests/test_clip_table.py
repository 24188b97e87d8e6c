"""The VisDA-17 CLIP table (asg.clip_table, asg.zero_shot) end to end on a tiny CLIP and a tiny VisDA-17 tree:
the zero-shot head is open_clip's zero-shot classifier, `asg evaluate --zero-shot` writes its evaluation, and
`asg clip-table` trains and evaluates every row into one table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_VIT, tiny_clip
from PIL import Image

from asg.data.classification.visda17 import CLASSES


def _visda_tree(root, per_class=(2, 1)):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "validation"), per_class):
        lines = []
        for c, name in enumerate(CLASSES):
            for i in range(n):
                rel = f"{name}/{i}.png"
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / rel)
                lines.append(f"{rel} {c}")
        (root / split / "image_list.txt").write_text("\n".join(lines) + "\n")
    return root


def _overrides(tmp_path):
    _, weights, cfg_path = tiny_clip(tmp_path)
    root = _visda_tree(tmp_path / "visda")
    vit = json.dumps(TINY_VIT).replace('"', "")
    return [
        f"data.root={root}",
        f"model.weights={weights}",
        f"model.clip_model={cfg_path}",
        "model.clip_templates=simple",
        f"model.clip_cache_dir={tmp_path / 'zs'}",
        "model.input_size=64",
        f"model.timm_kwargs={vit}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.source_val_fraction=0.5",
        "train.steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.progress=false",
        "train.precision=fp32",
        "eval.retention=false",
        "optim.warmup_steps=0",
        "method.csg_queue=16",
    ]


def test_zero_shot_head_is_open_clips_zero_shot_classifier(tmp_path):
    pytest.importorskip("open_clip")
    import open_clip
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from asg.data import build_data
    from asg.registries import load_checked_config
    from asg.zero_shot import zero_shot_model

    clip, *_ = tiny_clip(tmp_path)
    cfg = load_checked_config("visda17_clip_vitb16_erm", _overrides(tmp_path))
    data = build_data(cfg.data)
    model = zero_shot_model(cfg, data).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        ours = model(x).logits
        text = open_clip.build_zero_shot_classifier(
            clip, open_clip.get_tokenizer("ViT-B-16"), CLASSES, SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=12
        )
        image = torch.nn.functional.normalize(clip.encode_image(model.backbone.normalize(x)), dim=-1)
    assert torch.allclose(ours, image @ text, atol=1e-4)  # cosines: CLIP's logits / its temperature
    assert not any(p.requires_grad for p in model.head.parameters())


def test_evaluate_zero_shot_command_writes_its_evaluation(tmp_path, capsys):
    pytest.importorskip("open_clip")
    from asg.cli import main

    sets = [a for o in _overrides(tmp_path) for a in ("--set", o)]
    out = tmp_path / "zs_eval"
    assert main(["evaluate", "--zero-shot", "--config", "visda17_clip_vitb16_erm", *sets, "--out", str(out)]) == 0
    result = json.loads(next(out.glob("eval_zero_shot*.json")).read_text())
    assert result["checkpoint"] == "zero-shot" and set(result["sets"]) == {"source_val", "visda17_val"}
    assert result["sets"]["visda17_val"]["n"] == 12
    assert "zero-shot" in capsys.readouterr().out
    assert main(["evaluate", "--zero-shot", *sets]) != 0  # no --config: refused in one line
    assert "--zero-shot takes --config RECIPE" in capsys.readouterr().err


@pytest.mark.slow
def test_clip_table_trains_and_evaluates_every_row_once(tmp_path, one_thread, capsys):
    pytest.importorskip("open_clip")
    from asg.cli import main

    out = tmp_path / "table"
    sets = [a for o in _overrides(tmp_path) for a in ("--set", o)]
    assert main(["clip-table", "--out", str(out), *sets]) == 0
    table = json.loads((out / "table.json").read_text())
    labels = [r["label"] for r in table["rows"]]
    assert labels == [
        "zero-shot",
        "linear probe",
        "fine-tune",
        "fine-tune + proxy KL (CLIP zero-shot head)",
        "WiSE-FT",
        "CSG",
    ]
    for r in table["rows"]:
        assert all(0 <= r[k] <= 100 and math.isfinite(r[k]) for k in ("last", "source_val")), r
    rows = {r["label"]: r for r in table["rows"]}
    assert rows["WiSE-FT"]["last_alpha"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (out / "visda17_clip_vitb16_csg" / "done").is_file() and (out / "visda17_clip_vitb16_probe").is_dir()
    md = (out / "table.md").read_text()
    assert "| zero-shot |" in md and "| CSG |" in md and "88.7" in md
    # a second call reads every finished row instead of training it again
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/done")}
    assert main(["clip-table", "--out", str(out), *sets]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/done")} == before
    assert "| fine-tune |" in capsys.readouterr().out
