"""Domain adaptation: class-balanced selection, the widened method contract, init_from, asg adapt rounds."""

import json

import numpy as np
import pytest
import torch
import yaml
from helpers import CrashAt, ImagesLabelsRaise, RedIsOne, SizedScenes
from safetensors.torch import load_file

from asg.adapt import Adaptation, ConfidenceHistogram, class_thresholds, select
from asg.adapt.pseudo import load_pseudo_labels
from asg.cli import main
from asg.config import AdaptConfig, load_config
from asg.data import DataBundle
from asg.data.targets import target_dataset
from asg.engine.callbacks import Callback
from asg.engine.trainer import Trainer
from asg.errors import AsgError, DataError, WeightsError
from asg.methods import ERM, SelfTraining


def test_class_balanced_selection_on_hand_made_confidences():
    probs = torch.tensor(
        [
            [0.90, 0.05, 0.05],  # predicted 0, among the top 40% of class 0 -> 0
            [0.80, 0.10, 0.10],  # predicted 0, exactly at class 0's threshold -> 0
            [0.70, 0.15, 0.15],  # predicted 0, below -> left out
            [0.60, 0.20, 0.20],  # left out
            [0.60, 0.00, 0.40],  # predicted 0 but clears class 2's threshold: CBST's p/lambda gives 2
            [0.05, 0.95, 0.00],  # the most confident class-1 item -> 1
            [0.30, 0.40, 0.30],  # predicted 1, far below -> left out
            [0.30, 0.30, 0.40],  # the only class-2 prediction -> 2
        ]
    )
    conf, pred = probs.max(1)
    thr = class_thresholds(conf.numpy(), pred.numpy(), 0.4, 3)
    np.testing.assert_allclose(thr, [0.8, 0.95, 0.4], rtol=1e-6)  # ceil(0.4 * n_c)-th most confident of each
    labels, _ = select(probs, thr)
    assert labels.tolist() == [0, 0, 255, 255, 2, 1, 255, 2]
    # one threshold for all classes (CBST's baseline): the 4th of the 8 confidences, 0.7
    thr_global = class_thresholds(conf.numpy(), pred.numpy(), 0.4, 3, rule="global")
    np.testing.assert_allclose(thr_global, [0.7] * 3, rtol=1e-6)
    assert select(probs, thr_global)[0].tolist() == [0, 0, 0, 255, 255, 1, 255, 255]
    # a class nothing is predicted as cannot be selected
    assert np.isinf(class_thresholds(conf.numpy(), pred.numpy(), 0.4, 4)[3])


def test_pixel_histogram_thresholds_match_exact_sorting_within_one_bin():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5, 40, 30, generator=g) * 2, dim=0)  # [C, H, W]
    conf, pred = probs.max(0)
    hist = ConfidenceHistogram(5, bins=1000)
    hist.add(conf[:20], pred[:20])
    hist.add(conf[20:], pred[20:])
    exact = class_thresholds(conf.flatten().numpy(), pred.flatten().numpy(), 0.3, 5)
    approx = hist.thresholds(0.3)
    assert np.all(approx <= exact) and np.all(exact - approx < 1e-3)
    labels, _ = select(probs, approx)
    assert labels.shape == (40, 30)
    for c in range(5):  # every pixel of class c at or above the exact threshold is kept
        assert bool((labels[(pred == c) & (conf >= exact[c])] != 255).all())


