"""Segmentation through the shared engine: loss with ignore, per-image KL, inference (flip, windows, label size),
and exact resume with random augmentation in DataLoader workers."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import CrashAt, RedIsOne, SizedScenes
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from asg.config import MethodConfig
from asg.engine.evaluation.evaluate import evaluate
from asg.engine.evaluation.metrics import EvalResult
from asg.engine.rundir.summary import real_average
from asg.engine.sampler import EpochBatchSampler, IndexedDataset
from asg.engine.trainer import Trainer
from asg.methods import build_method
from asg.models.classifier import ModelOutput
from asg.models.inference import segmentation_probs
from asg.tasks.base import confusion_matrix


def test_segmentation_loss_is_pixel_ce_over_labelled_pixels_plus_one_kl_per_image():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, :2] = 255
    student, teacher = torch.randn(2, 1000, generator=g), torch.randn(2, 1000, generator=g)
    out = ModelOutput(logits, student, torch.zeros(2, 8))
    lo = build_method(MethodConfig(name="asg", kl_weight=75.0)).loss(out, labels, teacher)

    log_p = torch.log_softmax(logits.double(), dim=1)
    picked = [
        -log_p[b, labels[b, i, j], i, j] for b in range(2) for i in range(4) for j in range(5) if labels[b, i, j] != 255
    ]
    ce = torch.stack(picked).mean()
    p_t = torch.softmax(teacher.double(), 1)
    kl = (p_t * (torch.log_softmax(teacher.double(), 1) - torch.log_softmax(student.double(), 1))).sum(1).mean()
    assert len(picked) == 2 * 20 - 10
    assert float(lo.logs["task_loss"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(lo.logs["kl"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(lo.loss) == pytest.approx(float(ce + 75.0 * kl), rel=1e-5)


class PixelModel(nn.Module):
    """A per-pixel classifier (1x1 conv): flip-equivariant and translation-equivariant, so flip TTA and
    sliding windows must reproduce its whole-image prediction exactly."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        torch.nn.init.normal_(self.conv.weight, std=3.0)

    def forward(self, x):
        return ModelOutput(self.conv(x), torch.zeros(len(x), 1000), torch.zeros(len(x), 8))


class LeftBiased(PixelModel):
    """Adds a bias towards class 0 on the left half of its input: not flip-equivariant."""

    def forward(self, x):
        out = super().forward(x)
        out.logits[:, 0, :, : x.shape[3] // 2] += 100.0
        return out


def test_flip_tta_maps_the_mirrored_prediction_back():
    x = torch.rand(2, 3, 9, 14)
    model = PixelModel().eval()
    with torch.no_grad():
        plain = segmentation_probs(model, x)
        tta = segmentation_probs(model, x, tta_flip=True)
        biased = segmentation_probs(LeftBiased().eval(), x, tta_flip=True)
    assert torch.allclose(plain, tta, atol=1e-6)  # a flip-equivariant model: TTA changes nothing when flipped back
    # the left-biased model votes class 0 on the left half itself and, mirrored, on the right half
    assert float(biased[:, 0].min()) >= 0.5 - 1e-6


@pytest.mark.parametrize("window,stride", [((4, 6), (3, 4)), ((5, 5), None), ((16, 20), None)])
def test_sliding_window_equals_whole_image_for_a_pixelwise_model(window, stride):
    x = torch.rand(1, 3, 11, 13)
    model = PixelModel().eval()
    with torch.no_grad():
        whole = segmentation_probs(model, x)
        slid = segmentation_probs(model, x, window=window, stride=stride)
    assert slid.shape == whole.shape
    assert torch.allclose(whole, slid, atol=1e-6)


def test_evaluation_upsamples_to_each_label_and_ignores_255():
    ds = SizedScenes([(6, 8), (6, 8), (4, 10)])  # mixed sizes in one batch
    result = evaluate(RedIsOne(), ds, 2, batch_size=3, task="segmentation", show_progress=False)
    labelled = sum((2 * h - 1) * 2 * w for h, w in ds.sizes)
    assert result.confusion.sum() == labelled  # every labelled pixel of every image counted once, 255 left out
    assert result.to_dict()["miou"] == pytest.approx(1.0)
    assert result.to_dict()["pixel_acc"] == pytest.approx(1.0)


def test_miou_with_ignore_on_a_hand_made_example():
    labels = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 255]])
    preds = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    cm = confusion_matrix(labels, preds, 3, ignore_index=255)
    r = EvalResult(cm, task="segmentation")
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    metrics = r.to_dict()
    assert metrics["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert metrics["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert metrics["pixel_acc"] == pytest.approx(4 / 6)
    assert r.primary == metrics["miou"]


def test_real_average_is_labelled_and_needs_two_sets():
    a = EvalResult(np.array([[2, 0], [0, 2]]), task="segmentation")
    b = EvalResult(np.array([[1, 1], [1, 1]]), task="segmentation")
    sets = {"source_val": a.to_dict(), "cityscapes": a.to_dict(), "bdd100k": b.to_dict()}
    avg = real_average(sets, ["cityscapes", "bdd100k"], "miou")
    assert avg["metric"] == "miou" and avg["over"] == ["cityscapes", "bdd100k"]
    assert avg["value"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert real_average({"cityscapes": a.to_dict()}, ["cityscapes", "mapillary"], "miou") is None


class NoisyImages(Dataset):
    """Images with random noise drawn from torch's global RNG at every access (like a random crop)."""

    def __init__(self, base):
        self.base = base
        self.labels = base.labels

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x + 0.2 * torch.rand(x.shape)).clamp(0, 1), y


def test_sample_seeds_make_augmentation_a_function_of_the_step():
    ds = IndexedDataset(NoisyImages(_Fixed()))
    a = [[ds[key] for key in batch] for batch in EpochBatchSampler(6, 2, seed=3, total_steps=5, with_seeds=True)]
    torch.rand(7)  # the ambient RNG moves: the samples must not
    tail = list(EpochBatchSampler(6, 2, seed=3, start_step=3, total_steps=5, with_seeds=True))
    b = [[ds[key] for key in batch] for batch in tail]
    for got, want in zip(b, a[3:]):
        for (xg, yg, ig), (xw, yw, iw) in zip(got, want):
            assert ig == iw and yg == yw and torch.equal(xg, xw)
    assert not torch.equal(a[0][0][0], ds[a[0][0][2]][0])  # a plain index draws from the ambient RNG instead


class _Fixed(Dataset):
    labels = [0, 1, 2, 0, 1, 2]

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.full((3, 8, 8), i / 10), self.labels[i]


@pytest.mark.slow
def test_resume_with_random_augmentation_in_two_workers_equals_uninterrupted(
    tiny_bundle, tiny_config, tmp_path, monkeypatch
):
    bundle = dataclasses.replace(tiny_bundle, train=NoisyImages(tiny_bundle.train), has_augmentation=True)
    cfg = tiny_config("train.steps=5", "data.num_workers=2")
    Trainer(cfg, tmp_path / "a", data=bundle, quiet=True).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", data=bundle, quiet=True, callbacks=[CrashAt(3)]).fit()
    Trainer(cfg, tmp_path / "b", data=bundle, quiet=True, resume=True).fit()
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs at {k}"
