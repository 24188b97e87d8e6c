"""Digit scenes: shapes and ranges, labels that match the pixels, seeds, real sources, cache, source-val split."""

import numpy as np
import pytest
import torch

from asg.config import DataConfig
from asg.data import balanced_subset
from asg.data.bundle import IGNORE_INDEX
from asg.data.segmentation import digit_scenes as sc

SIZE = 32


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes_cache")
    cfg = DataConfig(name="digit_scenes", root=str(root), num_train=40, image_size=SIZE, flip=True)
    return sc.build_digit_scenes(cfg, num_real=30), cfg


def test_bundle_samples_shapes_dtypes_ranges(bundle):
    b, _ = bundle
    assert b.task == "segmentation" and b.class_names == ["background", *map(str, range(10))]
    assert b.num_classes == 11 and b.ignore_index == IGNORE_INDEX == 255
    assert len(set(b.palette)) == 11 and b.palette[0] == (0, 0, 0)
    assert b.source_val_name == "synthetic" and b.real_set_names == ["mnist_photos"]
    assert b.summary() == {"train": 36, "synthetic": 4, "mnist_photos": 30}
    for ds in (b.train, *b.eval_sets.values()):
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1
            assert y.dtype == torch.int64 and y.shape == (SIZE, SIZE)
            values = set(y.unique().tolist())
            assert values <= set(range(11)) | {255} and 0 in values and len(values - {0, 255}) >= 1


def test_no_flip_no_augmentation_and_no_false_warnings(bundle):
    b, cfg = bundle
    assert cfg.flip and not b.has_augmentation  # data.flip is ignored: a mirrored digit is another shape
    x1, y1 = b.train[3]
    x2, y2 = b.train[3]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert b.warnings() == []  # the train set has no per-image label that could flag "background" as missing
    real = b.eval_sets["mnist_photos"]
    assert set(real.labels.tolist()) <= set(range(1, 11))
    assert len(balanced_subset(real, 10)) == 10  # data.eval_max_per_set works on the scene sets


def test_source_val_split_is_disjoint_and_deterministic(bundle):
    b, cfg = bundle
    train, val = b.train, b.eval_sets["synthetic"]
    assert not set(train.ids) & set(val.ids) and sorted([*train.ids, *val.ids]) == list(range(40))
    images, masks = sc.synthetic_scenes(40, cfg.split_seed, SIZE, cfg.root)
    assert np.array_equal(train.images, images[train.ids]) and np.array_equal(val.masks, masks[val.ids])
    again = sc.build_digit_scenes(cfg, num_real=30)
    assert np.array_equal(again.eval_sets["synthetic"].ids, val.ids)


