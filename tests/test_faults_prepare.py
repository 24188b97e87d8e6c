"""Faults of ``asg data prepare`` / ``asg data check`` (issue 18: cases 1, 2, 9, 10)."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import random_ids, save_image, tree_hash, write_png16
from PIL import Image

import asg
from asg import cli
from asg.data.segmentation.prepare import prepare
from asg.data.segmentation.street_check import check
from asg.data.segmentation.street_scenes import find_pairs
from asg.errors import DataError

SRC_DIR = str(Path(asg.__file__).resolve().parents[1])
SYNTHIA_16 = {1: 9, 3: 0, 16: 255, 21: 3}  # SYNTHIA ids -> 16-class train ids
SYNTHIA_19 = {1: 10, 3: 0, 16: 9, 21: 3}  # sky (1) is 10 of 19, 9 of 16


def make_synthia(root: Path, n: int) -> dict[str, np.ndarray]:
    raw = {}
    for k in range(n):
        name = f"{k:07d}.png"
        save_image(root / "RGB" / name, k)
        raw[name] = random_ids(k, list(SYNTHIA_16))
        write_png16(root / "GT" / "LABELS" / name, np.stack([raw[name]] * 3, -1))
    return raw


def prepared_ids(dst: Path) -> dict[str, np.ndarray]:
    out = {}
    for p in sorted((dst / "labels" / "GT" / "LABELS").glob("*.png")):
        with Image.open(p) as img:
            out[p.name] = np.asarray(img).astype(np.int64)
    return out


def killed_prepare(src: Path, dst: Path, class_set: int, after: int) -> None:
    """``asg data prepare`` in a subprocess that SIGKILLs itself when about to write label ``after + 1``."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import asg.data.segmentation.prepare as p
        from asg import cli
        real, n = p.atomic_write, [0]
        def write(path, fn):
            if "labels" in str(path):
                if n[0] == {after}:
                    os.kill(os.getpid(), signal.SIGKILL)
                n[0] += 1
            real(path, fn)
        p.atomic_write = write
        sys.exit(cli.main(["data", "prepare", "synthia", {str(src)!r}, {str(dst)!r}, "--class-set", "{class_set}"]))
    """)
    env = {**os.environ, "PYTHONPATH": SRC_DIR}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.slow
def test_killed_prepare_rerun_with_another_class_set_converts_every_label_again(tmp_path):
    """Case 1: killed after 10 of 30 labels at class set 19, rerun at 16: no label of the 19-class set is kept."""
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    raw = make_synthia(src, 30)
    killed_prepare(src, dst, 19, after=10)
    assert len(prepared_ids(dst)) == 10
    with pytest.raises(DataError, match="did not finish"):  # an interrupted folder is not trained on
        find_pairs("synthia", dst, "all", 19)
    assert "did not finish" in check("synthia", dst, class_set=19).format()  # nor said OK by data check
    report = prepare("synthia", src, dst, class_set=16)
    assert report.ok and (report.written, report.skipped) == (30, 0)
    assert report.redone == {"prepared with other settings (class set 19)": 10}
    assert "interrupted prepare" in report.format() and "class_set 19" in report.format()
    ids = prepared_ids(dst)
    assert all(np.array_equal(ids[k], np.vectorize(SYNTHIA_16.get)(raw[k])) for k in raw)
    assert check("synthia", dst, class_set=16).ok
    assert len((dst / "provenance.jsonl").read_text().splitlines()) == 40


@pytest.mark.slow
def test_killed_prepare_resumes_with_the_same_settings(tmp_path):
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    raw = make_synthia(src, 20)
    killed_prepare(src, dst, 19, after=7)
    report = prepare("synthia", src, dst, class_set=19)
    assert (report.written, report.skipped, report.redone) == (13, 7, {})
    assert "continued an interrupted prepare" in report.format()
    ids = prepared_ids(dst)
    assert all(np.array_equal(ids[k], np.vectorize(SYNTHIA_19.get)(raw[k])) for k in raw)


def test_changed_source_label_with_its_mtime_kept_is_converted_again(tmp_path):
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    make_synthia(src, 3)
    prepare("synthia", src, dst, class_set=16)
    label = src / "GT" / "LABELS" / "0000001.png"
    st = label.stat()
    new = np.full((8, 12), 21)  # same size, other ids; mtime restored (cp -p, rsync -a, tar)
    write_png16(label, np.stack([new] * 3, -1))
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = prepare("synthia", src, dst, class_set=16)
    assert (report.written, report.skipped) == (1, 2)
    assert report.redone == {"from a source label that changed since": 1}
    assert (prepared_ids(dst)["0000001.png"] == 3).all()


def test_prepared_label_changed_after_prepare_is_converted_again(tmp_path):
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    raw = make_synthia(src, 2)
    prepare("synthia", src, dst, class_set=16)
    out = dst / "labels" / "GT" / "LABELS" / "0000000.png"
    Image.fromarray(np.zeros((8, 12), np.uint8), mode="L").save(out)
    report = prepare("synthia", src, dst, class_set=16)
    assert report.redone == {"damaged since written": 1}
    assert np.array_equal(prepared_ids(dst)["0000000.png"], np.vectorize(SYNTHIA_16.get)(raw["0000000.png"]))


def test_interrupted_prepare_says_how_to_continue(tmp_path, monkeypatch, capsys):
    import asg.data.segmentation.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(asg.data.segmentation.prepare, "prepare", interrupted)
    assert cli.main(["data", "prepare", "synthia", str(tmp_path), str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "rerun the same command" in err and "--resume" not in err


def test_labels_link_into_the_source_is_refused(tmp_path):
    """Case 2: DST/labels a symlink into SRC: refused before anything is written."""
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    make_synthia(src, 2)
    before = tree_hash(src)
    dst.mkdir()
    (dst / "labels").symlink_to(src / "GT")
    with pytest.raises(DataError, match="is inside the source"):
        prepare("synthia", src, dst, class_set=16)
    (dst / "labels").unlink()
    (dst / "labels" / "GT").mkdir(parents=True)
    (dst / "labels" / "GT" / "LABELS").symlink_to(src / "RGB")  # a deeper link
    with pytest.raises(DataError, match="is a link into the source"):
        prepare("synthia", src, dst, class_set=16)
    assert tree_hash(src) == before


def test_check_refuses_an_empty_seglist_and_an_empty_prepared_split(tmp_path):
    """Case 10: `data check` said OK where training refuses."""
    (tmp_path / "empty.txt").write_text("")
    report = check("seglist", tmp_path / "empty.txt")
    assert not report.ok and "lists no image/label pair" in report.format()
    src, dst = tmp_path / "synthia", tmp_path / "prepared"
    make_synthia(src, 2)
    prepare("synthia", src, dst, class_set=16)
    (dst / "train.txt").write_text("")
    report = check("synthia", dst, class_set=16)
    assert not report.ok and "synthia train" in report.format() and "lists no image/label pair" in report.format()


def test_check_seglist_against_a_custom_class_count(tmp_path, capsys):
    save_image(tmp_path / "a.png", 0)
    Image.fromarray(np.array([[0, 1, 2, 5] * 3] * 8, np.uint8)).save(tmp_path / "a_label.png")
    (tmp_path / "l.txt").write_text("a.png a_label.png\n")
    assert check("seglist", tmp_path / "l.txt", num_classes=6).ok
    report = check("seglist", tmp_path / "l.txt", num_classes=4)
    assert not report.ok and "ids outside 4-class train ids" in report.format()
    assert cli.main(["data", "check", "seglist", str(tmp_path / "l.txt"), "--num-classes", "4"]) == 1
    assert cli.main(["data", "check", "visda17", str(tmp_path), "--split", "train"]) == 2
    assert "--split: not an option of the visda17 check" in capsys.readouterr().err


def test_16_bit_colour_labels_have_the_same_pixel_limit_as_pil(tmp_path, monkeypatch):
    """Case 9: torchvision decodes SYNTHIA's 16-bit colour PNGs, without PIL's decompression-bomb limit."""
    from asg.data.segmentation.pairs import read_label

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # an error beyond 2000 pixels
    write_png16(tmp_path / "wide16.png", np.zeros((60, 60, 3)))
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(tmp_path / "wide8.png")
    for name in ("wide16.png", "wide8.png"):
        with pytest.raises(Image.DecompressionBombError, match="3600 pixels"):
            read_label(tmp_path / name, channel=0)
    write_png16(tmp_path / "small16.png", np.zeros((40, 40, 3)))  # 1600 pixels: decoded
    assert read_label(tmp_path / "small16.png", channel=0).shape == (40, 40)