class CountingERM(ERM):
    """ERM whose after_step counts optimizer steps, a count saved in the checkpoint."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = 0

    def after_step(self, model):
        self.calls += 1

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


@pytest.mark.slow
def test_post_step_hook_runs_once_per_optimizer_step_across_a_resume(tiny_bundle, tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("method.name=erm", "train.steps=5")
    method = CountingERM(cfg.method)
    Trainer(cfg, None, data=tiny_bundle, method=method, quiet=True).fit()
    assert method.calls == 5
    crash = [CrashAt(3)]  # the checkpoint of step 2 is on disk
    with pytest.raises(KeyboardInterrupt):
        Trainer(
            cfg, tmp_path / "r", data=tiny_bundle, method=CountingERM(cfg.method), quiet=True, callbacks=crash
        ).fit()
    resumed = CountingERM(cfg.method)
    Trainer(cfg, tmp_path / "r", data=tiny_bundle, method=resumed, quiet=True, resume=True).fit()
    assert resumed.calls == 5  # 2 restored from the checkpoint + steps 3..5


def test_ema_update_of_self_training(tiny_bundle, tiny_config):
    cfg = tiny_config("method.name=erm")
    method = SelfTraining(ERM(cfg.method), AdaptConfig(ema_decay=0.75))
    model = torch.nn.Linear(2, 2)
    method.setup(model)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    method.after_step(model)
    assert torch.allclose(method.ema["weight"], 0.75 * w0 + 0.25 * (w0 + 1.0))
    restored = SelfTraining(ERM(cfg.method), AdaptConfig(ema_decay=0.75))
    restored.setup(torch.nn.Linear(2, 2))
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.ema["weight"], method.ema["weight"])


@pytest.mark.slow
def test_init_from_loads_every_weight_and_starts_at_step_zero(tiny_bundle, tiny_config, erm_run):
    saved = load_file(str(erm_run / "last.safetensors"))
    cfg = tiny_config(f"model.init_from={erm_run}")
    trainer = Trainer(cfg, None, data=tiny_bundle, quiet=True)
    assert trainer.step == 0
    state = trainer.model.state_dict()
    assert set(state) == set(saved)
    for k, v in saved.items():
        assert torch.equal(state[k].cpu(), v), k
    fresh = Trainer(tiny_config(), None, data=tiny_bundle, quiet=True)  # the teacher stays the ImageNet network
    for k, v in fresh.teacher.state_dict().items():
        assert torch.equal(trainer.teacher.state_dict()[k], v), k
    file_cfg = tiny_config(f"model.init_from={erm_run / 'last.safetensors'}")
    assert torch.equal(
        Trainer(file_cfg, None, data=tiny_bundle, quiet=True).model.head[0].weight, state["head.0.weight"]
    )
    with pytest.raises(WeightsError, match="hidden_dim=512"):
        Trainer(tiny_config(f"model.init_from={erm_run}", "model.hidden_dim=64"), None, data=tiny_bundle)
    four = DataBundle(tiny_bundle.train, tiny_bundle.eval_sets, "source_val", ["a", "b", "c", "d"])
    with pytest.raises(WeightsError, match="3 classes"):
        Trainer(cfg, None, data=four, quiet=True)
    with pytest.raises(WeightsError, match="does not exist"):
        Trainer(tiny_config("model.init_from=/no/such/run"), None, data=tiny_bundle)


def _adapt_setup(tiny_bundle, tiny_config, erm_run):
    target = ImagesLabelsRaise(tiny_bundle.eval_sets["real"])
    bundle = DataBundle(
        tiny_bundle.train,
        tiny_bundle.eval_sets,
        "source_val",
        tiny_bundle.class_names,
        target_sets={"real_adapt": target},
    )
    cfg = tiny_config(
        "method.name=erm",
        f"model.init_from={erm_run}",
        "adapt.target=real_adapt",
        "adapt.rounds=2",
        "adapt.steps_per_round=4",
        "adapt.init_portion=0.5",
        "adapt.max_portion=0.6",
        "adapt.target_batch_size=4",
        "adapt.regularizer=mrkld",
    )
    return cfg, bundle


@pytest.mark.slow
def test_adaptation_never_reads_target_labels_and_resumes_mid_round_exactly(
    tiny_bundle, tiny_config, tmp_path, erm_run
):
    cfg, bundle = _adapt_setup(tiny_bundle, tiny_config, erm_run)
    whole = Adaptation(cfg, tmp_path / "a", data=bundle, quiet=True).run()
    assert [r["round"] for r in whole.rounds] == [1, 2]
    assert [r["portion"] for r in whole.rounds] == [0.5, 0.55]
    pseudo = load_pseudo_labels(tmp_path / "a" / "round_01")
    assert pseudo is not None and 0 < len(pseudo.indices) <= 12
    report = (tmp_path / "a" / "report.md").read_text()
    assert "pseudo-label precision is not available" in report  # no labelled view of this target

    # stopped in round 2 before its step 3 (the checkpoint of its step 2 is on disk)
    in_round_2 = CrashAt(3, when=lambda trainer: trainer.cfg.name.endswith("round 2"))
    with pytest.raises(KeyboardInterrupt):
        Adaptation(cfg, tmp_path / "b", data=bundle, quiet=True, callbacks=[in_round_2]).run()
    with pytest.raises(AsgError, match="round 2 at step 2.*--resume"):
        Adaptation(cfg, tmp_path / "b", data=bundle, quiet=True).run()
    resumed = Adaptation(cfg, tmp_path / "b", data=bundle, quiet=True, resume=True).run()
    a = load_file(str(tmp_path / "a" / "round_02" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "round_02" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["metrics"] for r in resumed.rounds] == [r["metrics"] for r in whole.rounds]
    # stopped after round 2 finished but before adaptation.json recorded it: the round is read, not retrained
    state = json.loads((tmp_path / "b" / "adaptation.json").read_text())
    (tmp_path / "b" / "adaptation.json").write_text(json.dumps({**state, "rounds": state["rounds"][:1]}))
    (tmp_path / "b" / "done").unlink()
    mtime = (tmp_path / "b" / "round_02" / "last.safetensors").stat().st_mtime_ns
    again = Adaptation(cfg, tmp_path / "b", data=bundle, quiet=True, resume=True).run()
    assert [r["metrics"] for r in again.rounds] == [r["metrics"] for r in whole.rounds]
    assert (tmp_path / "b" / "round_02" / "last.safetensors").stat().st_mtime_ns == mtime


def test_target_folder_and_list_errors(tmp_path):
    cfg = load_config(None, ["data.image_size=32"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image"):
        target_dataset(str(tmp_path / "empty"), cfg.data, "classification", {})
    with pytest.raises(DataError, match="not a target set.*mnist5k_adapt"):
        target_dataset("mnist_adapt", cfg.data, "classification", {"mnist5k_adapt": []})
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 3\n")
    ds, name, note = target_dataset(str(tmp_path / "list.txt"), cfg.data, "classification", {})
    assert name == "list" and "labels are ignored" in note
    assert ds[0].shape == (3, 32, 32)


class StepsSeen(Callback):
    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_step_end(self, trainer, out) -> None:
        self.seen.append(trainer.step)


@pytest.mark.slow
def test_cli_adapt_end_to_end_on_digit_halves(tmp_path, capsys):
    base = [
        "--set",
        f"data.root={tmp_path / 'cache'}",
        "--set",
        "data.num_train=120",
        "--set",
        "data.image_size=32",
        "--set",
        "data.real_split=halves",
        "--set",
        "train.progress=false",
        "--set",
        "eval.retention=false",
    ]
    from asg import api

    src, steps = tmp_path / "src", StepsSeen()
    api.train("digits_erm", [*base[1::2], "train.steps=2"], out=src, quiet=True, callbacks=[steps])
    assert steps.seen == [1, 2]  # api.train adds the callbacks to its run
    stop = CrashAt(1, when=lambda trainer: trainer.cfg.name.endswith("round 1"))  # ... and api.adapt to each round's
    adapt_over = [*base[1::2], f"model.init_from={src}", "adapt.target=uci_digits_adapt", "adapt.rounds=1"]
    with pytest.raises(KeyboardInterrupt, match="CrashAt"):
        api.adapt("digits_erm", adapt_over, out=tmp_path / "stopped", quiet=True, callbacks=[stop])
    out = tmp_path / "adapt"
    args = ["adapt", "--config", "digits_erm", "--from", str(src), "--target", "uci_digits_adapt", "--out", str(out)]
    assert main([*args, *base, "--set", "adapt.rounds=1", "--set", "adapt.steps_per_round=2"]) == 0
    printed = capsys.readouterr().out
    assert "[start]" in printed and "[round 1]" in printed and "uci_digits_test" in printed
    state = json.loads((out / "adaptation.json").read_text())
    assert state["target"] == "uci_digits_adapt" and set(state["start"]["metrics"]) == {
        "synthetic",
        "mnist5k_test",
        "uci_digits_test",
    }
    source_last = json.loads((src / "summary.json").read_text())["selections"]["last"]["metrics"]
    assert (
        state["start"]["from_summary"]
        and state["start"]["metrics"]["uci_digits_test"] == source_last["uci_digits_test"]
    )  # the starting model's full-set evaluation is taken from its run, not computed again
    precision = state["rounds"][0]["precision"]["precision"]  # labelled view of the halves: report only
    assert state["target_images"] > 0  # one writer: the report's precision is added, nothing else dropped
    assert 0.0 <= precision <= 1.0
    assert yaml.safe_load((out / "config.yaml").read_text())["adapt"]["target"] == "uci_digits_adapt"
    assert (out / "report.md").exists() and (out / "adaptation.png").exists() and (out / "done").exists()
    assert main([*args, *base]) == 2  # finished: refused
    assert "already finished" in capsys.readouterr().err


def test_segmentation_pseudo_labels_per_pixel_with_precision_from_truth(tmp_path):
    from asg.adapt import pseudo_label
    from asg.adapt.report import pseudo_precision
    from asg.data.segmentation.pairs import PairTransform
    from asg.data.targets import ImagesOf, PseudoLabeled

    class Images(SizedScenes):
        def image(self, i):  # graded colours, so that confidences differ from pixel to pixel
            img = self[i][0]
            h, w = img.shape[1:]
            ramp = 0.3 * torch.linspace(0, 1, h * w).view(h, w)
            img[0] = torch.where(img[0] > 0.5, 1 - ramp, ramp)
            return img

    truth = SizedScenes([(6, 8), (6, 8), (4, 10)])  # mixed sizes; labels at twice the resolution
    target = ImagesOf(Images(truth.sizes))
    cfg = load_config(None, ["data.eval_batch_size=2", "adapt.thresholds=class_balanced"])
    pseudo = pseudo_label(RedIsOne(), target, cfg, 0.5, 2, tmp_path, torch.device("cpu"), "segmentation")
    assert pseudo.indices.tolist() == [0, 1, 2] and pseudo.stats["unit"] == "pixels"
    assert pseudo.stats["total"] == sum(h * w for h, w in truth.sizes)
    for j, (h, w) in enumerate(truth.sizes):
        label = pseudo.label(j)
        assert label.shape == (h, w)  # at the resolution the image was predicted at
        assert set(label.unique().tolist()) <= {0, 1, 255}
    selected = pseudo.stats["selected"] / pseudo.stats["total"]
    assert 0.5 <= selected < 0.6  # about half of each class's pixels (histogram bins may keep a few more)
    # the model is right on every pixel, so every selected pixel is right
    assert pseudo_precision(truth, tmp_path, 2)["precision"] == pytest.approx(1.0)
    again = load_pseudo_labels(tmp_path)
    assert again is not None and torch.equal(again.label(2), pseudo.label(2))
    ds = PseudoLabeled(target, pseudo.indices, pseudo.label, PairTransform(crop_size=[4, 4]))
    image, label = ds[0]
    assert image.shape == (3, 4, 4) and label.shape == (4, 4)
