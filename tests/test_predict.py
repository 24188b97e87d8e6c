"""`asg predict` and `asg export`: a tiny trained image-folder run predicted without its data, the same classes as
the evaluation's code, each bad input of issue 25 as one line, ONNX exports of every backbone family checked."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from asg.cli import main
from asg.config import ModelConfig, load_config
from asg.engine.rundir.model_info import ModelInfo
from asg.models import build_model

CLASSES = ["circle", "square", "stripe"]
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "stripe": (40, 60, 220)}


def _image(cls: str, seed: int, size=(40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[0], size[1], 3)) * 60).astype(np.uint8)
    arr[8:-8, 8:-8] = COLOURS[cls]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A 2-step ERM run on a tiny image folder (train/ + real/), EfficientNet-Lite0 at 32 px."""
    root = tmp_path_factory.mktemp("shapes")
    for split, n in (("train", 6), ("real", 3)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                _image(c, hash((split, c, k)) % 1000).save(root / split / c / f"{k}.png")
    from asg.api import train

    overrides = [
        f"data.root={root}",
        "data.num_workers=0",
        "data.image_size=32",
        "data.batch_size=6",
        "data.source_val_fraction=0.2",
        "train.steps=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.progress=false",
        "eval.retention=false",
        "model.hidden_dim=16",
        "optim.warmup_steps=0",
        "optim.lr=0.01",
        "name=shapes",
    ]
    out = tmp_path_factory.mktemp("runs") / "shapes"
    torch.set_num_threads(1)
    train(load_config("imagefolder_erm", overrides), out=out, quiet=True)  # the own-data recipe
    return out, root


@pytest.mark.slow
def test_run_folder_records_what_predict_needs(cls_run):
    run, _ = cls_run
    info = json.loads((run / "model.json").read_text())
    assert info["task"] == "classification" and info["class_names"] == CLASSES and info["image_size"] == 32
    assert info["mean"] == pytest.approx([127 / 255] * 3) and len(info["config_sha256"]) == 64


@pytest.mark.slow
@pytest.mark.parametrize("tta", [False, True])
def test_predictor_matches_the_evaluation_code(cls_run, tta):
    from asg.api import load, load_run
    from asg.models.fusion import inference_copy
    from asg.models.inference import predict_scores

    run_dir, _ = cls_run
    run = load_run(run_dir)  # the evaluation's path: builds the data
    ds = run.data.eval_sets["real"]
    model = inference_copy(run.model)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        scores = predict_scores(model, x, tta)
        logits = model(x).logits
    predictor = load(run_dir, device="cpu", tta_flip=tta)
    preds = predictor.predict([ds.image_path(i) for i in range(len(ds))])
    assert [p.label for p in preds] == scores.argmax(1).tolist()
    if not tta:
        np.testing.assert_allclose(np.stack([p.probs for p in preds]), torch.softmax(logits, 1).numpy(), atol=1e-5)
    # PIL images, arrays and tensors give the same answer as paths
    again = predictor.predict([np.asarray(Image.open(ds.image_path(0)))])
    assert again[0].label == preds[0].label and again[0].probability == pytest.approx(preds[0].probability, abs=1e-6)


@pytest.mark.slow
def test_predict_cli_without_the_training_data(cls_run, tmp_path, capsys):
    run, root = cls_run
    images = tmp_path / "mine"
    shutil.copytree(root / "real", images)
    hidden = root.with_name(root.name + "_gone")
    root.rename(hidden)  # the data root no longer exists
    try:
        assert main(["predict", str(run), str(images), "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    finally:
        hidden.rename(root)
    printed = capsys.readouterr().out
    assert "predicted 9 image(s)" in printed and "images per class" in printed
    rows = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and rows[0]["path"].endswith("circle/0.png") and len(rows[0]["top_k"]) == 3
    assert sum(json.loads((tmp_path / "p" / "summary.json").read_text())["class_counts"].values()) == 9
    assert (tmp_path / "p" / "predictions.csv").read_text().startswith("path,class,probability,top1")


@pytest.mark.slow
def test_list_files_and_standard_input(cls_run, tmp_path, monkeypatch):
    run, root = cls_run
    lst = tmp_path / "list.txt"
    lst.write_text(f"# mine\n{root / 'real/circle/0.png'} 0\n\n{root / 'real/square/1.png'}\n")
    assert main(["predict", str(run), str(lst), "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{root / 'real/stripe/2.png'}\n"))
    assert main(["predict", str(run), "-", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert len((tmp_path / "a" / "predictions.jsonl").read_text().splitlines()) == 2
    assert "stripe/2.png" in (tmp_path / "b" / "predictions.csv").read_text()


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_lose_nothing(cls_run, tmp_path, capsys):
    run, root = cls_run
    folder = tmp_path / "in"
    folder.mkdir()
    good = _image("circle", 1)
    good.convert("L").save(folder / "gray.png")
    good.convert("RGBA").save(folder / "rgba.png")
    good.convert("P").save(folder / "palette.png")
    Image.fromarray(np.asarray(good.convert("L")).astype(np.uint16) * 257).save(folder / "deep16.png")
    good.save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image")
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    out = tmp_path / "out"
    argv = ["predict", str(run), str(folder), "--out", str(out), "--no-progress", "--max-pixels", "50000"]
    assert main(argv) == 1  # some failed: the exit code says so
    err = capsys.readouterr().err
    assert "Traceback" not in err and "3 image(s) could not be read" in err
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 3 and any("huge.png: refused: 300 x 300" in f for f in failed)
    assert any("truncated.png: cannot decode" in f for f in failed) and any("notes.png" in f for f in failed)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5  # gray, RGBA, palette, 16-bit and the whole image read correctly
    assert len({r["class"] for r in rows if "whole" in r["path"] or "rgba" in r["path"] or "palette" in r["path"]}) == 1
    # the output folder now holds predictions: kept unless --overwrite
    before = (out / "predictions.jsonl").read_text()
    assert main(argv) == 2
    assert "already holds predictions" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == before
    assert main([*argv, "--overwrite"]) == 1


@pytest.mark.slow
def test_unfinished_old_and_mismatched_runs(cls_run, tmp_path, capsys):
    run, root = cls_run
    img = str(root / "real" / "circle" / "0.png")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "done").unlink()
    assert main(["predict", str(unfinished), img, "--out", str(tmp_path / "u"), "--no-progress"]) == 0
    assert "has not finished" in capsys.readouterr().err and "step 2" in (tmp_path / "u" / "summary.json").read_text()

    old = tmp_path / "old"  # an earlier asg's unfinished folder: no model.json, no summary.json
    shutil.copytree(unfinished, old)
    (old / "model.json").unlink()
    (old / "summary.json").unlink(missing_ok=True)
    assert main(["predict", str(old), img, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--class-names" in err and "Traceback" not in err
    argv = ["predict", str(old), img, "--out", str(tmp_path / "o"), "--no-progress", "--class-names", "x,y,z"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "o" / "predictions.jsonl").read_text())["class"] in {"x", "y", "z"}

    from asg.engine.rundir.weights import save_weights

    other = build_model(ModelConfig(weights="none", hidden_dim=8), 5)  # another head size and class count
    save_weights(other, tmp_path / "other.safetensors")
    argv = ["predict", str(run), img, "--out", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "other.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "head." in err and "Traceback" not in err


@pytest.mark.slow
def test_wise_ft_predicts_with_the_interpolated_model(cls_run):
    from asg.api import load

    run, root = cls_run
    img = root / "real" / "square" / "0.png"
    full, zero = load(run, wise_ft=1.0, device="cpu"), load(run, wise_ft=0.0, device="cpu")
    plain = load(run, device="cpu")
    assert full.predict(img)[0].probs == pytest.approx(plain.predict(img)[0].probs, abs=1e-6)
    assert not np.allclose(zero.predict(img)[0].probs, plain.predict(img)[0].probs, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_and_predict_of_a_run(cls_run, tmp_path, capsys):
    run, root = cls_run
    onnx_path = tmp_path / "shapes.onnx"
    assert main(["export", str(run), "--out", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    assert "largest logit difference" in printed
    side = json.loads((tmp_path / "shapes.onnx.json").read_text())
    assert (
        side["class_names"] == CLASSES
        and side["input"]["size"] == [32, 32]
        and side["check"]["max_abs_logit_diff"] < 1e-3
    )
    assert side["config_sha256"] == json.loads((run / "model.json").read_text())["config_sha256"]
    out_t, out_o = tmp_path / "t", tmp_path / "o"
    assert main(["predict", str(run), str(root / "real"), "--out", str(out_t), "--no-progress"]) == 0
    assert main(["predict", str(onnx_path), str(root / "real"), "--out", str(out_o), "--no-progress"]) == 0
    torch_rows = (out_t / "predictions.jsonl").read_text().splitlines()
    onnx_rows = (out_o / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(r)["class"] for r in torch_rows] == [json.loads(r)["class"] for r in onnx_rows]
    capsys.readouterr()

    altered = dict(side, class_names=["x", "y", "z"])
    (tmp_path / "shapes.onnx.json").write_text(json.dumps(altered))
    assert main(["predict", str(onnx_path), str(root / "real"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "was altered" in capsys.readouterr().err
    (tmp_path / "shapes.onnx.json").unlink()
    assert main(["predict", str(onnx_path), str(root / "real"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "sidecar shapes.onnx.json is missing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- segmentation
def _seg_info(names, **kw):
    return ModelInfo(
        task="segmentation",
        class_names=names,
        image_size=32,
        palette=[[(i * 40) % 256, 0, 0] for i in range(len(names))],
        **kw,
    )


def test_sliding_window_covering_the_image_equals_whole_image_inference(one_thread):
    from asg.predict import Predictor

    cfg = ModelConfig(weights="none", segmenter="lraspp", channels_last=False)
    model = build_model(cfg, 3, task="segmentation").eval()
    info = _seg_info(["a", "b", "c"])
    img = _image("circle", 3, size=(37, 45))
    whole = Predictor(model, info, sliding_window=None)
    window = Predictor(model, info, sliding_window=(37, 45))
    x = whole._seg_input(img)[None]
    assert torch.allclose(whole.probabilities(x), window.probabilities(x), atol=1e-6)
    bigger = Predictor(model, info, sliding_window=(64, 64))  # padded window: still the whole image, cropped back
    assert bigger.probabilities(x).shape == (1, 3, 37, 45)
    multi = Predictor(model, info, sliding_window=(24, 24), scales=(0.75, 1.0), tta_flip=True).predict(img)[0]
    assert multi.mask.shape == (37, 45) and sum(multi.fractions.values()) == pytest.approx(1.0)


@pytest.mark.slow
def test_segmentation_onnx_predict_writes_masks_overlays_and_label_ids(tmp_path, capsys, one_thread):
    from asg.data.segmentation.street_classes import CITYSCAPES_CLASSES
    from asg.predict.export import export_onnx

    model = build_model(ModelConfig(weights="none", segmenter="lraspp", channels_last=False), 19, task="segmentation")
    info = _seg_info(list(CITYSCAPES_CLASSES), sliding_window=[32, 32], backbone="efficientnet_lite0")
    onnx_path = tmp_path / "seg.onnx"
    side = export_onnx(model.eval(), info, onnx_path)
    assert side["input"]["dynamic_size"] and side["check"]["inputs"] == [[2, 3, 32, 32], [1, 3, 64, 80]]
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    _image("square", 1, size=(50, 70)).save(folder / "sub" / "a.png")
    _image("stripe", 2, size=(30, 20)).save(folder / "b.jpg")
    argv = [
        "predict",
        str(onnx_path),
        str(folder),
        "--out",
        str(tmp_path / "p"),
        "--no-progress",
        "--label-ids",
        "cityscapes",
    ]
    assert main(argv) == 0
    assert "mean pixel fraction" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "p" / "masks" / "sub" / "a.png"))
    assert mask.shape == (50, 70) and set(np.unique(mask)) <= {
        7,
        8,
        11,
        12,
        13,
        17,
        19,
        20,
        21,
        22,
        23,
        24,
        25,
        26,
        27,
        28,
        31,
        32,
        33,
    }
    assert Image.open(tmp_path / "p" / "overlays" / "b.png").size == (20, 30)
    row = json.loads((tmp_path / "p" / "predictions.jsonl").read_text().splitlines()[0])
    assert set(row["fractions"]) == set(CITYSCAPES_CLASSES)


# ---------------------------------------------------------------------------------------------- ONNX per family
def _shrink_fcn(model):
    """FCN-8s with fc6/fc7 of 16 channels instead of 4,096 (the same graph, a test-sized file)."""
    head = model.head
    head.fc6, head.fc7 = torch.nn.Conv2d(512, 16, 7), torch.nn.Conv2d(16, 16, 1)
    head.score_fr = torch.nn.Conv2d(16, model.num_classes, 1)
    return model


TINY_RESNET = {"layers": [1, 1, 1, 1]}
VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2}
FAMILIES = {
    "efficientnet_lite": ("classification", dict(backbone="efficientnet_lite0"), 32),
    "efficientnet_lite_lraspp": ("segmentation", dict(backbone="efficientnet_lite0", segmenter="lraspp"), 32),
    "resnet_deeplabv3": ("segmentation", dict(backbone="resnet50", segmenter="deeplabv3", timm_kwargs=TINY_RESNET), 32),
    "resnet": ("classification", dict(backbone="resnet50", timm_kwargs=TINY_RESNET), 32),
    "vgg_fcn8s": ("segmentation", dict(backbone="vgg16", segmenter="fcn8s"), 32),
    "convnext_fpn": (
        "segmentation",
        dict(backbone="convnext_tiny", segmenter="fpn", timm_kwargs={"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64]}),
        32,
    ),
    "vit_dinov2": ("classification", dict(backbone="dinov2_vits14", guidance_head="none", timm_kwargs=VIT), 28),
    "vit_dinov2_fpn_lora": (
        "segmentation",
        dict(backbone="dinov2_vits14", guidance_head="none", segmenter="fpn", timm_kwargs=VIT, lora_rank=2),
        28,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_matches_pytorch_for_each_backbone_family(family, tmp_path, one_thread):
    from asg.predict.export import export_onnx

    task, kw, size = FAMILIES[family]
    cfg = ModelConfig(weights="none", channels_last=False, input_size=size if "vit" in family else None, **kw)
    model = build_model(cfg, 4, task=task)
    if family == "vgg_fcn8s":
        model = _shrink_fcn(model)
    if cfg.lora_rank:  # adapters that change the output, to see them merged
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():  # a check of all-zero logits would prove nothing
        assert model(torch.rand(1, 3, size, size)).logits.abs().max() > 1e-3
    info = ModelInfo(task=task, class_names=list("abcd"), image_size=size, backbone=cfg.backbone)
    side = export_onnx(model, info, tmp_path / "m.onnx")
    print(f"{family}: max |logit diff| {side['check']['max_abs_logit_diff']:.2e} on {side['check']['inputs']}")
    assert side["check"]["max_abs_logit_diff"] < 1e-3
    assert side["input"]["dynamic_size"] == ("vit" not in family)
    if cfg.lora_rank:
        assert side["lora_layers_merged"] > 0


@pytest.mark.slow
def test_export_refuses_above_the_tolerance(tmp_path, one_thread):
    from asg.errors import AsgError
    from asg.predict.export import export_onnx

    model = build_model(ModelConfig(weights="none", channels_last=False, hidden_dim=8), 3).eval()
    info = ModelInfo(task="classification", class_names=list("abc"), image_size=32, backbone="efficientnet_lite0")
    with pytest.raises(AsgError, match="differs from PyTorch"):
        export_onnx(model, info, tmp_path / "m.onnx", tolerance=0.0 - 1.0)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("asg 0.")