def test_paste_digit_labels_core_edge_and_occlusion():
    image = np.full((6, 6, 3), 0.5, np.float32)
    mask = np.zeros((6, 6), np.uint8)
    alpha = np.array([[1.0, 0.3, 0.1]], np.float32)
    sc.paste_digit(image, mask, alpha, 2, 1, np.array([1.0, 0.0, 0.0], np.float32), cls=4)
    assert mask[2, 1:4].tolist() == [4, 255, 0] and mask.sum() == 4 + 255
    np.testing.assert_allclose(image[2, 1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(image[2, 3], [0.55, 0.45, 0.45])
    assert (image[[0, 1, 3, 4, 5]] == 0.5).all()
    # a later digit occludes: its core relabels, its edge becomes ignore, its faint tint keeps the label below
    sc.paste_digit(image, mask, np.array([[0.05, 0.9, 0.2]], np.float32), 2, 1, np.zeros(3, np.float32), cls=7)
    assert mask[2, 1:4].tolist() == [4, 7, 255]


def test_composed_scene_labels_match_pixels():
    fonts = [sc.ImageFont.truetype(str(p), 48) for p in sc.digits.digit_fonts()[:3]]
    for seed in range(12):  # every texture kind, pen and font digits
        rng = np.random.default_rng(seed)
        background = sc.texture(rng, SIZE)
        classes = [int(c) + 1 for c in rng.integers(10, size=3)]
        glyphs = [(sc.fit_glyph(sc.synthetic_glyph(rng, fonts, str(c - 1)), 14, SIZE, 10.0), c) for c in classes]
        image, mask = sc.compose(rng, background, glyphs)
        diff = np.abs(image / 255.0 - background)
        digit = (mask >= 1) & (mask <= 10)
        assert set(np.unique(mask[digit])) == set(classes)  # every pasted class is visible
        lum = (image / 255.0 - background) @ sc._LUMA
        assert np.abs(lum[digit]).mean() > 0.2 and (diff[digit].max(-1) > 0.05).mean() > 0.95
        assert diff[mask == 0].max() <= sc.EDGE + 1.5 / 255  # background pixels are (nearly) the texture


def test_synthetic_scenes_deterministic_per_seed():
    fonts = sc.digits.digit_fonts()
    a = sc.render_synthetic_scenes(6, seed=1, size=SIZE, fonts=fonts)
    b = sc.render_synthetic_scenes(6, seed=1, size=SIZE, fonts=fonts)
    c = sc.render_synthetic_scenes(6, seed=2, size=SIZE, fonts=fonts)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    digit_fraction = ((a[1] >= 1) & (a[1] <= 10)).mean()
    assert 0.05 < digit_fraction < 0.5


def test_real_scenes_come_from_mnist_and_photos(monkeypatch):
    images, masks = sc.render_real_scenes(30, seed=0, size=SIZE)
    again = sc.render_real_scenes(30, seed=0, size=SIZE)
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[1])
    counts = np.bincount(masks.ravel(), minlength=256)
    assert (counts[1:11] > 0).sum() >= 8 and counts[0] > counts[1:11].sum()
    # with a fake MNIST (only "3"s: a filled square) and a plain photo, scenes hold exactly those
    fake = np.zeros((5, 28, 28), np.uint8)
    fake[:, 8:20, 8:20] = 255
    monkeypatch.setattr(sc.digits, "mnist5k", lambda: (fake, np.full(5, 3)))
    monkeypatch.setattr(sc, "_photos", lambda: [np.full((100, 120, 3), 40, np.uint8)])
    images, masks = sc.render_real_scenes(4, seed=0, size=SIZE)
    assert set(np.unique(masks)) <= {0, 4, 255} and (masks == 4).any()
    assert (images[masks == 0] == 40).all() and (images[masks == 4] > 40 + 80).all()  # light strokes on dark


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    images, masks = sc.synthetic_scenes(10, 0, SIZE, tmp_path)
    real = sc.real_scenes(5, 0, SIZE, tmp_path)
    assert len(list(tmp_path.glob("scenes_v*_n10_seed0_s32_fonts*.npz"))) == 1
    assert len(list(tmp_path.glob("mnistphotos_v*_n5_seed0_s32_photos*.npz"))) == 1
    monkeypatch.setattr(sc, "render_synthetic_scenes", lambda *a, **k: pytest.fail("rendered again"))
    monkeypatch.setattr(sc, "render_real_scenes", lambda *a, **k: pytest.fail("rendered again"))
    cached = sc.synthetic_scenes(10, 0, SIZE, tmp_path)
    assert np.array_equal(cached[0], images) and np.array_equal(cached[1], masks)
    assert np.array_equal(sc.real_scenes(5, 0, SIZE, tmp_path)[1], real[1])
    with pytest.raises(pytest.fail.Exception):
        sc.synthetic_scenes(10, 1, SIZE, tmp_path)  # another seed is another cache file


def test_pen_digits_every_variant_draws_a_digit_deterministically():
    from asg.data.classification.pen_digits import TEMPLATES, pen_digit, smooth_path

    path = smooth_path([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)])
    assert np.allclose(path[0], [0, 0]) and np.allclose(path[-1], [1, 1])  # the spline passes through its ends
    assert np.allclose(smooth_path([(0.0, 0.0), (1.0, 1.0)])[6], [0.5, 0.5])  # two points: a straight line
    for digit, variants in TEMPLATES.items():
        assert variants and all(len(stroke) >= 2 for v in variants for stroke in v)
        a = pen_digit(np.random.default_rng(digit), digit, px=24)
        b = pen_digit(np.random.default_rng(digit), digit, px=24)
        assert a.shape == (48, 48) and a.dtype == np.float32 and np.array_equal(a, b)
        assert 0.0 <= a.min() and a.max() <= 1.0 and (a > 0.5).sum() > 20  # ink, with a solid core
        rows = np.flatnonzero((a > 0.5).any(1))
        assert rows[-1] - rows[0] >= 12  # about px tall (after rotation and shear)


