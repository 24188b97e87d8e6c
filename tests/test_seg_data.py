"""Segmentation datasets on tiny fixture trees in their real layouts, id tables, paired transforms, prepare, check."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import H, W, random_ids, save_image, tree_hash, write_png16
from PIL import Image

from asg.config import DataConfig
from asg.data.bundle import IGNORE_INDEX
from asg.data.segmentation.pairs import EvalPairTransform, PairTransform, read_label
from asg.data.segmentation.prepare import prepare
from asg.data.segmentation.street_check import check
from asg.data.segmentation.street_classes import (
    CITYSCAPES_CLASSES,
    cityscapes_lut,
    class_names,
    mapillary_lut,
    synthia_lut,
)
from asg.data.segmentation.street_scenes import build_segmentation, find_pairs
from asg.errors import DataError

CS_IDS = [0, 7, 8, 11, 26, 33]  # Cityscapes labelIds used in fixtures
CS_TRAIN = {0: 255, 7: 0, 8: 1, 11: 2, 26: 13, 33: 18}


# --------------------------------------------------------------------------------------------------- fixtures
def save_ids(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    """Class ids as a gray "L" PNG, or as a palette "P" PNG (as GTA5/Cityscapes colour-coded labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids.astype(np.uint8))
    if palette:  # same indices, shown as colours: a reader that decodes colours (cv2) gets other values
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(path)


def make_gta5(root: Path, n: int = 6, split_mat: bool = True) -> dict[str, np.ndarray]:
    """root/images/NNNNN.png, root/labels/NNNNN.png (palette PNG of labelIds), root/split.mat; returns raw ids."""
    raw = {}
    for k in range(1, n + 1):
        save_image(root / "images" / f"{k:05d}.png", k)
        raw[f"{k:05d}"] = random_ids(k, CS_IDS)
        save_ids(root / "labels" / f"{k:05d}.png", raw[f"{k:05d}"], palette=True)
    if split_mat:
        from scipy.io import savemat

        savemat(
            str(root / "split.mat"),
            {"trainIds": np.array([[1, 2, 3, 4]]), "valIds": np.array([[5]]), "testIds": np.array([[6]])},
        )
    return raw


