"""The baselines beside ASG: LP-FT, WiSE-FT and feature guidance (docs/baselines.md)."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from asg.api import evaluate, evaluate_wise_ft
from asg.cli import main
from asg.config import MethodConfig
from asg.engine.trainer import Trainer
from asg.errors import AsgError, ConfigError
from asg.methods import METHODS, Batch, build_method, feature_distance
from asg.methods.wise_ft import choose_alpha, interpolate_backbone, interpolate_state


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Out:
    def __init__(self, logits, features):
        self.logits, self.features = logits, features


def test_baselines_are_registered():
    assert {"lpft", "feature"} <= set(METHODS)
    assert build_method(MethodConfig(name="feature")).teacher_output == "features"
    assert build_method(MethodConfig(name="lpft")).teacher_output == "logits"


# ----------------------------------------------------------------- WiSE-FT


class _TinyNet(nn.Module):
    """A backbone (with a BatchNorm: floating and integer buffers) and a new head, as ASGClassifier."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)


def _pretrained_and_finetuned():
    torch.manual_seed(0)
    model = _TinyNet()
    pretrained = _snapshot(model.backbone)
    with torch.no_grad():  # "fine-tune": move every weight and the BN statistics
        for t in (*model.parameters(), model.backbone[1].running_mean, model.backbone[1].running_var):
            t.add_(torch.rand_like(t) + 0.5)
    model.backbone[1].num_batches_tracked.fill_(7)
    return model, pretrained, _snapshot(model.backbone), _snapshot(model.head)


def test_wise_ft_ends_and_midpoint():
    model, pretrained, finetuned, head = _pretrained_and_finetuned()
    interpolate_backbone(model, pretrained, 0.0, finetuned)
    for k, v in _snapshot(model.backbone).items():
        expected = finetuned[k] if k.endswith("num_batches_tracked") else pretrained[k]
        assert torch.equal(v, expected), f"alpha=0 is not the pretrained backbone at {k}"
    for k, v in _snapshot(model.head).items():
        assert torch.equal(v, head[k]), "the task head must stay the fine-tuned one"

    interpolate_backbone(model, pretrained, 1.0, finetuned)
    for k, v in _snapshot(model.backbone).items():
        assert torch.equal(v, finetuned[k]), f"alpha=1 is not the fine-tuned backbone at {k}"

    interpolate_backbone(model, pretrained, 0.5, finetuned)
    state = _snapshot(model.backbone)
    for k, v in state.items():
        if v.is_floating_point():
            assert torch.allclose(v, (pretrained[k] + finetuned[k]) / 2, atol=1e-6), k
            assert not torch.equal(v, finetuned[k]) and not torch.equal(v, pretrained[k])
    assert int(state["1.num_batches_tracked"]) == 7  # integer buffers are the fine-tuned ones
    for k, v in _snapshot(model.head).items():
        assert torch.equal(v, head[k])


def test_wise_ft_in_place_default_uses_the_current_backbone():
    model, pretrained, finetuned, _ = _pretrained_and_finetuned()
    interpolate_backbone(model, pretrained, 0.25)  # the model holds the fine-tuned backbone
    w = model.backbone[0].weight
    assert torch.allclose(w, 0.75 * pretrained["0.weight"] + 0.25 * finetuned["0.weight"], atol=1e-6)


def test_wise_ft_refuses_bad_alpha_and_mismatched_states():
    _, pretrained, finetuned, _ = _pretrained_and_finetuned()
    for alpha in (-0.1, 1.5, math.nan):
        with pytest.raises(AsgError, match=r"\[0, 1\]"):
            interpolate_state(pretrained, finetuned, alpha)
    with pytest.raises(AsgError, match="0.bias"):
        interpolate_state({k: v for k, v in pretrained.items() if k != "0.bias"}, finetuned, 0.5)


def test_choose_alpha_is_argmax_with_ties_to_the_first():
    assert choose_alpha({0.0: 0.5, 0.25: 0.7, 0.5: 0.6}) == 0.25
    assert choose_alpha({0.0: 0.8, 0.5: 0.8, 1.0: 0.8}) == 0.0  # ties: first in grid order
    assert choose_alpha({1.0: 0.8, 0.5: 0.8}) == 1.0  # ... in the dict's order, not the smallest
    assert choose_alpha({0.0: math.nan, 0.5: 0.1}) == 0.5  # NaN never wins
    with pytest.raises(AsgError):
        choose_alpha({})


