import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ALL, SIZE, CountingTeacher, N, build_cache, digits, exact_logits
from PIL import Image

from asg.data.bundle import LabeledSubset
from asg.data.classification.digits import ArrayDataset
from asg.data.classification.listfile import ListFileDataset
from asg.engine.teacher.cache import TeacherLogitCache
from asg.engine.teacher.keys import UnfingerprintableDataset, cache_key
from asg.engine.teacher.storage import TeacherCacheError, measure_storage_error
from asg.errors import AsgError


def kl(exact, stored):
    lp, lq = torch.log_softmax(exact.double(), 1), torch.log_softmax(stored.double(), 1)
    return (lp.exp() * (lp - lq)).sum(1)


def test_fp32_is_exact_and_memory_mapped(tmp_path):
    ds, teacher = digits(), CountingTeacher()
    ref = exact_logits(ds, teacher)
    key, cache = build_cache(tmp_path, ds, teacher, "fp32")
    assert cache.built and teacher.calls == 3  # ceil(20 / 8) batches
    assert isinstance(cache.arrays["logits"], np.memmap) and cache.arrays["logits"].mode == "r"
    got = cache.logits(torch.tensor([5, 0, 19]))
    assert got.dtype == torch.float32 and got.shape == (3, 1000)
    assert torch.equal(got, ref[[5, 0, 19]])
    meta = json.loads((tmp_path / key / "meta.json").read_text())
    assert meta["n"] == N and meta["complete"] is True and meta["description"] == "test digits"
    assert meta["storage_error"]["kl_max"] == 0.0
    assert np.load(tmp_path / key / "filled.npy").all()


def test_fp16_within_half_precision(tmp_path):
    ds, teacher = digits(), CountingTeacher()
    ref = exact_logits(ds, teacher)
    _, cache = build_cache(tmp_path, ds, teacher, "fp16")
    assert cache.arrays["logits"].dtype == np.float16
    got = cache.logits(ALL)
    assert torch.equal(got, ref.half().float())
    assert torch.allclose(got, ref, rtol=1e-3, atol=1e-3) and not torch.equal(got, ref)


def test_topk_keeps_top_log_probs_and_meta_kl_is_the_real_kl(tmp_path):
    ds, teacher = digits(), CountingTeacher(scale=3.0)
    ref = exact_logits(ds, teacher)
    key, cache = build_cache(tmp_path, ds, teacher, "topk", k=5)
    got = cache.logits(ALL)
    logp = torch.log_softmax(ref.double(), 1)
    top, idx = logp.topk(5, 1)
    assert torch.equal(got.topk(5, 1).indices, idx)
    assert torch.allclose(got.gather(1, idx).double(), top, rtol=1e-3, atol=1e-3)  # fp16 precision
    rest = torch.ones(N, 1000, dtype=torch.bool).scatter(1, idx, False)
    others = got[rest].view(N, 995)
    assert torch.equal(others, others[:, :1].expand(-1, 995))  # the rest mass is spread uniformly
    rest_mass = logp.masked_fill(~rest, -torch.inf).logsumexp(1)
    assert torch.allclose(others[:, 0].double(), rest_mass - np.log(995), rtol=1e-6, atol=1e-6)
    assert torch.allclose(got.double().exp().sum(1), torch.ones(N, dtype=torch.float64), atol=1e-3)
    assert (cache.arrays["topk_idx"].dtype, cache.arrays["topk_logp"].dtype) == (np.int16, np.float16)
    real = kl(ref, got)
    assert real.max() > 1e-4  # k=5 of 1000 classes loses something: the check below is not trivial
    error = json.loads((tmp_path / key / "meta.json").read_text())["storage_error"]
    assert error["kl_max"] == pytest.approx(float(real.max()), rel=1e-9)
    assert error["kl_mean"] == pytest.approx(float(real.mean()), rel=1e-9)
    measured = measure_storage_error(ref, "topk", 5)
    assert measured == pytest.approx({"kl_max": error["kl_max"], "kl_mean": error["kl_mean"]}, rel=1e-9)
    assert measure_storage_error(ref, "topk", 1000)["kl_max"] < 1e-5  # k = C: only fp16 rounding