def make_cityscapes(root: Path, split: str = "val", train_ids: bool = False) -> dict[str, np.ndarray]:
    """leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_label(Train)Ids.png."""
    expected = {}
    for k, city in enumerate(["aachen", "bremen", "bremen"]):
        base = f"{city}_000000_{k:06d}"
        save_image(root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png", 100 + k)
        raw = random_ids(100 + k, CS_IDS)
        ids = np.vectorize(CS_TRAIN.get)(raw)
        expected[base] = ids
        if train_ids:
            save_ids(root / "gtFine" / split / city / f"{base}_gtFine_labelTrainIds.png", ids)
        else:
            save_ids(root / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", raw)
    return expected


def cfg(**kw) -> DataConfig:
    base = dict(source_val_fraction=0.0, flip=False)
    base.update(kw)
    return DataConfig(**base)


# ------------------------------------------------------------------------------------------------- id tables
def test_cityscapes_table_maps_label_ids_png_to_train_ids(tmp_path):
    raw = np.array([list(range(34)) + [255, 0]], dtype=np.uint8).reshape(4, 9)
    save_ids(tmp_path / "l.png", raw, palette=True)
    got = cityscapes_lut()[read_label(tmp_path / "l.png")]
    expected = np.full(36, 255)
    for lid, tid in {
        7: 0,
        8: 1,
        11: 2,
        12: 3,
        13: 4,
        17: 5,
        19: 6,
        20: 7,
        21: 8,
        22: 9,
        23: 10,
        24: 11,
        25: 12,
        26: 13,
        27: 14,
        28: 15,
        31: 16,
        32: 17,
        33: 18,
    }.items():
        expected[lid] = tid
    assert got.ravel().tolist() == expected.tolist()
    assert cityscapes_lut()[34] == -1  # not a Cityscapes labelId: an error when met


def test_synthia_16_and_13_class_tables():
    ids = [3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]  # road ... bicycle in 16-class order
    lut16 = synthia_lut(16)
    assert lut16[ids].tolist() == list(range(16))
    assert class_names(16)[9] == "sky" and len(class_names(16)) == 16
    assert [lut16[i] for i in (0, 13, 14, 22)] == [255] * 4  # void, parking slot, road work, lane marking
    lut13 = synthia_lut(13)
    assert lut13[[21, 5, 7]].tolist() == [255, 255, 255]  # wall, fence, pole dropped
    assert lut13[[3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]].tolist() == list(range(13))
    assert class_names(13) == [c for c in class_names(16) if c not in ("wall", "fence", "pole")]
    assert lut16[23] == -1


def test_mapillary_sample_ids():
    lut = mapillary_lut()
    sample = {
        13: 0,
        24: 0,
        41: 0,
        2: 1,
        15: 1,
        17: 2,
        6: 3,
        3: 4,
        45: 5,
        47: 5,
        48: 6,
        50: 7,
        30: 8,
        29: 9,
        27: 10,
        19: 11,
        20: 12,
        22: 12,
        55: 13,
        61: 14,
        54: 15,
        58: 16,
        57: 17,
        52: 18,
        49: 255,
        65: 255,
        0: 255,
    }
    assert {k: int(lut[k]) for k in sample} == sample
    assert lut[66] == -1
    assert mapillary_lut(16)[[29, 61, 58, 55]].tolist() == [255, 255, 255, 12]


def test_read_label_palette_indices_and_16bit_first_channel(tmp_path):
    ids = random_ids(0, [1, 2, 21, 300])
    arr = np.stack([ids, np.full_like(ids, 4000), np.zeros_like(ids)], -1)
    write_png16(tmp_path / "s.png", arr)
    assert np.array_equal(read_label(tmp_path / "s.png", channel=0), ids)
    with pytest.raises(DataError, match="16-bit colour"):
        read_label(tmp_path / "s.png")
    save_ids(tmp_path / "p.png", ids % 34, palette=True)
    with Image.open(tmp_path / "p.png") as img:
        assert img.mode == "P"
    assert np.array_equal(read_label(tmp_path / "p.png"), ids % 34)  # indices, not palette colours


# ------------------------------------------------------------------------------------------------- transforms
def encoded_pair(label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    lab = torch.from_numpy(label.astype(np.uint8))
    return (lab * 10).expand(3, -1, -1).contiguous(), lab


def test_crop_pad_flip_keep_image_and_label_aligned():
    label = np.random.default_rng(0).integers(0, 19, (H, W))
    image, lab = encoded_pair(label)
    tf = PairTransform(crop_size=[10, 7], flip=True)
    seen_flip = set()
    for seed in range(8):
        torch.manual_seed(seed)
        img_o, lab_o = tf(image, lab)
        assert img_o.shape == (3, 10, 7) and lab_o.shape == (10, 7)
        pad = lab_o == IGNORE_INDEX
        assert pad[H:].all() and not pad[:H].any()  # image 8 high, padded to 10 with 255
        assert (img_o[:, pad] == 0).all()
        assert torch.equal(img_o[0][~pad], lab_o[~pad] * 10)  # every labelled pixel still matches its image
        seen_flip.add(any(torch.equal(lab_o[:H], lab[:, c : c + 7].flip(-1)) for c in range(W - 6)))
    assert seen_flip == {True, False}


def test_scaling_never_interpolates_labels_and_stays_aligned():
    blocks = np.random.default_rng(1).choice([0, 9, 18], size=(4, 6))
    label = np.kron(blocks, np.ones((4, 4), dtype=np.int64))  # 16x24, 4x4 blocks
    image, lab = encoded_pair(label)
    tf = PairTransform(train_resize=[16, 24], scale_range=[1.3, 2.2], crop_size=[20, 20], flip=True)
    for seed in range(4):
        torch.manual_seed(seed)
        img_o, lab_o = tf(image, lab)
        assert set(lab_o.unique().tolist()) <= {0, 9, 18}  # nearest: no blended ids
        lab_f = lab_o.float()[None, None]
        uniform = torch.nn.functional.max_pool2d(lab_f, 3, 1, 1) == -torch.nn.functional.max_pool2d(-lab_f, 3, 1, 1)
        interior = uniform[0, 0] & (lab_o != IGNORE_INDEX)
        interior[[0, -1]], interior[:, [0, -1]] = False, False  # the crop's edge: neighbours outside it are unseen
        assert interior.float().mean() > 0.3
        diff = (img_o[0].float() - lab_o.float() * 10).abs()
        assert diff[interior].max() <= 1


def test_transform_is_deterministic_under_manual_seed_and_reports_randomness():
    image, lab = encoded_pair(np.random.default_rng(2).integers(0, 19, (H, W)))
    tf = PairTransform(scale_range=[0.5, 1.5], crop_size=[6, 6], flip=True)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outs.append(tf(image, lab))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert tf.is_random
    assert not PairTransform(train_resize=[8, 8], crop_size=[8, 8]).is_random  # crop cannot move
    assert PairTransform(train_resize=[8, 10], crop_size=[8, 8]).is_random
    assert not PairTransform().is_random and PairTransform(flip=True).is_random


def test_eval_transform_resizes_image_only():
    image, lab = encoded_pair(np.zeros((H, W), dtype=np.int64))
    img_o, lab_o = EvalPairTransform([4, 6])(image, lab)
    assert img_o.shape == (3, 4, 6) and lab_o.shape == (H, W)


# ------------------------------------------------------------------------------------------------- datasets
def test_gta5_splits_mapping_and_source_val(tmp_path):
    raw = make_gta5(tmp_path / "gta5")
    b = build_segmentation(cfg(name="gta5", root=str(tmp_path / "gta5"), split="train", source_val_fraction=0.25))
    assert b.task == "segmentation" and b.num_classes == 19 and len(b.palette) == 19
    assert len(b.train) == 3 and len(b.eval_sets["source_val"]) == 1 and b.source_val_name == "source_val"
    assert not hasattr(b.train, "labels") and not b.has_augmentation
    again = build_segmentation(cfg(name="gta5", root=str(tmp_path / "gta5"), split="train", source_val_fraction=0.25))
    assert again.eval_sets["source_val"].image_path(0) == b.eval_sets["source_val"].image_path(0)
    image, target = b.train[0]
    stem = b.train.image_path(0).stem
    assert image.dtype == torch.float32 and image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert target.dtype == torch.int64
    assert target.numpy().tolist() == np.vectorize(CS_TRAIN.get)(raw[stem]).tolist()
    assert b.train.label_path(0) == tmp_path / "gta5" / "labels" / f"{stem}.png"
    assert len(find_pairs("gta5", tmp_path / "gta5", "all").images) == 6
    assert [p.stem for p in find_pairs("gta5", tmp_path / "gta5", "val").images] == ["00005"]


def test_gta5_missing_split_mat_and_wrong_root(tmp_path):
    make_gta5(tmp_path / "g", split_mat=False)
    with pytest.raises(DataError, match=r"split\.mat.*data\.split=all"):
        build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="train"))
    assert len(build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="all")).train) == 6
    (tmp_path / "wrong" / "pics").mkdir(parents=True)
    with pytest.raises(DataError, match=r"wrong/images is missing.*found in .*: pics/"):
        build_segmentation(cfg(name="gta5", root=str(tmp_path / "wrong"), split="all"))