# ----------------------------------------------------------------- LP-FT


@pytest.mark.slow
def test_lpft_probe_trains_only_the_head_then_everything(tiny_bundle, tiny_config, one_thread):
    cfg = tiny_config("method.name=lpft", "method.probe_steps=2", "train.steps=4", "train.eval_every=100")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    model = trainer.model
    pretrained = model.pretrained_parameters()
    backbone0, head0 = _snapshot(model.backbone), _snapshot(model.head)
    seen = []
    original = trainer.train_step

    def step_and_record(batch):
        out = original(batch)
        grads_none = all(p.grad is None for p in pretrained)
        momentum = any("momentum_buffer" in trainer.optimizer.state.get(p, {}) for p in pretrained)
        seen.append((_snapshot(model.backbone), _snapshot(model.head), grads_none, momentum))
        return out

    trainer.train_step = step_and_record
    trainer.fit()
    assert len(seen) == 4
    for step in (0, 1):  # the probe: backbone bit-identical (weights and buffers), no grads, no momentum
        backbone, head, grads_none, momentum = seen[step]
        for k, v in backbone.items():
            assert torch.equal(v, backbone0[k]), f"backbone changed during the probe (step {step + 1}): {k}"
        assert grads_none and not momentum
        assert all(not torch.equal(v, head0[k]) for k, v in head.items() if v.is_floating_point())
    backbone, _, grads_none, momentum = seen[3]
    moved = [k for k, v in backbone.items() if v.is_floating_point() and not torch.equal(v, backbone0[k])]
    assert moved and all("imagenet" not in k for k in moved), "after the probe the backbone (only) must move"
    assert not grads_none and momentum
    for k, v in _snapshot(model.imagenet_head).items():  # frozen throughout
        assert torch.equal(v, backbone0[f"imagenet_head.{k}"])


@pytest.mark.slow
def test_lpft_state_follows_the_step_not_the_history(tiny_bundle, tiny_config):
    """A resume at any step sets the frozen state from the step alone."""
    trainer = Trainer(tiny_config("method.name=lpft", "method.probe_steps=3"), None, data=tiny_bundle, quiet=True)
    model, method = trainer.model, trainer.method
    params = model.pretrained_parameters()
    for step, trainable in ((5, True), (0, False), (3, True), (2, False), (3, True)):
        method.begin_step(model, step)
        assert all(p.requires_grad == trainable for p in params), step
        assert not any(p.requires_grad for p in model.imagenet_head.parameters())
        assert all(p.requires_grad for p in model.head.parameters())


def test_lpft_probe_on_a_segmenter_back_propagates_into_the_dense_head_only(one_thread):
    from asg.config import ModelConfig
    from asg.models import build_model

    model = build_model(ModelConfig(segmenter="lraspp"), 3, task="segmentation")
    method = build_method(MethodConfig(name="lpft", probe_steps=1))
    method.setup(model)
    pretrained = model.pretrained_parameters()
    method.begin_step(model, 0)
    x, y = torch.rand(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    method.forward_loss(model.eval(), Batch(x, y, torch.arange(2))).loss.backward()
    assert all(p.grad is None for p in pretrained)
    assert all(p.grad is not None for p in model.task_parameters())
    method.begin_step(model, 1)  # fine-tuning: the backbone trains again
    assert [n for n, _ in model.layer_groups()][-1] == "head"
    assert all(p.requires_grad for p in pretrained) and len(model.pretrained_parameters()) == len(pretrained)


# ----------------------------------------------------------------- feature guidance


def test_cosine_distance_on_hand_made_vectors():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    assert float(feature_distance(a, torch.tensor([[3.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-7)  # parallel
    assert float(feature_distance(a, torch.tensor([[0.0, 2.0, 0.0]]))) == pytest.approx(1.0, abs=1e-7)  # orthogonal
    assert float(feature_distance(a, torch.tensor([[-5.0, 0.0, 0.0]]))) == pytest.approx(2.0, abs=1e-7)  # opposite
    s, t = torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[2.0, 2.0], [0.0, 1.0]])
    assert float(feature_distance(s, t)) == pytest.approx(0.5, abs=1e-7)  # mean over the batch of 0 and 1
    torch.manual_seed(0)
    s, t = torch.randn(4, 16), torch.randn(4, 16)
    d = float(feature_distance(s, t))
    assert float(feature_distance(7.0 * s, 0.01 * t)) == pytest.approx(d, rel=1e-5)  # scale-invariant
    assert 0.0 <= d <= 2.0


def test_mse_distance_value():
    s, t = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 2.0]])
    assert float(feature_distance(s, t, "mse")) == pytest.approx((1 + 4 + 0 + 4) / 4)
    assert float(feature_distance(2 * s, 2 * t, "mse")) == pytest.approx(4 * (1 + 4 + 0 + 4) / 4)  # not scale-free
    with pytest.raises(ValueError, match="cosine"):
        feature_distance(s, t, "l1")


