"""The Task objects: what differs between classification and segmentation, and the two bugs that sat in that seam."""

import json

import pytest
import torch
from helpers import Scenes
from torch import nn
from torch.utils.data import Dataset

from asg.config import ModelConfig
from asg.data import DataBundle
from asg.l2o.meta import meta_train
from asg.models import build_model
from asg.models.classifier import ModelOutput
from asg.tasks import CLASSIFICATION, SEGMENTATION, get_task, heldout_loss, task_of, task_with_metric


class PixelModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return ModelOutput(self.conv(x), torch.zeros(len(x), 1000), torch.zeros(len(x), 8))


def _bundle(train: Dataset, val: Dataset) -> DataBundle:
    return DataBundle(train, {"synthetic": val}, "synthetic", ["background", "red"], task="segmentation")


def test_tasks_name_their_metrics_and_protocol(tiny_config):
    cfg = tiny_config("data.eval_resize=[32, 64]")
    assert get_task("segmentation") is SEGMENTATION and task_with_metric("mean_class_acc") is CLASSIFICATION
    assert SEGMENTATION.protocol(cfg, 19)["eval_resize"] == [32, 64] and CLASSIFICATION.protocol(cfg, 10) == {}
    assert (SEGMENTATION.per_class, CLASSIFICATION.per_class) == ("per_class_iou", "per_class")
    assert task_of(_bundle(Scenes(2), Scenes(2))) is SEGMENTATION


def test_heldout_loss_compares_at_the_labels_resolution_under_eval_resize(tiny_config):
    """The held-out loss upsamples the logits to labels larger than the image (it raised a shape error)."""
    torch.manual_seed(0)
    model, val = PixelModel(), Scenes(5, size=16, label_scale=2)
    cfg = tiny_config("data.eval_batch_size=2")
    loss = heldout_loss(model, _bundle(Scenes(2), val), cfg, torch.device("cpu"))
    with torch.no_grad():
        logits = model(val.images).logits  # [5, 2, 16, 16]
        up = nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
        expected = nn.functional.cross_entropy(up, val.label.expand(5, 32, 32))
    assert loss == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_meta_training_a_segmenter_with_the_heldout_reward(tiny_config, tmp_path, one_thread):
    """Meta-training on a segmentation task reads the task's primary metric (it read mean_class_acc: KeyError)."""
    cfg = tiny_config(
        "l2o.episodes=1",
        "l2o.episode_steps=4",
        "l2o.min_steps=2",
        "l2o.num_steps=2",
        "l2o.reward=neg_heldout_loss",
        "data.image_size=32",
        "model.segmenter=lraspp",
        "method.name=erm",
    )
    torch.manual_seed(0)
    model = build_model(ModelConfig(segmenter="lraspp"), 2, task="segmentation")
    meta_train(cfg, tmp_path, data=_bundle(Scenes(16), Scenes(4, seed=1)), model=model, quiet=True)
    (row,) = [json.loads(line) for line in (tmp_path / "meta_history.jsonl").read_text().splitlines()]
    assert row["source_val_metric"] == "miou" and 0.0 <= row["source_val_score"] <= 1.0
    assert row["rewards"] and all(r < 0 for r in row["rewards"])