def test_synthia_16bit_labels_16_and_13_classes(tmp_path):
    root = tmp_path / "RAND_CITYSCAPES"
    ids = random_ids(5, [0, 1, 3, 8, 21, 22])
    for k in range(2):
        save_image(root / "RGB" / f"{k:07d}.png", k)
        write_png16(root / "GT" / "LABELS" / f"{k:07d}.png", np.stack([ids, ids * 0 + 7, ids * 0], -1))
    for class_set, table in (
        (16, {0: 255, 1: 9, 3: 0, 8: 12, 21: 3, 22: 255}),
        (13, {0: 255, 1: 6, 3: 0, 8: 9, 21: 255, 22: 255}),
    ):
        b = build_segmentation(cfg(name="synthia", root=str(root), split="all", class_set=class_set))
        assert b.class_names == class_names(class_set)
        assert b.train[1][1].numpy().tolist() == np.vectorize(table.get)(ids).tolist()
    with pytest.raises(Exception, match="no official 'val' split"):
        build_segmentation(cfg(name="synthia", root=str(root), split="val"))


def test_cityscapes_label_ids_train_ids_and_eval_roots(tmp_path):
    expected = make_cityscapes(tmp_path / "cs_ids", train_ids=False)
    make_cityscapes(tmp_path / "cs_train", train_ids=True)
    for root in ("cs_ids", "cs_train"):
        src = find_pairs("cityscapes", tmp_path / root, "val")
        ds = src.dataset()
        assert len(ds) == 3
        for i in range(3):
            base = ds.image_path(i).name.replace("_leftImg8bit.png", "")
            assert ds[i][1].numpy().tolist() == expected[base].tolist()
    make_gta5(tmp_path / "gta5")
    b = build_segmentation(
        cfg(
            name="gta5",
            root=str(tmp_path / "gta5"),
            split="all",
            eval_resize=[4, 6],
            eval_roots={"cityscapes": str(tmp_path / "cs_ids")},
        )
    )
    image, target = b.eval_sets["cityscapes"][0]
    assert image.shape == (3, 4, 6) and target.shape == (H, W)  # label at native resolution
    assert b.real_set_names == ["cityscapes"]
    with pytest.raises(DataError, match=r"eval_roots\.bdd100k: .*nope does not exist"):
        build_segmentation(
            cfg(name="gta5", root=str(tmp_path / "gta5"), split="all", eval_roots={"bdd100k": str(tmp_path / "nope")})
        )