def test_feature_guidance_loss_is_ce_plus_weighted_distance():
    torch.manual_seed(1)
    out, y = _Out(torch.randn(4, 3), torch.randn(4, 8)), torch.tensor([0, 1, 2, 0])
    teacher = torch.randn(4, 8)
    ce = float(nn.functional.cross_entropy(out.logits, y))
    for kind in ("cosine", "mse"):
        lo = build_method(MethodConfig(name="feature", feature_weight=2.5, feature_distance=kind)).loss(out, y, teacher)
        expected = ce + 2.5 * float(feature_distance(out.features, teacher, kind))
        assert float(lo.loss) == pytest.approx(expected, rel=1e-5)
        assert float(lo.logs["task_loss"]) == pytest.approx(ce, rel=1e-5)


def test_feature_guidance_starts_at_zero_on_the_untrained_model(tiny_bundle, tiny_config, one_thread):
    cfg = tiny_config("method.name=feature", "train.steps=1", "train.eval_every=100")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    teacher, model = trainer.teacher, trainer.model
    assert teacher.output == "features"
    x = torch.stack([tiny_bundle.train[i][0] for i in range(8)])
    f_t = teacher(x)
    assert f_t.shape == (8, model.backbone.feature_dim)
    with torch.no_grad():
        f_s = model.eval()(x).features
    assert torch.allclose(f_s, f_t, atol=1e-4, rtol=1e-4)  # the teacher's BatchNorms are folded: rounding only
    assert float(feature_distance(f_s, f_t)) == pytest.approx(0.0, abs=1e-6)
    assert teacher.with_output("logits")(x).shape == (8, 1000) and teacher.output == "features"  # a view
    logs = []
    original = trainer.train_step
    trainer.train_step = lambda batch: logs.append(original(batch)) or logs[-1]
    trainer.fit()
    assert logs[0].logs["feature_dist"] == pytest.approx(0.0, abs=1e-6)  # the guidance term at step 0
    assert logs[0].logs["loss"] == pytest.approx(logs[0].logs["task_loss"], abs=1e-5)


@pytest.mark.slow
def test_feature_teacher_cache_holds_features(tiny_bundle, tiny_config, tmp_path, one_thread):
    cfg = tiny_config("method.name=feature", "teacher.cache=true", "train.steps=2", "train.eval_every=100")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    trainer.fit()
    dim = trainer.model.backbone.feature_dim
    assert trainer.teacher_source.memory is not None and trainer.teacher_source.memory.shape == (
        len(tiny_bundle.train),
        dim,
    )
    cached = trainer.teacher_source.cached.nonzero().flatten()
    x = torch.stack([tiny_bundle.train[int(i)][0] for i in cached])
    assert torch.allclose(trainer.teacher_source.memory[cached], trainer.teacher(x), atol=1e-5)

    disk = tiny_config(
        "method.name=feature",
        "teacher.cache=true",
        "teacher.cache_storage=fp32",
        f"teacher.cache_dir={tmp_path}",
        "train.steps=1",
    )
    trainer = Trainer(disk, None, data=tiny_bundle, quiet=True)
    assert (
        trainer.teacher_source.disk_cache is not None and trainer.teacher_source.disk_cache.num_classes == dim
    )  # features [N, D] on disk
    logits = tiny_config(
        "teacher.cache=true", "teacher.cache_storage=fp32", f"teacher.cache_dir={tmp_path}", "train.steps=1"
    )
    other = Trainer(logits, None, data=tiny_bundle, quiet=True).teacher_source.disk_cache
    assert other is not None and other.num_classes == 1000 and other.path != trainer.teacher_source.disk_cache.path
    for storage in ("fp16", "topk"):
        bad = tiny_config(
            "method.name=feature",
            "teacher.cache=true",
            f"teacher.cache_storage={storage}",
            f"teacher.cache_dir={tmp_path}",
        )
        with pytest.raises(ConfigError, match="fp32"):
            Trainer(bad, None, data=tiny_bundle, quiet=True)


