"""CSG (asg.methods.csg): its loss on hand-made tensors, its queue, its views, and the method in the training loop
(frozen key encoder, momentum MLPs, exact resume, both tasks, several processes)."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_OVERRIDES, CrashAt, RandomImages, Scenes, tiny_data

from asg.config import load_config
from asg.data import DataBundle
from asg.engine.callbacks import Callback
from asg.engine.trainer import Trainer
from asg.errors import ConfigError
from asg.methods.csg import CSG, KeyQueue, a_pool, gather_keys, info_nce, patch_membership
from asg.methods.views import RandAugmentBatch, Views

CSG_TINY = ["method.name=csg", "method.csg_queue=40", "method.csg_weight=1"]


class Logs(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, trainer, out) -> None:
        self.rows.append(out.logs)


def _scenes() -> DataBundle:
    return DataBundle(
        Scenes(8, size=64), {"synthetic": Scenes(4, size=64, seed=1)}, "synthetic", ["bg", "red"], task="segmentation"
    )


# ----------------------------------------------------------------------------------------- the loss by hand


def test_info_nce_of_a_key_equal_to_its_query_with_orthogonal_negatives():
    d, k, t = 8, 5, 0.07  # float64: at T = 0.07 the loss is 3e-6
    q = torch.eye(d, dtype=torch.float64)[:2]  # two unit queries
    queue = torch.eye(d, dtype=torch.float64)[2 : 2 + k]  # orthogonal to both
    loss, acc = info_nce(q, q.clone(), queue, t)
    assert loss.item() == pytest.approx(math.log(1 + k * math.exp(-1 / t)), rel=1e-9)
    assert acc.item() == 1.0
    # a negative equal to the query: the positive ties with it, log(2 + (K - 1) exp(-1/T)) - 1/T + 1/T
    queue[0] = q[0]
    loss, _ = info_nce(q[:1], q[:1].clone(), queue, t)
    assert loss.item() == pytest.approx(math.log(2 + (k - 1) * math.exp(-1 / t)), rel=1e-9)


def test_a_pool_of_a_constant_map_is_the_average_and_weights_by_agreement_with_the_mean():
    v = torch.randn(2, 6, 1, 1).expand(2, 6, 4, 5).contiguous()
    assert torch.allclose(a_pool(v)[:, 0], v.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(a_pool(v, (2, 2)), v.mean(dim=(2, 3))[:, None].expand(2, 4, 6), atol=1e-6)
    # two positions: [1, 0] and [3, 0]; mean [2, 0]; dots 2 and 6 -> weights 1/4, 3/4 -> pooled [2.5, 0]
    w = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]]])  # [1, 2, 1, 2]
    assert torch.allclose(a_pool(w)[0, 0], torch.tensor([2.5, 0.0]))
    # the attention of another map: its weights (1/4, 3/4) applied to this map's vectors
    other = torch.tensor([[[[5.0, 7.0]]]])
    assert torch.allclose(a_pool(other, attention=w)[0, 0], torch.tensor([0.25 * 5 + 0.75 * 7]))


def test_patches_cover_the_map_once_in_chunks_by_chunks():
    m = patch_membership(7, 5, (3, 2))
    assert m.shape == (35, 6) and torch.equal(m.sum(dim=1), torch.ones(35))
    assert (m.sum(dim=0) > 0).all()  # no empty patch even when 3 does not divide 7
    v = torch.randn(3, 4, 16, 16)
    pooled = a_pool(v, (8, 8))
    assert pooled.shape == (3, 64, 4)
    patch = v[:, :, 2:4, 6:8]  # patch (row 1, column 3) = index 1 * 8 + 3
    assert torch.allclose(pooled[:, 11], a_pool(patch)[:, 0], atol=1e-5)


def test_queue_is_first_in_first_out_and_its_pointer_wraps():
    q = KeyQueue(5, 2, torch.device("cpu"))
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float32)[:, None].expand(-1, 2)  # noqa: E731
    q.push(rows(0, 3))
    assert q.ptr == 3 and torch.equal(q.keys[:3, 0], torch.tensor([0.0, 1, 2]))
    q.push(rows(3, 7))  # 3, 4 fill the end, 5, 6 overwrite the oldest (0, 1)
    assert q.ptr == 2 and torch.equal(q.keys[:, 0], torch.tensor([5.0, 6, 2, 3, 4]))
    q.push(rows(10, 22))  # more than the queue: its last 5 stay, in order from the pointer
    assert q.ptr == (2 + 5) % 5 and sorted(q.keys[:, 0].tolist()) == [17.0, 18, 19, 20, 21]


def test_gather_keys_of_one_process_is_the_batch_in_order():
    keys = torch.randn(3, 4, 8)
    assert torch.equal(gather_keys(keys, torch.tensor([5, 1, 9])), keys.reshape(12, 8))


# ----------------------------------------------------------------------------------------- views


def test_views_are_a_function_of_step_and_image_and_differ_between_query_and_key():
    x = torch.rand(6, 3, 24, 24)
    views = Views("randaugment")
    q, k = views(x, torch.arange(6), step=3)
    q2, k2 = views(x[[2, 3]], torch.tensor([2, 3]), step=3)  # another batch holding images 2 and 3
    assert torch.equal(q[2:4], q2) and torch.equal(k[2:4], k2)
    assert not torch.equal(q, k)
    q3, _ = views(x, torch.arange(6), step=4)
    assert not torch.equal(q, q3)
    jq, jk = Views("jitter")(x, torch.arange(6), step=3)
    assert jq is x and not torch.equal(jk, x) and jk.min() >= 0 and jk.max() <= 1
    nq, nk = Views("none")(x, torch.arange(6), step=3)
    assert nq is x and nk is x


def test_batched_randaugment_is_torchvisions_operation_per_image():
    ra = RandAugmentBatch(1, 6)
    assert len(ra.ops) == 14
    x = torch.rand(4, 3, 20, 20)
    for op in range(len(ra.ops)):
        for negate in (False, True):
            together = ra.apply(x, op, negate)
            alone = torch.cat([ra.apply(x[i : i + 1], op, negate) for i in range(4)])
            assert torch.allclose(together, alone, atol=1e-6), ra.ops[op][0]


# ----------------------------------------------------------------------------------------- in the training loop


def test_csg_trains_with_a_frozen_key_encoder_and_momentum_key_mlps(tiny_config, one_thread):
    cfg = tiny_config(*CSG_TINY, "train.steps=3")
    trainer = Trainer(cfg, None, data=tiny_data(), quiet=True, check_files=False)
    method = trainer.method
    assert isinstance(method, CSG) and method.stages == [3, 4]  # efficientnet_lite0's stride-16 and -32 maps
    assert method.key_encoder is trainer.teacher.backbone  # no copy: the same output stride
    key0 = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    mlp_q0 = [p.detach().clone() for p in method.mlp_q.parameters()]
    mlp_k0 = [p.detach().clone() for p in method.mlp_k.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(mlp_q0, mlp_k0))  # the key MLP starts as the query MLP
    head_group = trainer.optimizer.param_groups[-1]["params"]
    assert all(any(p is g for g in head_group) for p in method.mlp_q.parameters())  # trains with the head
    queue0 = method.queues[0].keys.clone()
    logs = Logs()
    trainer.callbacks.append(logs)
    trainer.fit()
    assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in key0.items())
    assert all(math.isfinite(r["loss"]) and "csg" in r for r in logs.rows)
    # one step's EMA, by hand: k1 = m k0 + (1 - m) q1, ... the key MLP moved, by less than the query MLP
    moved_q = sum(float((p.detach() - p0).abs().sum()) for p, p0 in zip(method.mlp_q.parameters(), mlp_q0))
    moved_k = sum(float((p - p0).abs().sum()) for p, p0 in zip(method.mlp_k.parameters(), mlp_k0))
    assert 0 < moved_k < 0.01 * moved_q
    assert method.queues[0].ptr == (3 * 8) % 40  # 3 steps of 8 keys
    assert not torch.equal(method.queues[0].keys[:24], queue0[:24]) and torch.equal(
        method.queues[0].keys[24:], queue0[24:]
    )


def test_key_mlp_is_the_momentum_average_of_the_query_mlp(tiny_config):
    cfg = tiny_config(*CSG_TINY, "method.csg_momentum=0.9")
    trainer = Trainer(cfg, None, data=tiny_data(), quiet=True, check_files=False)
    method = trainer.method
    with torch.no_grad():
        for p in method.mlp_q.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in method.mlp_k.parameters()]
    method.after_step(trainer.model)
    for k, k0, q in zip(method.mlp_k.parameters(), before, method.mlp_q.parameters()):
        assert torch.allclose(k, 0.9 * k0 + 0.1 * q)


@pytest.mark.slow
def test_crash_and_resume_give_the_uninterrupted_weights_queues_and_mlps(tiny_config, tmp_path, one_thread):
    from safetensors.torch import load_file

    cfg = tiny_config(*CSG_TINY, "train.steps=4", "train.checkpoint_every=2")
    a = Trainer(cfg, tmp_path / "a", data=tiny_data(), quiet=True, check_files=False)
    a.fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", data=tiny_data(), quiet=True, check_files=False, callbacks=[CrashAt(3)]).fit()
    b = Trainer(cfg, tmp_path / "b", data=tiny_data(), quiet=True, check_files=False, resume=True)
    assert b.method.queues[0].ptr == 0  # not restored before fit opens the run folder
    b.fit()
    wa, wb = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert torch.equal(sa["pointers"], sb["pointers"]) and sa["pointers"].tolist() == [32 % 40] * 2
    assert all(torch.equal(x, y) for x, y in zip(sa["queues"], sb["queues"]))
    for part in ("mlp_q", "mlp_k"):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])


@pytest.mark.slow
def test_csg_segmentation_contrasts_chunks_by_chunks_patches_against_a_jittered_key(tiny_config, one_thread):
    cfg = tiny_config(
        *CSG_TINY,
        "method.csg_queue=1000",
        "method.csg_chunks=4",
        "model.segmenter=fpn",
        "data.batch_size=4",
        "train.steps=2",
    )
    logs = Logs()
    trainer = Trainer(cfg, None, data=_scenes(), quiet=True, check_files=False, callbacks=[logs])
    head0 = [p.detach().clone() for p in trainer.model.task_parameters()]
    trainer.fit()
    method = trainer.method
    assert method.views is not None and method.views.augment == "jitter"
    # 64 px: the stride-16 map is 4 x 4 (4 x 4 patches), the stride-32 map 2 x 2 (2 x 2 patches)
    assert [q.ptr for q in method.queues] == [2 * 4 * 16, 2 * 4 * 4]
    assert all(math.isfinite(r["loss"]) for r in logs.rows)
    assert any(not torch.equal(a, b) for a, b in zip(head0, trainer.model.task_parameters()))


def test_segmentation_refuses_geometric_views(tiny_config):
    cfg = tiny_config(*CSG_TINY, "method.csg_augment=randaugment", "model.segmenter=fpn")
    with pytest.raises(ConfigError, match="csg_augment=randaugment .*labels"):
        Trainer(cfg, None, data=_scenes(), quiet=True, check_files=False)


def test_stages_out_of_range_name_the_backbones_maps(tiny_config):
    with pytest.raises(ConfigError, match=r"csg_stages=\[5\]: .* 5 stage maps"):
        Trainer(tiny_config(*CSG_TINY, "method.csg_stages=[5]"), None, data=tiny_data(), quiet=True, check_files=False)


@pytest.mark.slow
def test_a_dilated_student_gets_a_dilated_copy_of_the_frozen_key_encoder(tiny_config, one_thread):
    from asg.config import ModelConfig
    from asg.models import build_model

    cfg = tiny_config(*CSG_TINY, "data.batch_size=2", "train.steps=1", "model.channels_last=false")
    mcfg = ModelConfig(
        backbone="resnet50",
        weights="none",
        segmenter="deeplabv3",
        output_stride=8,
        timm_kwargs={"layers": [1, 1, 1, 1]},
        channels_last=False,
    )  # type: ignore[dict-item]
    data = DataBundle(
        Scenes(4, size=32), {"synthetic": Scenes(2, size=32, seed=1)}, "synthetic", ["bg", "red"], task="segmentation"
    )
    model = build_model(mcfg, 2, task="segmentation")
    trainer = Trainer(cfg, None, data=data, model=model, quiet=True, check_files=False)
    key, teacher = trainer.method.key_encoder, trainer.teacher.backbone
    assert key is not teacher and key.output_stride == 8 and teacher.output_stride == 32
    trainer.fit()
    assert all(bool(torch.isfinite(q.keys).all()) for q in trainer.method.queues)


def test_forward_with_stages_is_forward_plus_the_stage_maps(tiny_config):
    cfg = tiny_config()
    from asg.models import build_model

    model = build_model(cfg.model, 3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, stages = model.forward_with_stages(x)
        ref = model(x)
        maps = model.backbone.forward_stages(model.backbone.normalize(x))
    assert torch.allclose(out.logits, ref.logits, atol=1e-5) and torch.allclose(out.features, ref.features, atol=1e-5)
    assert [s.shape for s in stages] == [m.shape for m in maps]


# ----------------------------------------------------------------------------------------- two processes


def _worker(rank: int, port: int, root: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    cfg = load_config(None, [*TINY_OVERRIDES, *CSG_TINY, "train.steps=2"])
    # 20 images, batch 8: the third step's batch (4 images) would leave nothing out; 2 steps here
    data = DataBundle(RandomImages(20, seed=0), {"synthetic": RandomImages(6, seed=1)}, "synthetic", ["a", "b", "c"])
    trainer = Trainer(cfg, None, data=data, quiet=True, check_files=False)
    trainer.fit()
    torch.save({"state": trainer.method.state_dict(), "world": trainer.dist.world}, root / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_enqueue_the_keys_of_both_ranks_as_one_process_does(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), tmp_path), nprocs=2, join=False)
    deadline = time.time() + 240
    while not context.join(timeout=1):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process CSG run did not finish in 240 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0["pointers"].tolist() == [16, 16]  # 2 steps x the global batch of 8 (4 per process)
    assert all(torch.equal(a, b) for a, b in zip(s0["queues"], s1["queues"]))  # every rank holds the same queue
    # one process on the same global batches, in float64 as the workers: the same keys in the same places
    torch.set_default_dtype(torch.float64)
    try:
        cfg = load_config(None, [*TINY_OVERRIDES, *CSG_TINY, "train.steps=2"])
        data = DataBundle(
            RandomImages(20, seed=0), {"synthetic": RandomImages(6, seed=1)}, "synthetic", ["a", "b", "c"]
        )
        one = Trainer(cfg, None, data=data, quiet=True, check_files=False)
        one.fit()
    finally:
        torch.set_default_dtype(torch.float32)
    ref = one.method.state_dict()
    for a, b in zip(s0["queues"], ref["queues"]):
        assert torch.allclose(a[:16], b[:16], atol=1e-6)
