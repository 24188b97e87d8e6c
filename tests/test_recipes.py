"""Every shipped recipe loads, names a registered dataset, and pairs its segmenter with a backbone it runs on."""

from pathlib import Path

import pytest

import asg
from asg.config import load_config
from asg.data import DATASETS
from asg.models import BACKBONES
from asg.models.segmenter import SEGMENTERS

RECIPES = sorted((Path(asg.__file__).parent / "recipes").glob("*.yaml"))
SEGMENTATION = {"digit_scenes", "gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_is_valid(path):
    cfg = load_config(path, ["l2o.policy=placeholder"] if "l2o" in path.stem else [])
    assert cfg.data.name in DATASETS and cfg.model.backbone in BACKBONES
    if cfg.data.name in SEGMENTATION:
        assert cfg.model.backbone in SEGMENTERS[cfg.model.segmenter].backbones


def test_official_gta5_recipe_settings():
    cfg = load_config("gta5_cityscapes_fcn8s_vgg16_asg")
    assert (cfg.method.name, cfg.method.kl_weight) == ("asg", 75.0)
    assert (cfg.data.split, cfg.data.crop_size, cfg.data.scale_range, cfg.data.batch_size) == (
        "train",
        [512, 512],
        [0.75, 1.25],
        6,
    )
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.sgd) == (100000, 1e-3, 0.1, "torch")
    assert cfg.optim.bn_mode == "frozen" and not cfg.eval.tta_flip and cfg.data.eval_resize is None
    l2o = load_config("gta5_cityscapes_fcn8s_vgg16_asg_l2o", ["l2o.policy=p"])
    assert (l2o.l2o.min_steps, l2o.method.kl_cap, l2o.optim.backbone_lr_mult) == (20, 9.0, 1.0)


OWN_DATA = ["imagefolder_erm", "imagefolder_asg", "seglist_erm", "seglist_asg"]


@pytest.mark.parametrize("name", OWN_DATA)
def test_own_data_recipes_carry_no_benchmark_leftovers(name):
    """The recipes for a person's own images name no embedded or official benchmark, and pretrained weights that
    ship with pip (nothing to download)."""
    from asg.config import config_to_dict

    cfg = load_config(name)
    assert "digit" not in str(config_to_dict(cfg)).lower()
    assert cfg.data.name in ("imagefolder", "seglist")
    assert cfg.data.eval_roots == {} and cfg.eval.oracle_set is None and cfg.data.source_val_fraction > 0
    assert (cfg.model.backbone, cfg.model.weights) == ("efficientnet_lite0", "imagenet")
    assert cfg.method.name == name.rsplit("_", 1)[1]
    if cfg.data.name == "seglist":
        assert cfg.model.segmenter == "fpn" and cfg.data.crop_size == [512, 512] and not cfg.teacher.cache


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seglist_erm", "seglist_asg"])
def test_seglist_recipes_train_on_a_tiny_list(name, tmp_path):
    """Two steps of each segmentation own-data recipe on a list of four 40x48 pairs (train) and two (real)."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from asg.cli import main

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("real", 2)):
        lines = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{split}{i}.png")
            Image.fromarray(rng.integers(0, 3, (40, 48), dtype=np.uint8)).save(tmp_path / f"{split}{i}_label.png")
            lines.append(f"{split}{i}.png {split}{i}_label.png")
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    sets = [
        f"data.train_list={tmp_path / 'train.txt'}",
        f"data.eval_lists.real={tmp_path / 'real.txt'}",
        "data.class_names=[ground,thing,sky]",
        "data.crop_size=[32,32]",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.source_val_fraction=0.25",
        "train.steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.progress=false",
        "eval.retention=false",
        "optim.warmup_steps=0",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "run"
        assert main(["train", "--config", name, *[f"--set={s}" for s in sets], "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["class_names"] == ["ground", "thing", "sky"]
    assert set(summary["selections"]["oracle"]["metrics"]) == {"source_val", "real"}
