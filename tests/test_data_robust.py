"""Data robustness: 16-bit and EXIF-rotated images, paths with spaces, class-set inference, one-class warning,
folder checks, and bad image files before (stat) and during (decode) training."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from asg.config import DataConfig
from asg.data import (
    DataWarning,
    LabeledSubset,
    ListFileDataset,
    build_data,
    check_bundle_files,
    check_dataset,
    collate_skip_none,
    open_image,
    set_skip_log,
    warn_bundle,
)
from asg.data.check import CHECKS
from asg.data.classification.listfile import LIST_LAYOUT
from asg.data.files import unwrap
from asg.data.images import ImageReadError, wide_gray_to_l
from asg.errors import ConfigError, DataError


def _png(path: Path, color=(200, 10, 10), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------- decoding


WIDE = np.array([[0, 257 * 100, 65535]] * 3, dtype=np.uint16)  # 3x3, columns 0 | 100 | 255 in 8 bits


@pytest.mark.parametrize(
    ("name", "dtype", "mode_on_disk"),
    [("g.png", "<u2", "I;16"), ("g.tiff", ">u2", "I;16B"), ("g.tiff", "<i4", "I")],
)
def test_16bit_gray_scales_to_8bit(tmp_path, name, dtype, mode_on_disk):
    Image.fromarray(WIDE.astype(dtype)).save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode_on_disk  # the mode under test really is on disk
    assert np.asarray(open_image(tmp_path / name))[0].tolist() == [0, 100, 255]
    x, _ = ListFileDataset(_lines(tmp_path / "l.txt", [f"{name} 0"]), image_size=3)[0]
    assert x.shape == (3, 3, 3) and torch.equal(x[0], x[2])
    assert torch.allclose(x[1, 0], torch.tensor([0.0, 100 / 255, 1.0]))


def test_wide_gray_modes_in_memory():
    little = Image.frombytes("I;16L", (3, 1), WIDE[0].astype("<u2").tobytes())
    assert np.asarray(wide_gray_to_l(little)).tolist() == [[0, 100, 255]]
    wide = Image.fromarray(np.array([[0, 100_000, 200_000, -5]], dtype=np.int32))  # beyond 16 bits: own maximum
    assert wide.mode == "I" and np.asarray(wide_gray_to_l(wide)).tolist() == [[0, 128, 255, 0]]


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10, 0] = 255  # stored: left half red, right half blue
    arr[:, 10:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    img = open_image(tmp_path / "r.jpg")
    assert img.size == (10, 20)  # transposed
    up = np.asarray(img).astype(int)
    assert up[:10, :, 0].mean() > 200 and up[:10, :, 2].mean() < 60  # the left half is now on top
    assert up[10:, :, 2].mean() > 200
    ds = ListFileDataset(_lines(tmp_path / "l.txt", ["r.jpg 0"]), transform=np.asarray)
    assert ds[0][0].shape == (20, 10, 3)


# ----------------------------------------------------------------- list files


def test_list_paths_may_contain_spaces(tmp_path):
    _png(tmp_path / "my folder" / "a b.png")
    lst = _lines(tmp_path / "l.txt", ["my folder/a b.png   1  ", "\tmy folder/a b.png 0"])
    ds = ListFileDataset(lst, image_size=4)
    assert ds.paths == ["my folder/a b.png"] * 2 and ds.labels.tolist() == [1, 0]
    assert ds[0][0].shape == (3, 4, 4)
    assert "last field" in LIST_LAYOUT and "spaces" in LIST_LAYOUT


# ----------------------------------------------------------------- class set


def _listfile_tree(tmp_path: Path, train_labels: list[int], eval_labels: list[int]) -> tuple[Path, Path]:
    for i in range(max(len(train_labels), len(eval_labels))):
        _png(tmp_path / f"{i}.png")
    train = _lines(tmp_path / "train.txt", [f"{i}.png {y}" for i, y in enumerate(train_labels)])
    real = _lines(tmp_path / "real.txt", [f"{i}.png {y}" for i, y in enumerate(eval_labels)])
    return train, real


def _cfg(train: Path, real: Path | None = None, **kw) -> DataConfig:
    evals = {"real": str(real)} if real is not None else {}
    return DataConfig(name="listfile", train_list=str(train), eval_lists=evals, image_size=4, **kw)


def test_class_ids_without_training_images_are_refused(tmp_path):
    train, real = _listfile_tree(tmp_path, [0, 2, 2, 4, 0], [0])
    with pytest.raises(DataError) as err:
        build_data(_cfg(train, real, source_val_fraction=0.0))
    msg = str(err.value)
    assert "\n" not in msg and str(train) in msg and "class id(s) 1, 3 have no training image" in msg
    assert "data.num_classes" in msg
    b = build_data(_cfg(train, real, source_val_fraction=0.0, num_classes=5))  # intended: allowed, but warned
    assert b.num_classes == 5 and any("1, 3 have no training image" in w for w in b.warnings())


def test_eval_labels_outside_the_class_set_name_file_and_line(tmp_path):
    train, real = _listfile_tree(tmp_path, [0, 1, 0, 1], [0, 2])
    with pytest.raises(DataError, match=re.escape(f"{real}:2: label 2 is out of range [0, 2)")):
        build_data(_cfg(train, real, source_val_fraction=0.0))
    b = build_data(_cfg(train, real, source_val_fraction=0.0, class_names=["a", "b", "c"]))
    assert b.class_names == ["a", "b", "c"] and b.eval_sets["real"].labels.tolist() == [0, 2]


def test_one_class_training_set_warns(tmp_path, tiny_bundle):
    train, real = _listfile_tree(tmp_path, [0, 0, 0], [0])
    b = build_data(_cfg(train, real, source_val_fraction=0.0))
    assert b.num_classes == 1
    with pytest.warns(DataWarning, match="one class only .*meaningless 100%"):
        assert len(warn_bundle(b)) == 1
    assert tiny_bundle.warnings() == []  # three classes, all present


# ----------------------------------------------------------------- data check


def test_check_listfile_refuses_an_empty_list(tmp_path):
    lst = _lines(tmp_path / "l.txt", ["# only a comment"])
    report = check_dataset("listfile", str(lst))
    assert not report.ok and "has no entries" in report.errors[0]


def test_check_listfile_reports_empty_files(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "e.png").write_bytes(b"")
    report = check_dataset("listfile", str(_lines(tmp_path / "l.txt", ["a.png 0", "e.png 1"])))
    assert not report.ok and f"{tmp_path / 'e.png'}: empty (0 bytes) (listed at {tmp_path / 'l.txt'}:2)" in (
        "\n".join(report.errors)
    )
    assert report.summary["l"]["empty_files"] == 1 and "1 empty" in report.format()


@pytest.fixture
def folder_root(tmp_path) -> Path:
    root = tmp_path / "root"
    for name in ("c0", "c1"):
        _png(root / "train" / "cat" / f"{name}.png")
    _png(root / "train" / "dog" / "sub" / "d0.png")
    (root / "train" / "bird").mkdir()
    _png(root / "real" / "dog" / "r0.png")
    (root / "real" / "cat").mkdir()
    return root


def test_check_imagefolder_counts_splits_and_classes(folder_root):
    assert "imagefolder" in CHECKS
    report = check_dataset("imagefolder", str(folder_root))
    assert report.ok, report.errors
    assert report.summary["train"]["per_class"] == {"bird": 0, "cat": 2, "dog": 1}
    assert report.summary["real"]["images"] == 1 and report.summary["real"]["per_class"] == {"cat": 0, "dog": 1}
    assert sorted(w.split(":")[0] for w in report.warnings) == [
        str(folder_root / "real" / "cat"),
        str(folder_root / "train" / "bird"),
    ]
    assert "train: 3 images" in report.format() and "cat 2" in report.format()
    flat = check_dataset("imagefolder", str(folder_root / "train"))  # ROOT/<class>/... without a train folder
    assert flat.ok and flat.summary["train"]["images"] == 3


def test_check_imagefolder_errors(folder_root):
    (folder_root / "train" / "cat" / "empty.png").write_bytes(b"")
    (folder_root / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    (folder_root / "real" / "dog" / "r0.png").unlink()
    (folder_root / "real" / "fox").mkdir()
    report = check_dataset("imagefolder", str(folder_root))
    text = "\n".join(report.errors)
    assert not report.ok and f"{folder_root / 'train' / 'cat' / 'empty.png'}: empty (0 bytes)" in text
    assert f"image folder {folder_root / 'real'} holds no images" in text and "['fox']" in text
    assert "bad.jpg" not in text and "unreadable_images" not in report.summary["train"]  # not decoded
    verified = check_dataset("imagefolder", str(folder_root), verify_images=True)
    assert str(folder_root / "train" / "dog" / "bad.jpg") in "\n".join(verified.errors)
    assert verified.summary["train"]["unreadable_images"] == 1
    assert not check_dataset("imagefolder", str(folder_root / "absent")).ok


# ----------------------------------------------------------------- bad files before and during training


@pytest.fixture
def bad_tree(tmp_path) -> dict[str, Path]:
    for i in range(6):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    train = ["0.png 0", "1.png 1", "2.png 0", "3.png 1", "missing.png 0", "corrupt.png 1", "4.png 0", "5.png 1"]
    return {
        "dir": tmp_path,
        "train": _lines(tmp_path / "train.txt", train),
        "real": _lines(tmp_path / "real.txt", ["0.png 0", "empty.png 1", "1.png 1"]),
    }


def _bundle(tree, on_bad_image="error", fraction=0.0):
    return build_data(_cfg(tree["train"], tree["real"], source_val_fraction=fraction, on_bad_image=on_bad_image))


def test_bad_files_error_names_them_in_one_line(bad_tree):
    b = _bundle(bad_tree)
    with pytest.raises(DataError) as err:
        check_bundle_files(b, "error")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("2 image file(s) are missing or empty")
    d = bad_tree["dir"]
    assert f"{d / 'missing.png'}: missing (listed at {bad_tree['train']}:5)" in msg
    assert f"{d / 'empty.png'}: empty (0 bytes) (listed at {bad_tree['real']}:2)" in msg
    assert "data.on_bad_image=skip" in msg and "corrupt" not in msg  # nothing is decoded
    with pytest.raises(ConfigError, match="on_bad_image"):
        check_bundle_files(b, "ignore")


def test_skip_drops_bad_files_before_and_at_load(bad_tree, tmp_path):
    b = _bundle(bad_tree, "skip", fraction=0.25)
    kept, skipped = check_bundle_files(b, "skip")
    d = bad_tree["dir"]
    assert sorted(skipped) == sorted(
        [
            f"{d / 'missing.png'}: missing (listed at {bad_tree['train']}:5)",
            f"{d / 'empty.png'}: empty (0 bytes) (listed at {bad_tree['real']}:2)",
        ]
    )
    assert sum(kept.summary()[k] for k in ("train", "source_val")) == 7 and kept.summary()["real"] == 2
    assert b.summary()["real"] == 3  # the input bundle is left as it was
    log = tmp_path / "run" / "skipped_images.txt"
    log.parent.mkdir()
    assert set_skip_log(kept, log) == 2  # the train list (shared by train and source_val) and the real list
    items = {}
    for name, ds in {"train": kept.train, **kept.eval_sets}.items():
        items[name] = [ds[i] for i in range(len(ds))]
        good = [(i, it) for i, it in enumerate(items[name]) if it is not None]
        assert all(y == ds.labels[i] for i, (_, y) in good)  # labels stay consistent with the items
    nones = [it for its in items.values() for it in its if it is None]
    assert len(nones) == 1  # the corrupt image, decoded at load time
    (line,) = log.read_text().splitlines()
    assert line.startswith(f"{d / 'corrupt.png'}: cannot decode (listed at {bad_tree['train']}:6): ")
    batch = collate_skip_none([it for its in items.values() for it in its])
    assert batch[0].shape == (8, 3, 4, 4) and batch[1].shape == (8,)
    assert collate_skip_none([None, None]) is None


@pytest.mark.slow
def test_skip_log_is_written_from_loader_workers(bad_tree, tmp_path):
    b = _bundle(bad_tree, "skip")
    log = tmp_path / "skipped.txt"
    set_skip_log(b, log)
    ds = LabeledSubset(b.train, [0, 5, 6])  # 5 is the corrupt image
    (x, y) = next(iter(DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate_skip_none)))
    assert x.shape == (2, 3, 4, 4) and y.tolist() == [0, 0]
    assert log.read_text().startswith(f"{bad_tree['dir'] / 'corrupt.png'}: cannot decode")


def test_error_mode_raises_on_undecodable_image(bad_tree):
    ds = _bundle(bad_tree).train
    with pytest.raises(ImageReadError, match=re.escape(f"(listed at {bad_tree['train']}:6)")):
        ds[5]
    with pytest.raises(ConfigError, match="on_bad_image"):
        ListFileDataset(bad_tree["train"], on_bad_image="drop")


def test_nested_subsets_and_imagefolder_are_filtered(tmp_path, folder_root):
    (folder_root / "train" / "cat" / "c2.png").write_bytes(b"")
    b = build_data(DataConfig(name="imagefolder", root=str(folder_root), source_val_fraction=0.0, image_size=4))
    inner = LabeledSubset(b.train, [3, 2, 1, 0])  # train is cat/c0, cat/c1, cat/c2 (empty), dog/sub/d0
    b.eval_sets["nested"] = LabeledSubset(inner, [0, 1, 2])  # d0, c2, c1
    base, idx = unwrap(b.eval_sets["nested"])
    assert base is b.train and idx.tolist() == [3, 2, 1]
    kept, skipped = check_bundle_files(b, "skip")
    assert skipped == [f"{folder_root / 'train' / 'cat' / 'c2.png'}: empty (0 bytes)"]
    nested = kept.eval_sets["nested"]
    assert unwrap(nested)[1].tolist() == [3, 1] and nested.labels.tolist() == [2, 1]
    assert [nested[i][1] for i in range(2)] == [2, 1]
    assert len(kept.train) == 3 and kept.eval_sets["real"] is b.eval_sets["real"]


def test_all_bad_set_and_fileless_bundles(bad_tree, tiny_bundle):
    (bad_tree["dir"] / "0.png").unlink()
    (bad_tree["dir"] / "1.png").unlink()
    with pytest.raises(DataError, match="all 3 images of the 'real' set are missing or empty"):
        check_bundle_files(_bundle(bad_tree, "skip"), "skip")
    kept, skipped = check_bundle_files(tiny_bundle, "error")  # in-memory datasets pass through
    assert kept is tiny_bundle and skipped == [] and set_skip_log(tiny_bundle, "x.txt") == 0