def test_bdd100k_both_layouts_and_mapillary(tmp_path):
    ids = random_ids(7, [0, 5, 18, 255])
    new, old = tmp_path / "bdd_new", tmp_path / "bdd_old"
    save_image(new / "images" / "10k" / "val" / "a.jpg", 1)
    save_ids(new / "labels" / "sem_seg" / "masks" / "val" / "a.png", ids)
    save_image(old / "seg" / "images" / "val" / "b.jpg", 2)
    save_ids(old / "seg" / "labels" / "val" / "b_train_id.png", ids)
    for root in (new, old):
        assert find_pairs("bdd100k", root, "val").dataset()[0][1].numpy().tolist() == ids.tolist()
    mp = tmp_path / "mapillary"
    raw = random_ids(8, [13, 2, 55, 58, 65, 49])
    save_image(mp / "validation" / "images" / "x.jpg", 3)
    save_ids(mp / "validation" / "v1.2" / "labels" / "x.png", raw, palette=True)
    table = {13: 0, 2: 1, 55: 13, 58: 16, 65: 255, 49: 255}
    assert find_pairs("mapillary", mp, "val").dataset()[0][1].numpy().tolist() == np.vectorize(table.get)(raw).tolist()


def test_seglist_lists_relative_to_list_folder(tmp_path):
    ids = random_ids(9, [0, 3, 255])
    save_image(tmp_path / "d" / "img" / "a.png", 1)
    save_ids(tmp_path / "d" / "lab" / "a.png", ids)
    (tmp_path / "d" / "train.txt").write_text("# comment\nimg/a.png lab/a.png\n")
    b = build_segmentation(
        cfg(
            name="seglist",
            train_list=str(tmp_path / "d" / "train.txt"),
            eval_lists={"real": str(tmp_path / "d" / "train.txt")},
        )
    )
    assert b.train[0][1].numpy().tolist() == ids.tolist() and b.train.where(0).endswith("train.txt:2")
    assert list(b.eval_sets) == ["real"] and b.class_names == list(CITYSCAPES_CLASSES)


# ---------------------------------------------------------------------------------------------------- bad input
def test_id_outside_mapping_names_file_and_ids(tmp_path):
    make_gta5(tmp_path / "g", n=2, split_mat=False)
    bad = random_ids(0, [7, 8])
    bad[0, 0], bad[1, 1] = 40, 77
    save_ids(tmp_path / "g" / "labels" / "00002.png", bad)
    b = build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="all", on_bad_image="skip"))
    b.train[0]
    with pytest.raises(DataError, match=r"00002\.png of image .*00002\.png holds id\(s\) 40, 77 outside Cityscapes"):
        b.train[1]


def test_image_without_label_and_size_mismatch(tmp_path):
    make_gta5(tmp_path / "g", n=3, split_mat=False)
    (tmp_path / "g" / "labels" / "00003.png").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .* have no label file, e.g. .*images/00003\.png"):
        build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="all"))
    save_ids(tmp_path / "g" / "labels" / "00003.png", random_ids(0, [7], h=W, w=H))  # transposed mask
    b = build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="all"))
    with pytest.raises(DataError, match=r"images/00003\.png is 12x8 .* label is 8x12 \(transposed.*labels/00003"):
        b.train[2]
    skip = build_segmentation(cfg(name="gta5", root=str(tmp_path / "g"), split="all", on_bad_image="skip"))
    skip.train.skip_log = tmp_path / "skipped.txt"
    assert skip.train[2] is None and "transposed" in (tmp_path / "skipped.txt").read_text()


def test_missing_label_file_in_list_is_named(tmp_path):
    save_image(tmp_path / "a.png", 0)
    (tmp_path / "l.txt").write_text("a.png nolabel.png\n")
    with pytest.raises(DataError, match=r"have no label file, e.g. .*a\.png"):
        build_segmentation(cfg(name="seglist", train_list=str(tmp_path / "l.txt")))