def test_key_changes_with_images_transform_weights_and_storage():
    ds, teacher = digits(), CountingTeacher()
    key = cache_key(ds, "size=8", teacher, "fp32", 32)
    assert key == cache_key(digits(), "size=8", CountingTeacher(), "fp32", 7)  # equal content; k is topk-only
    changed = digits()
    changed.images[3, 2, 2] ^= 1
    other_teacher = CountingTeacher()
    with torch.no_grad():
        other_teacher.fc.bias[0] += 1e-3
    others = [
        cache_key(changed, "size=8", teacher, "fp32", 32),
        cache_key(digits(size=16), "size=8", teacher, "fp32", 32),
        cache_key(ds, "size=16", teacher, "fp32", 32),
        cache_key(ds, "size=8", other_teacher, "fp32", 32),
        cache_key(ds, "size=8", teacher, "fp16", 32),
        cache_key(ds, "size=8", teacher, "topk", 32),
        cache_key(ds, "size=8", teacher, "topk", 16),
        cache_key(LabeledSubset(ds, range(N)), "size=8", teacher, "fp32", 32),
        cache_key(LabeledSubset(ds, range(1, N)), "size=8", teacher, "fp32", 32),
    ]
    assert len({key, *others}) == len(others) + 1


def test_key_of_image_files_follows_their_content(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(3)))
    teacher = CountingTeacher()
    key = cache_key(ListFileDataset(tmp_path / "list.txt", image_size=8), "t", teacher, "fp32", 0)
    assert key == cache_key(ListFileDataset(tmp_path / "list.txt", image_size=8), "t", teacher, "fp32", 0)
    assert key != cache_key(ListFileDataset(tmp_path / "list.txt", image_size=16), "t", teacher, "fp32", 0)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "1.png")
    assert key != cache_key(ListFileDataset(tmp_path / "list.txt", image_size=8), "t", teacher, "fp32", 0)


def test_dataset_without_fingerprint_is_a_clear_error():
    class Opaque(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(3, SIZE, SIZE), 0

    with pytest.raises(UnfingerprintableDataset, match="cannot fingerprint a Opaque"):
        cache_key(Opaque(), "t", CountingTeacher(), "fp32", 0)
    assert issubclass(UnfingerprintableDataset, AsgError)
    with pytest.raises(TeacherCacheError, match="storage must be one of"):
        cache_key(digits(), "t", CountingTeacher(), "bf16", 0)


def test_second_build_reuses_the_folder_without_the_teacher(tmp_path):
    ds, teacher = digits(), CountingTeacher()
    key, first = build_cache(tmp_path, ds, teacher, "topk", k=8)
    calls = teacher.calls
    _, again = build_cache(tmp_path, ds, teacher, "topk", k=8)
    assert teacher.calls == calls and not again.built and again.replaced is None
    assert torch.equal(again.logits(ALL), first.logits(ALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]  # no temporary folder left


def _truncate(folder):
    data = (folder / "logits.npy").read_bytes()
    (folder / "logits.npy").write_bytes(data[: len(data) // 2])


def _garble_header(folder):
    with open(folder / "logits.npy", "r+b") as f:
        f.write(b"garbage!")


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, **changes}))

    return edit


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "unreadable"),
        (_garble_header, "unreadable"),
        (lambda folder: (folder / "logits.npy").unlink(), "missing logits.npy"),
        (lambda folder: np.save(folder / "filled.npy", np.zeros(N, bool)), "incomplete"),
        (lambda folder: np.save(folder / "logits.npy", np.zeros((N, 999), np.float32)), "expected float32"),
        (_edit_meta(n=N + 1), "was built for"),
        (_edit_meta(storage="fp16"), "was built for"),
        (_edit_meta(key="0" * 64), "was built for"),
        (_edit_meta(complete=False), "was built for"),
        (lambda folder: (folder / "meta.json").write_text("{"), "unreadable"),
    ],
)
def test_damaged_folder_is_refused_and_rebuilt(tmp_path, damage, message):
    ds, teacher = digits(), CountingTeacher()
    ref = exact_logits(ds, teacher)
    key, _ = build_cache(tmp_path, ds, teacher)
    damage(tmp_path / key)
    with pytest.raises(TeacherCacheError, match=message):
        TeacherLogitCache.open(tmp_path, key, n=N, storage="fp32", k=0)
    teacher.calls = 0
    _, cache = build_cache(tmp_path, ds, teacher)
    assert cache.built and teacher.calls == 3 and message in (cache.replaced or "")
    assert torch.equal(cache.logits(ALL), ref)
    TeacherLogitCache.open(tmp_path, key, n=N, storage="fp32", k=0)  # whole again
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_crash_mid_build_leaves_nothing_and_the_next_build_succeeds(tmp_path):
    ds, teacher = digits(), CountingTeacher()
    ref = exact_logits(ds, teacher)
    teacher.fail_on = 2
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_cache(tmp_path, ds, teacher)
    assert list(tmp_path.iterdir()) == []
    teacher.fail_on, teacher.calls = None, 0
    _, cache = build_cache(tmp_path, ds, teacher)
    assert cache.built and torch.equal(cache.logits(ALL), ref)