# ----------------------------------------------------------------- asg evaluate --wise-ft


def _image_folder(root: Path) -> None:
    """Two classes (a red or a blue square) of 6 training and 2 real images each."""
    for split, n in (("train", 6), ("real", 2)):
        for label, color in (("blue", (10, 10, 200)), ("red", (200, 10, 10))):
            for i in range(n):
                path = root / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), tuple(c + 5 * i for c in color)).save(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step LP-FT run on a tiny image folder (trained once for the tests below)."""
    tmp_path = tmp_path_factory.mktemp("wise_ft")
    _image_folder(tmp_path / "images")
    recipe = {
        "data": {
            "name": "imagefolder",
            "root": str(tmp_path / "images"),
            "image_size": 32,
            "batch_size": 4,
            "eval_batch_size": 8,
            "source_val_fraction": 0.25,
        },
        "method": {"name": "lpft", "probe_steps": 1},
        "optim": {"lr": 0.05, "warmup_steps": 0},
        "train": {"steps": 2, "eval_every": 2, "checkpoint_every": 2, "progress": False},
        "eval": {"retention": False},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_cli_evaluate_wise_ft_labels_and_saves_apart(finished_run, capsys, one_thread):
    out = finished_run
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert main(["evaluate", str(out), "--wise-ft", "0.5"]) == 0
    printed = capsys.readouterr().out.split("wrote")[1]  # the WiSE-FT evaluation's lines
    assert "wise_ft_alpha=0.5" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("source_val", "real"))]
    assert len(rows) == 2 and all(line.split()[-1] == "0.5" for line in rows)  # every result line labelled
    plain = json.loads((out / "eval_last.json").read_text())
    wise = json.loads((out / "eval_last_wise_ft0.5.json").read_text())
    assert "wise_ft_alpha" not in plain and wise["wise_ft_alpha"] == 0.5
    assert all(s["wise_ft_alpha"] == 0.5 for s in wise["sets"].values())
    assert (out / "confusion_last_wise_ft0.5_real.png").exists()

    assert main(["evaluate", str(out), "--wise-ft", "1.5"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_api_evaluate_wise_ft_grid(finished_run, one_thread):
    plain = evaluate(finished_run, show_progress=False)
    grid = evaluate_wise_ft(finished_run, alphas=(0, 1), sets=["source_val"])
    assert list(grid) == [0.0, 1.0] and all(list(v) == ["source_val"] for v in grid.values())
    assert grid[1.0]["source_val"]["confusion"] == plain["sets"]["source_val"]["confusion"]  # alpha 1 = the run
    assert grid[0.0]["source_val"]["wise_ft_alpha"] == 0.0
    all_sets = evaluate_wise_ft(finished_run, alphas=(0.5,))
    assert set(all_sets[0.5]) == {"source_val", "real"}
    with pytest.raises(AsgError, match="source_val"):
        evaluate_wise_ft(finished_run, sets=["nope"])


def test_gradient_all_reduce_keeps_a_frozen_parameters_grad_none(tmp_path):
    """LP-FT's probe leaves backbone gradients None: the multi-process reduction must keep them None (so SGD
    skips them) and still average the others."""
    import torch.distributed as td

    from asg.collectives import weighted_all_reduce

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        frozen, head = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        head.grad = torch.tensor([2.0, -4.0])
        means = weighted_all_reduce(torch.device("cpu"), [frozen, head], {"loss": torch.tensor(1.5)}, 8.0)
    finally:
        td.destroy_process_group()
    assert frozen.grad is None
    assert torch.equal(head.grad, torch.tensor([2.0, -4.0])) and means == {"loss": 1.5}
