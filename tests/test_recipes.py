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
        "train", [512, 512], [0.75, 1.25], 6)  # fmt: skip
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.sgd) == (100000, 1e-3, 0.1, "torch")
    assert cfg.optim.bn_mode == "frozen" and not cfg.eval.tta_flip and cfg.data.eval_resize is None
    l2o = load_config("gta5_cityscapes_fcn8s_vgg16_asg_l2o", ["l2o.policy=p"])
    assert (l2o.l2o.min_steps, l2o.method.kl_cap, l2o.optim.backbone_lr_mult) == (20, 9.0, 1.0)
