"""Faults of the teacher-logit cache (issue 18: cases 4, 5, 6, 16)."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ALL, CountingTeacher, N, build_cache, digits, exact_logits
from PIL import Image

import asg
from asg.data.classification.listfile import ListFileDataset
from asg.engine.teacher import cache as teacher_cache
from asg.engine.teacher import files as teacher_files
from asg.engine.teacher import keys as teacher_keys
from asg.engine.teacher.cache import TeacherLogitCache
from asg.engine.teacher.keys import cache_key
from asg.engine.teacher.storage import TeacherCacheError

SRC_DIR = str(Path(asg.__file__).resolve().parents[1])
TESTS_DIR = str(Path(__file__).resolve().parent)


def flip_bits(path: Path, count: int, seed: int = 0) -> None:
    """Flip ``count`` random bits of a .npy file's data (its header left whole)."""
    data = bytearray(path.read_bytes())
    start = len(data) - np.load(path, mmap_mode="r").nbytes
    rng = np.random.default_rng(seed)
    for pos in rng.integers(start, len(data), count):
        data[pos] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))


def test_bit_flips_in_the_logits_are_refused_and_rebuilt(tmp_path):
    """Case 4: 20 random bit flips in logits.npy."""
    ds, teacher = digits(), CountingTeacher()
    ref = exact_logits(ds, teacher)
    key, cache = build_cache(tmp_path, ds, teacher)
    assert torch.equal(cache.logits(ALL), ref)  # verified once in this process
    flip_bits(tmp_path / key / "logits.npy", 20)
    with pytest.raises(TeacherCacheError, match="logits.npy does not match its checksum"):
        TeacherLogitCache.open(tmp_path, key, n=N, storage="fp32", k=0)
    _, again = build_cache(tmp_path, ds, teacher)
    assert again.built and "does not match its checksum" in (again.replaced or "")
    assert torch.equal(again.logits(ALL), ref)


def test_trainer_rebuilds_a_corrupted_disk_cache(tiny_bundle, tiny_config, tmp_path, capsys, one_thread):
    from asg.engine.trainer import Trainer

    over = ["teacher.cache=true", "teacher.cache_storage=fp32", f"teacher.cache_dir={tmp_path}"]
    first = Trainer(tiny_config(*over), None, data=tiny_bundle, quiet=True).teacher_source.disk_cache
    assert first is not None
    flip_bits(first.path / "logits.npy", 20)
    second = Trainer(tiny_config(*over), None, data=tiny_bundle)
    assert second.teacher_source.disk_cache is not None and second.teacher_source.disk_cache.built
    assert "rebuilt the teacher cache" in capsys.readouterr().err
    idx = torch.arange(8)
    x = torch.stack([tiny_bundle.train[i][0] for i in range(8)])
    torch.testing.assert_close(second.teacher_source.outputs(x, idx), second.teacher(x), rtol=1e-5, atol=1e-5)


def test_cache_without_checksums_is_rebuilt(tmp_path):
    import json

    ds, teacher = digits(), CountingTeacher()
    key, _ = build_cache(tmp_path, ds, teacher)
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    del meta["sha256"]
    (tmp_path / key / "meta.json").write_text(json.dumps(meta))
    _, again = build_cache(tmp_path, ds, teacher)
    assert again.built and "no checksums" in (again.replaced or "")


def write_images(folder: Path, n: int = 3) -> Path:
    for i in range(n):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(n)))
    return folder / "list.txt"


def test_image_replaced_with_its_mtime_kept_changes_the_content_key(tmp_path):
    """Case 5: an image replaced by one of the same size, mtime preserved (cp -p, rsync -a, tar)."""
    listing, teacher = write_images(tmp_path), CountingTeacher()

    def key(mode):
        return cache_key(ListFileDataset(listing, image_size=8), "t", teacher, "fp32", 0, key_mode=mode)

    before = {mode: key(mode) for mode in ("stat", "content", "auto")}
    assert before["auto"] == before["content"]  # a small dataset: hashed by content by default
    image = tmp_path / "1.png"
    st = image.stat()
    other = tmp_path / "other.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(other)
    assert other.stat().st_size == st.st_size
    shutil.copyfile(other, image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key("stat") == before["stat"]  # what the stat key cannot see (documented)
    assert key("content") != before["content"] and key("auto") != before["auto"]


def test_auto_key_falls_back_to_stat_for_large_file_datasets(tmp_path, monkeypatch):
    listing, teacher = write_images(tmp_path), CountingTeacher()
    ds = ListFileDataset(listing, image_size=8)
    assert teacher_keys.resolve_key_mode(ds) == "content"
    assert teacher_keys.resolve_key_mode(digits()) == "content"  # in-memory arrays: always their bytes
    monkeypatch.setattr(teacher_keys, "CONTENT_KEY_MAX_BYTES", 10)
    assert teacher_keys.resolve_key_mode(ds) == "stat"
    assert cache_key(ds, "t", teacher, "fp32", 0, key_mode="auto") == cache_key(ds, "t", teacher, "fp32", 0)


def test_trainer_records_the_key_mode(tiny_config):
    from asg.config import ConfigError

    assert tiny_config().teacher.cache_key == "auto"
    with pytest.raises(ConfigError, match="teacher.cache_key"):
        tiny_config("teacher.cache_key=mtime")


def test_too_little_free_space_is_one_message_and_leaves_nothing(tmp_path, monkeypatch):
    """Case 6, checked before writing."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(teacher_files.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(TeacherCacheError, match=r"not enough free space .*teacher.cache_dir"):
        build_cache(tmp_path, digits(), CountingTeacher())
    assert list(tmp_path.iterdir()) == []


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_disk_that_fills_during_the_build_is_one_message_not_a_bus_error(tmp_path):
    """Case 6 on a real full disk: a 1 MiB tmpfs, a 4 MiB cache, the free-space check passed (another writer
    filled the disk after it): the space reservation fails with a message, no SIGBUS, no folder left."""
    if not _can_mount_tmpfs():  # probed here, not at collection: it starts a process
        pytest.skip("needs root and unshare to mount a small tmpfs")
    root = tmp_path / "small"
    root.mkdir()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS_DIR!r})
        from helpers import CountingTeacher, build_cache, digits
        from asg.engine.teacher import build as teacher_build
        from asg.engine.teacher.storage import TeacherCacheError
        teacher_build._check_space = lambda folder, needed: None
        try:
            build_cache({str(root)!r}, digits(n=1000), CountingTeacher())
        except TeacherCacheError as exc:
            print(exc)
            sys.exit(3)
    """)
    cmd = f'mount -t tmpfs -o size=1m tmpfs {root} && {sys.executable} -c "$SCRIPT"; code=$?; ls -A {root}; exit $code'
    env = {**os.environ, "PYTHONPATH": SRC_DIR, "SCRIPT": script}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "No space left on device" in lines[0] and "teacher.cache_dir" in lines[0]
    assert lines[1:] == []  # the tmpfs holds no temporary folder


def test_read_only_cache_folder_names_the_setting(tmp_path, monkeypatch):
    """Case 16: the cache folder cannot be written."""

    def denied(dir=None, prefix=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(teacher_cache.tempfile, "mkdtemp", denied)
    with pytest.raises(TeacherCacheError, match="set teacher.cache_dir to a folder you can write") as info:
        build_cache(tmp_path, digits(), CountingTeacher())
    assert "--out" not in str(info.value) and str(tmp_path) in str(info.value)