@pytest.mark.slow
def test_leftover_of_a_killed_build_is_removed(tmp_path):
    ds, teacher = digits(), CountingTeacher()
    key = cache_key(ds, "size=8", teacher, "fp32", 0)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    leftover = tmp_path / f".{key}.tmp-{socket.gethostname()}-{dead.pid}-abc123"
    leftover.mkdir()
    (leftover / "logits.npy").write_bytes(b"half")
    build_cache(tmp_path, ds, teacher)
    assert sorted(p.name for p in tmp_path.iterdir()) == [key]


def test_unreadable_image_and_fp16_overflow_are_clear_errors(tmp_path):
    class WithHole(ArrayDataset):
        def __getitem__(self, i):
            return None if i == 11 else super().__getitem__(i)

    base = digits()
    holed = WithHole(base.images, base.labels, SIZE)
    with pytest.raises(TeacherCacheError, match="training image 11 could not be read"):
        build_cache(tmp_path, holed, CountingTeacher())
    huge = CountingTeacher(scale=1e5)
    with pytest.raises(TeacherCacheError, match="float16 range"):
        build_cache(tmp_path, base, huge, "fp16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_trainer_disk_cache_gives_the_live_teachers_logits_and_is_shared_across_runs(
    tiny_bundle, tiny_config, tmp_path
):
    from asg.engine.trainer import Trainer

    over = ["teacher.cache=true", "teacher.cache_storage=fp32", f"teacher.cache_dir={tmp_path}"]
    trainer = Trainer(tiny_config(*over), None, data=tiny_bundle, quiet=True)
    assert trainer.teacher_source.disk_cache is not None and trainer.teacher_source.disk_cache.built
    idx = torch.tensor([5, 0, 17])
    x = torch.stack([tiny_bundle.train[int(i)][0] for i in idx])
    cached = trainer.teacher_source.outputs(x, idx)  # the trainer's own path, CPU memory map -> device
    torch.testing.assert_close(cached, trainer.teacher(x), rtol=1e-5, atol=1e-5)
    live = Trainer(tiny_config("teacher.cache=false"), None, data=tiny_bundle, quiet=True).fit()
    second = Trainer(tiny_config(*over, "train.seed=0"), None, data=tiny_bundle, quiet=True)
    assert (
        second.teacher_source.disk_cache is not None and not second.teacher_source.disk_cache.built
    )  # shared: not computed again
    disk = second.fit()
    for a, b in zip(live.history, disk.history):
        assert a["metrics"]["real"]["acc"] == pytest.approx(b["metrics"]["real"]["acc"], abs=1e-6)
