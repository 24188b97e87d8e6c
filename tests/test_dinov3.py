"""DINOv3 backbones (asg.models.dinov3) on tiny random timm models: Meta's checkpoint layout through timm's
converter, the missing-file message, class-token pooling at any input size, and two training steps of ASG (a
user-trained linear head), CSG and feature guidance in both tasks, with LoRA."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import RandomImages, Scenes

from asg.config import ModelConfig
from asg.data import DataBundle
from asg.engine.callbacks import Callback
from asg.engine.trainer import Trainer
from asg.errors import ConfigError, WeightsError
from asg.models import build_backbone, build_model

TINY = {"depth": 4, "embed_dim": 64, "num_heads": 2}


def _meta_layout(model: torch.nn.Module, qkv_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A timm DINOv3 ViT's state in Meta's original layout (storage tokens, ls1/ls2 gammas, a masked qkv bias,
    the pretraining-only mask token and the RoPE periods buffer)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        out[
            k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        ] = v
    depth, width = len(model.blocks), model.embed_dim
    for i in range(depth):
        attn = model.blocks[i].attn
        if qkv_bias is not None:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([attn.q_bias, torch.zeros(width), attn.v_bias]).detach()
        else:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * width)
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * width)
    out["mask_token"] = torch.zeros(1, width)
    out["rope_embed.periods"] = torch.ones(width // 8)
    return out


def _files(tmp_path, qkv_bias: bool = False) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    arch = "vit_small_patch16_dinov3" + ("_qkvb" if qkv_bias else "")
    ref = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token", **TINY).eval()
    if qkv_bias:
        with torch.no_grad():
            for b in ref.blocks:
                b.attn.q_bias.normal_()
                b.attn.v_bias.normal_()
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-0000.pth"
    torch.save(_meta_layout(ref, torch.ones(1) if qkv_bias else None), path)
    return str(path), ref


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["zero-qkv-bias", "qkv-bias"])
def test_meta_layout_file_loads_through_timms_converter_and_pools_the_class_token(tmp_path, qkv_bias):
    path, ref = _files(tmp_path, qkv_bias)
    bb = build_backbone("dinov3_vits16", path, timm_kwargs=TINY).eval()
    assert bb.model.default_cfg["architecture"].endswith("_qkvb") == qkv_bias  # the biases decide the variant
    for size in ((64, 80), (48, 112)):  # any input size: RoPE, no position table
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            pooled = bb(x)
            tokens = ref.forward_features(bb.normalize(x))
        assert pooled.shape == (2, 64) and bb.feature_dim == 64
        assert torch.allclose(pooled, tokens[:, 0], atol=1e-5)  # the normed class token, as upstream


def test_missing_weights_name_the_file_the_licence_and_where_to_get_it(tmp_path):
    for weights in ("imagenet", str(tmp_path / "absent.pth")):
        with pytest.raises(WeightsError) as err:
            build_backbone("dinov3_vitl16", weights)
        text = str(err.value)
        assert "dinov3_vitl16_pretrain_lvd1689m-<hash>.pth" in text and "vit_large_patch16_dinov3.lvd1689m" in text
        assert "DINOv3 License" in text and "ai.meta.com" in text and "Nothing is downloaded" in text
    with pytest.raises(WeightsError, match="dinov3_convnext_base_pretrain_lvd1689m"):
        build_backbone("convnext_base_dinov3", "imagenet")


def test_dinov3_convnext_has_no_imagenet_head_and_guidance_auto_is_none(tmp_path):
    torch.manual_seed(0)
    tiny = {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}
    net = timm.create_model("convnext_tiny", pretrained=False, num_classes=0, **tiny)
    path = tmp_path / "convnext.pth"
    torch.save(net.state_dict(), path)
    model = build_model(ModelConfig(backbone="convnext_tiny_dinov3", weights=str(path), timm_kwargs=tiny), 3)
    assert model.imagenet_head(torch.zeros(1, 64)).shape == (1, 0)
    assert model(torch.rand(1, 3, 64, 64)).logits.shape == (1, 3)


def test_a_user_trained_linear_head_guides_and_a_wrong_one_is_refused(tmp_path):
    path, _ = _files(tmp_path)
    head = tmp_path / "head.pth"
    torch.save({"weight": torch.randn(1000, 64), "bias": torch.zeros(1000)}, head)
    cfg = ModelConfig(backbone="dinov3_vits16", weights=path, guidance_file=str(head), timm_kwargs=TINY)
    model = build_model(cfg, 3)  # guidance_head auto: the linear head, as a file is named
    assert model.imagenet_head.weight.shape == (1000, 64)
    torch.save({"weight": torch.randn(1000, 128), "bias": torch.zeros(1000)}, head)
    with pytest.raises(WeightsError, match=r"not a linear head .*expected weight \(1000, 64\)"):
        build_model(cfg, 3)
    with pytest.raises(ConfigError, match="guidance_head=linear needs model.guidance_file"):
        build_model(ModelConfig(backbone="dinov3_vits16", weights=path, guidance_head="linear", timm_kwargs=TINY), 3)


class Logs(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_step_end(self, trainer, out) -> None:
        self.rows.append(out.logs)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["asg", "csg", "feature"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_two_steps_of_each_guidance_with_lora_in_both_tasks(method, task, tiny_config, tmp_path, one_thread):
    pytest.importorskip("peft")
    path, _ = _files(tmp_path)
    head = tmp_path / "head.pth"
    torch.manual_seed(1)
    torch.save({"weight": torch.randn(1000, 64) * 0.05, "bias": torch.zeros(1000)}, head)
    mcfg = ModelConfig(
        backbone="dinov3_vits16",
        weights=path,
        timm_kwargs=TINY,
        lora_rank=2,
        channels_last=False,
        guidance_file=str(head) if method == "asg" else None,
    )
    if task == "segmentation":
        mcfg.segmenter = "fpn"
        data = DataBundle(
            Scenes(8, size=64),
            {"synthetic": Scenes(4, size=64, seed=1)},
            "synthetic",
            ["bg", "red"],
            task="segmentation",
        )
    else:
        data = DataBundle(
            RandomImages(16, size=64), {"synthetic": RandomImages(6, size=64, seed=1)}, "synthetic", ["a", "b", "c"]
        )
    cfg = tiny_config(
        f"method.name={method}",
        "method.csg_queue=64",
        "train.steps=2",
        "train.eval_every=2",
        "data.batch_size=4",
        "optim.lr=0.01",
        "model.channels_last=false",
    )
    torch.manual_seed(0)
    model = build_model(mcfg, data.num_classes, task=task)
    head0 = [p.detach().clone() for p in model.task_parameters()]
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    logs = Logs()
    Trainer(cfg, None, data=data, model=model, quiet=True, check_files=False, callbacks=[logs]).fit()
    assert len(logs.rows) == 2 and all(math.isfinite(r["loss"]) for r in logs.rows)
    assert any(not torch.equal(a, b) for a, b in zip(head0, model.task_parameters()))
    assert any(not torch.equal(p, lora0[n]) for n, p in model.named_parameters() if n in lora0)
    if method == "asg":
        assert logs.rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # student == teacher before the first update