def test_distractor_letters_are_background_and_digits_only_from_pen_or_font():
    image = np.full((6, 6, 3), 0.5, np.float32)
    mask = np.zeros((6, 6), np.uint8)
    mask[2, 3] = 5  # a digit pixel under the letter's faint edge keeps its label
    sc.paste_digit(image, mask, np.array([[1.0, 0.3, 0.1]], np.float32), 2, 1, np.ones(3, np.float32), cls=0)
    assert mask[2, 1:4].tolist() == [0, 0, 5] and (image[2, 1] == 1.0).all()  # painted, labelled background
    fonts = [sc.ImageFont.truetype(str(p), 32) for p in sc.digits.digit_fonts()[:2]]
    rng = np.random.default_rng(0)
    for text in ("A", "k", "7"):
        alpha = sc.synthetic_glyph(rng, fonts, text)
        assert alpha.ndim == 2 and alpha.max() > 0.5 and alpha.dtype == np.float32
    assert set(sc.DISTRACTORS) & set("0123456789OoIlSsZzBGbgq") == set()


def test_synthetic_scenes_hold_two_to_four_digits():
    _, masks = sc.render_synthetic_scenes(20, seed=3, size=48)
    counts = [len(set(np.unique(m)) - {0, 255}) for m in masks]  # classes visible (two digits may share one)
    assert all(1 <= c <= sc.DIGITS_PER_SCENE[1] for c in counts) and max(counts) >= 3


def test_synthetic_side_never_reads_real_digits_or_photos(monkeypatch, bundle):
    def refuse(*args, **kwargs):
        raise AssertionError("the synthetic renderer read real data")

    monkeypatch.setattr(sc.digits, "mnist5k", refuse)
    monkeypatch.setattr(sc, "_photos", refuse)
    monkeypatch.setattr(sc, "photo_files", refuse)
    images, _ = sc.render_synthetic_scenes(4, seed=0, size=SIZE)
    assert images.shape == (4, SIZE, SIZE, 3)
    b, _ = bundle
    real = {x.tobytes() for x in b.eval_sets["mnist_photos"].images}
    assert not real & {x.tobytes() for x in b.train.images}  # no real scene among the training scenes


def test_every_evaluation_reports_the_mean_digit_iou(bundle, tmp_path):
    """Issue 27.8: the scenes' main figure (mean IoU of the ten digit classes) is in every results.jsonl row, in
    summary.json's selections and in the run's report.md, not only in the demo's report."""
    import json

    from asg.engine.trainer import Trainer
    from asg.registries import load_checked_config

    b, _ = bundle
    assert b.class_groups == {"digit": tuple(range(1, 11)), "background": (0,)}
    overrides = ["model.weights=none", "data.image_size=32", "data.batch_size=4", "train.steps=2"]
    overrides += ["train.eval_every=2", "train.progress=false", "eval.retention=false", "optim.warmup_steps=0"]
    cfg = load_checked_config("digit_scenes_erm", overrides)
    Trainer(cfg, tmp_path / "run", data=b, quiet=True).fit()
    row = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])
    for metrics in row["metrics"].values():
        iou = metrics["per_class_iou"]
        digits = [v for v in iou[1:] if v is not None]
        assert metrics["group_means"]["digit"] == pytest.approx(sum(digits) / len(digits))
        assert metrics["group_means"]["background"] == pytest.approx(iou[0])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "digit" in summary["selections"]["last"]["metrics"]["mnist_photos"]["group_means"]
    report = (tmp_path / "run" / "report.md").read_text()
    header = report.split("Mean IoU (%) of each class group:\n\n")[1].splitlines()[0]
    assert "| mnist_photos digit |" in header and "| synthetic background |" in header
