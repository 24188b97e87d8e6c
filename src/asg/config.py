"""Typed run configuration: dataclasses loaded from YAML recipes and ``key=value`` overrides (recipe files and
overrides: ``asg.recipe_files``; the checks a loaded config passes: ``asg.config_checks``).

A recipe file holds any subset of the sections below; omitted fields keep their defaults.
Unknown keys are errors (with the list of valid keys), never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asg.config_checks import validate
from asg.errors import ConfigError
from asg.recipe_files import apply_overrides, read_recipe, upgrade_old_keys

__all__ = [
    "AdaptConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "L2OConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "TeacherConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]


@dataclass
class DataConfig:
    """Which data to train and evaluate on (``name`` is a key of ``asg.data.DATASETS``)."""

    name: str = "digits"
    root: str | None = None  # dataset root; for ``digits`` the render cache (default ~/.cache/asg)
    image_size: int = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    num_workers: int = 0
    source_val_fraction: float = 0.1  # synthetic images held out for source-val model selection
    split_seed: int = 0  # seed of the source-val split (kept apart from the training seed)
    # digits benchmark
    num_train: int = 6000  # synthetic digits rendered (before the source-val split)
    # per-evaluation cap on each evaluation set (class-balanced subset); None = whole set
    eval_max_per_set: int | None = None
    # generic list files / image folders (``listfile`` and ``imagefolder`` datasets)
    train_list: str | None = None
    eval_lists: dict[str, str] = field(default_factory=dict)
    num_classes: int | None = None
    class_names: list[str] | None = None
    # an image that is missing, empty or cannot be decoded: "error" stops with its path; "skip" leaves it out
    # and lists it in the run folder's skipped_images.txt
    on_bad_image: str = "error"
    # segmentation datasets (gta5, synthia, cityscapes, seglist, digit_scenes); see docs/segmentation.md
    split: str = "train"  # gta5: "train" (official 12,403-image split from split.mat) | "all" (24,966)
    class_set: int = 19  # 19 Cityscapes classes; synthia also 16 or 13 (its standard protocols)
    eval_roots: dict[str, str] = field(default_factory=dict)  # real val sets {cityscapes|bdd100k|mapillary: ROOT}
    train_resize: list[int] | None = None  # [h, w] every training pair is resized to first; None = native size
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # random rescale factor, uniform
    crop_size: list[int] | None = None  # [h, w] random training crop (label padded with 255); None = no crop
    flip: bool = True  # random horizontal flip of training pairs (segmentation)
    eval_resize: list[int] | None = None  # [h, w] inference input; predictions upsampled to the label's size
    # embedded benchmarks' real sets: "all" = every image is a test image; "halves" = each real set is split
    # (seeded, class-balanced, disjoint) into an unlabelled adaptation half (target set "<name>_adapt") and a
    # test half (evaluation set "<name>_test"), for domain adaptation (asg adapt)
    real_split: str = "all"
    real_split_seed: int = 0


@dataclass
class ModelConfig:
    """Backbone (a key of ``asg.models.BACKBONES``) and where its ImageNet weights come from."""

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"  # "imagenet" (packaged or cached), "none", or a .pth/.safetensors path
    hidden_dim: int = 512  # task head: feat -> hidden -> ReLU -> classes, as in ASG; 0: one linear layer
    channels_last: bool = True
    # segmentation: head on the backbone ("fcn8s" | "deeplabv3" | "lraspp" | "fpn") and the backbone's output stride
    segmenter: str = "lraspp"
    output_stride: int | None = None  # None: 32 for classification, the segmenter's default for segmentation
    fpn_channels: int = 64  # segmenter "fpn": channels of its pyramid
    fpn_finest_stride: int = 4  # segmenter "fpn": its finest level (4, or 2 for thin structures in small images)
    # start from a whole trained model (backbone and heads): a run folder or a .safetensors file; training
    # still starts at step 0 with a fresh optimizer (unlike --resume); the teacher stays the ImageNet network
    init_from: str | None = None
    init_checkpoint: str = "last"  # which weights of an init_from run folder: "last" | "source-val" | "oracle"
    # guidance head ASG's KL reads (asg.models.guidance): "auto" (the backbone's ImageNet head; DINOv2: its
    # linear head if guidance_file is set; CLIP: zero-shot) | "imagenet" | "dinov2_linear" | "clip_zeroshot" | "none"
    guidance_head: str = "auto"
    guidance_file: str | None = None  # dinov2_linear: dinov2_vit?14_linear_head.pth
    clip_model: str | None = None  # clip_zeroshot: open_clip config name (default: the backbone's) or a .json file
    clip_templates: str = "openai"  # clip_zeroshot prompts: "openai" (80) | "simple" (7)
    clip_cache_dir: str | None = None  # zero-shot text embeddings cache; default $XDG_CACHE_HOME/asg/clip_zeroshot
    input_size: int | None = None  # ViTs: position-embedding grid size (default the backbone's native size)
    vit_blocks: list[int] | None = None  # ViT segmentation: blocks whose tokens feed the head (default quarters)
    timm_kwargs: dict[str, int] = field(default_factory=dict)  # extra timm.create_model arguments (tiny test models)
    lora_rank: int = 0  # > 0: LoRA adapters (peft) on lora_targets of lora_blocks, the rest of the backbone frozen
    lora_alpha: int = 16  # LoRA scaling alpha / rank
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"])
    lora_blocks: list[int] | None = None  # None: every block
    freeze_backbone: bool = False  # train only the new head (and adapters); the guidance head is always frozen


@dataclass
class MethodConfig:
    """Training objective (a key of ``asg.methods.METHODS``) and its weights."""

    name: str = "asg"
    kl_weight: float = 0.1  # lambda of ASG proxy guidance
    l2sp_alpha: float = 0.01  # alpha of L2-SP
    kl_cap: float | None = None  # cap lambda*KL at this value (the GTA5 L2O script uses 9); None = off
    probe_steps: int = 50  # LP-FT: steps that train the new head alone (backbone frozen) before full fine-tuning
    feature_weight: float = 1.0  # feature guidance: beta of CE + beta * d(student features, teacher features)
    feature_distance: str = "cosine"  # feature guidance: "cosine" (1 - cos, scale-free, in [0, 2]) | "mse"
    # CSG (asg.methods.csg): CE + csg_weight x sum over csg_stages of InfoNCE against the frozen teacher's keys
    csg_weight: float = 0.1  # the paper's VisDA-17 weight (GTA5: 75)
    csg_stages: list[int] = field(default_factory=lambda: [-2, -1])  # stage maps (Python indices; ResNet [3, 4])
    csg_dim: int = 128  # projection size
    csg_queue: int = 65536  # keys per stage in the queue of negatives
    csg_temperature: float = 0.07
    csg_momentum: float = 0.999  # key MLP = EMA of the query MLP
    csg_chunks: int = 8  # segmentation: each map cut into chunks x chunks patches, each an instance
    csg_apool: bool = True  # attentional pooling (false: average pooling)
    csg_train_mlp: bool = True  # false: the query MLP stays at its initialisation (the release's segmentation)
    # views: "auto" (classification randaugment, segmentation jitter) | "randaugment" (both views) | "jitter" (key
    # only, colour) | "none" (the batch itself for both)
    csg_augment: str = "auto"
    csg_randaugment: list[int] = field(default_factory=lambda: [1, 6])  # RandAugment N (operations), M (magnitude)
    csg_jitter: float = 0.4  # colour-jitter strength of the key view ("jitter")


@dataclass
class TeacherConfig:
    """The frozen ImageNet teacher of proxy guidance: where its outputs come from and how it runs."""

    cache: bool = False  # cache the teacher's outputs per training sample (only if no augmentation)
    # where: "memory" (filled as batches come, kept in the checkpoint) or on disk, computed once for the whole
    # training set and shared by every run and seed with the same images, transform and teacher:
    # "fp32" (exact), "fp16", "topk" (top-k log-probs + a uniform remainder; the KL error is measured)
    cache_storage: str = "memory"
    cache_topk: int = 32
    cache_dir: str | None = None  # default $XDG_CACHE_HOME/asg/teacher
    # what names a disk cache's training images: "content" (their bytes), "stat" (path, size, mtime: an image
    # replaced with its mtime kept is missed) or "auto" (content up to 2 GiB of image files, else stat)
    cache_key: str = "auto"
    # the frozen teacher runs with its BatchNorms folded into the convolutions (asg.models.fusion): the same
    # logits up to float rounding, a forward about 1.6x cheaper on the CPU
    fuse_bn: bool = True


@dataclass
class OptimConfig:
    """SGD with layer-group learning rates and the ASG schedule (docs/recipes.md)."""

    lr: float = 1e-4  # learning rate of the new head; backbone groups get lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "sgd" (ASG's optimizer, all official recipes) | "adamw" (betas (momentum, 0.999), decoupled weight decay)
    optimizer: str = "sgd"
    sgd: str = "torch"  # "torch" | "lr_in_momentum" (the official VisDA variant)
    schedule: str = "warmup_poly_floor"  # | "warmup_poly" | "constant"
    warmup_steps: int = 100
    poly_power: float = 0.9
    floor_at: float = 0.8  # the poly factor stops decaying at this fraction of training
    max_grad_norm: float | None = None  # gradient-norm guard; None = off (as the official code)
    bn_mode: str = "frozen"  # "frozen" (model.eval() while training, as official) | "train"


@dataclass
class TrainConfig:
    """Length, seeds, evaluation and checkpoint cadence, device."""

    steps: int = 600
    seed: int = 0
    eval_every: int = 100
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    # "fp32" | "bf16" | "fp16": autocast of the forward passes (fp16 with loss scaling); evaluation stays fp32.
    # (``train.amp: true`` of older recipes and run folders reads as "bf16")
    precision: str = "fp32"
    compile: bool = False  # torch.compile the student (and a live teacher) in place
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "eager" only traces, for debugging)
    progress: bool = True
    # stop when a step's loss exceeds this factor times the loss scale at the start (the smallest of the first
    # 10 losses, at least 1); catches finite explosions that a NaN check misses. None = off
    loss_explosion_factor: float | None = 1000.0


@dataclass
class EvalConfig:
    """Evaluation protocol; every result line says which of these was used."""

    tta_flip: bool = False  # horizontal-flip TTA with sigmoid averaging (official VisDA eval)
    oracle_set: str | None = None  # real set used by "oracle" selection (default: first real set)
    full_eval_selected: bool = True  # re-evaluate source-val/oracle checkpoints on the full sets at the end
    retention: bool = True  # ImageNet retention on the real photos shipped with scikit-image/-learn
    # evaluate (and pseudo-label) an inference copy with BatchNorm folded into the convolutions: the same
    # predictions up to float rounding, ~1.6x faster on CPU (asg.models.fusion)
    fuse_bn: bool = True
    # segmentation inference: None = whole image at once; [h, w] = sliding windows of that size
    sliding_window: list[int] | None = None
    sliding_stride: list[int] | None = None  # [h, w] window step (default: 2/3 of the window)


@dataclass
class L2OConfig:
    """The learned layer-wise learning-rate controller (docs/l2o.md)."""

    # the learning-rate controller: a key of asg.l2o.CONTROLLERS ("fixed" = the recipe's rates all run)
    controller: str = "fixed"
    policy: str | None = None  # policy weights for l2o.controller=l2o
    window_rule: str = "intended"  # "intended" | "released"
    min_steps: int = 10
    steps_per_epoch: int | None = None  # epoch length for the released window rule (default: data)
    carry_hidden: bool = True  # carry LSTM state between decisions (paper); False = released code
    sample_actions: bool = True  # sample (as released) or take the most likely scale
    # meta-training
    episodes: int = 20
    episode_steps: int = 300
    num_steps: int = 5  # decisions per REINFORCE update
    gamma: float = 0.0
    lr_meta: float = 7e-4
    baseline: bool = False  # moving-average reward baseline
    baseline_momentum: float = 0.9
    normalize_advantage: bool = False  # divide advantages by a moving std of the returns (not in the release)
    entropy_coef: float = 0.0
    reward: str = "neg_train_loss"  # key of asg.l2o.REWARDS
    seed: int = 0


@dataclass
class AdaptConfig:
    """Self-training on unlabelled target images (``asg adapt``): class-balanced self-training (CBST, Zou et al.
    2018), optionally with CRST's model regulariser (Zou et al. 2019). Target labels are never read."""

    # the target images: a target set of the benchmark (digits with data.real_split=halves: mnist5k_adapt,
    # uci_digits_adapt; digit_scenes: mnist_photos_adapt; visda17: visda17_val) or a list file / image folder
    target: str | None = None
    rounds: int = 3
    steps_per_round: int = 200
    init_portion: float = 0.2  # fraction p of each class's most confident predictions kept in round 1 (CBST)
    portion_step: float = 0.05  # p grows by this each round
    max_portion: float = 0.5  # ... up to this
    thresholds: str = "class_balanced"  # "class_balanced" (one threshold per class) | "global" (one for all)
    target_batch_size: int | None = None  # pseudo-labelled target images per step (default data.batch_size)
    target_weight: float = 1.0  # weight of the target loss against the source loss
    regularizer: str = "none"  # CRST model regulariser on the target predictions: "none" | "mrkld" | "mrent"
    reg_weight: float = 0.1
    ema_decay: float | None = None  # pseudo-label with an exponential moving average of the weights; None = off
    from_unfinished: bool = False  # accept model.init_from from a run that never finished (no 'done' file)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    l2o: L2OConfig = field(default_factory=L2OConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    name: str = ""  # run name (defaults to the recipe file's stem)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` against the annotation ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is Any or (isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from nested dicts (as read from YAML), checking keys and types."""
    return _from_dict(Config, upgrade_old_keys(data))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = read_recipe(path) if path is not None else {}
    cfg = config_from_dict(apply_overrides(data, list(overrides or [])))
    validate(cfg)
    return cfg