# --------------------------------------------------------------------------------------------- prepare, check
def test_prepare_is_idempotent_never_touches_src_and_is_loadable(tmp_path):
    src, dst = tmp_path / "gta5", tmp_path / "prepared"
    raw = make_gta5(src)
    before = tree_hash(src)
    r1 = prepare("gta5", src, dst)
    assert (r1.written, r1.skipped, r1.ok) == (6, 0, True)
    assert r1.lists == {"all": 6, "train": 4, "val": 1, "test": 1}
    r2 = prepare("gta5", src, dst)
    assert (r2.written, r2.skipped) == (0, 6) and "6 skipped" in r2.format()
    assert tree_hash(src) == before
    assert not list(dst.rglob(".*.tmp"))
    line = (dst / "train.txt").read_text().splitlines()[0]
    img, lab = line.split(" ")
    assert Path(img).is_absolute() and lab == "labels/labels/00001.png"
    with Image.open(dst / lab) as img:
        assert img.mode == "L"
        prepared_label = np.asarray(img)
    assert prepared_label.tolist() == np.vectorize(CS_TRAIN.get)(raw["00001"]).tolist()
    via_list = build_segmentation(cfg(name="seglist", train_list=str(dst / "train.txt")))
    via_root = build_segmentation(cfg(name="gta5", root=str(dst), split="train"))
    assert len(via_list.train) == len(via_root.train) == 4
    assert torch.equal(
        via_root.train[0][1], build_segmentation(cfg(name="gta5", root=str(src), split="train")).train[0][1]
    )
    with pytest.raises(DataError, match="inside the source"):
        prepare("gta5", src, src / "out")


def test_prepare_synthia_16_classes_and_reduction_from_19(tmp_path):
    root = tmp_path / "syn"
    ids = random_ids(5, [1, 3, 16, 21])
    save_image(root / "RGB" / "0000000.png", 0)
    write_png16(root / "GT" / "LABELS" / "0000000.png", np.stack([ids] * 3, -1))
    r = prepare("synthia", root, tmp_path / "p16", class_set=16)
    assert r.lists == {"all": 1, "train": 1}
    b = build_segmentation(cfg(name="seglist", train_list=str(tmp_path / "p16" / "train.txt")))
    assert b.class_names == class_names(16)  # from prepared.json
    assert b.train[0][1].numpy().tolist() == np.vectorize({1: 9, 3: 0, 16: 255, 21: 3}.get)(ids).tolist()
    prepare("synthia", root, tmp_path / "p19", class_set=19)
    b13 = build_segmentation(cfg(name="synthia", root=str(tmp_path / "p19"), split="all", class_set=13))
    assert b13.train[0][1].numpy().tolist() == np.vectorize({1: 6, 3: 0, 16: 255, 21: 255}.get)(ids).tolist()
    with pytest.raises(DataError, match="prepared with class_set 16"):
        build_segmentation(cfg(name="synthia", root=str(tmp_path / "p16"), split="all", class_set=19))


def test_check_reports_pixel_counts_and_problems(tmp_path):
    root = tmp_path / "cs"
    expected = make_cityscapes(root, "val", train_ids=True)
    rep = check("cityscapes", root)
    assert rep.ok, rep.format()
    total = np.concatenate([v.ravel() for v in expected.values()])
    assert rep.summary["val"]["per_class"]["road"] == int((total == 0).sum()) > 0
    assert rep.summary["val"]["ignored_pixels"] == int((total == 255).sum())
    assert "road" in rep.format() and any("train" in w for w in rep.warnings)  # no train split: a warning
    gt = root / "gtFine" / "val"
    save_ids(gt / "aachen" / "aachen_000000_000000_gtFine_labelTrainIds.png", np.full((W, H), 5))  # transposed
    save_ids(gt / "bremen" / "bremen_000000_000001_gtFine_labelTrainIds.png", np.full((H, W), 30))  # bad id
    (gt / "bremen" / "bremen_000000_000002_gtFine_labelTrainIds.png").unlink()
    rep = check("cityscapes", root, "val")
    s = rep.summary["val"]
    assert not rep.ok and (s["missing_labels"], s["size_mismatches"], s["bad_ids"]) == (1, 1, 1)
    text = rep.format()
    assert "transposed" in text and "ids outside" in text and "bremen_000000_000002_leftImg8bit.png" in text
    assert check("cityscapes", root, "val", max_items=1).summary["val"]["checked"] == 1
