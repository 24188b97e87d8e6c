"""The embedded benchmarks of ``asg demo``: their methods, sets, lengths, grids and the grid's choices."""

from __future__ import annotations

from dataclasses import dataclass

from asg.tasks import CLASSIFICATION, SEGMENTATION, Task


@dataclass(frozen=True)
class Benchmark:
    """One embedded benchmark of the demo: its methods (label -> recipe), sets, task (its headline metric) and
    lengths."""

    name: str
    title: str
    task: Task
    methods: dict[str, str]
    default_methods: tuple[str, ...]  # run by `asg demo` (all of ``methods`` with --full)
    default_seeds: int  # seeds of `asg demo` and `asg demo --full` (1 with --quick)
    sets: tuple[str, ...]  # source-val first, then the real sets
    default: tuple[str, ...]  # overrides of `asg demo`
    quick: tuple[str, ...]
    full: tuple[str, ...]
    # tuning (``asg demo --tune``, ``--full``): one Optuna study per trained label over its method's search space
    # (``asg.methods.space``: optim.lr, optim.backbone_lr_mult, the method's own knob), every study with the same
    # budget, sampler and ASHA pruner; ``lr_range`` (low, high, grid values) narrows optim.lr for this benchmark;
    # labels in ``grid_from`` take another label's choice instead of a study of their own
    lr_range: tuple[float, float, tuple[float, ...]] = (1e-3, 0.3, (0.01, 0.03, 0.1))
    tune_trials: int = 6
    tune_sampler: str = "random"
    grid_from: tuple[tuple[str, str], ...] = (("wise-ft", "erm"),)
    chosen: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> overrides used when not tuning
    # WiSE-FT: the backbones of this label's runs interpolated towards the pretrained one, alpha chosen on source-val
    wise_ft_from: str | None = "erm"
    wise_ft_alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # segmentation: class groups reported beside the mIoU (name, class indices)
    class_groups: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # adaptation of every trained model to an unlabelled target set (None: no adaptation stage)
    adapt_target: str | None = None
    adapt_methods: tuple[str, ...] | None = None  # the starting models adapted (None: every trained label)
    adapt: tuple[str, ...] = ()
    adapt_quick: tuple[str, ...] = ()
    adapt_full: tuple[str, ...] = ()

    @property
    def metric(self) -> str:
        """The key of the headline metric in result files."""
        return self.task.primary_metric

    @property
    def metric_label(self) -> str:
        return self.task.description

    @property
    def per_class_key(self) -> str:
        return self.task.per_class


DIGITS = Benchmark(
    name="digits",
    title="synthetic -> real digits (classification)",
    task=CLASSIFICATION,
    methods={
        "erm": "digits_erm",
        "asg": "digits_asg",
        "lp-ft": "digits_lpft",
        "wise-ft": "digits_erm",
        "feature": "digits_feature",
        "l2sp": "digits_l2sp",
        "asg+l2o": "digits_asg_l2o",
        "asg+random": "digits_asg_random",
        "csg": "digits_csg",
    },
    # --full: all; feature guidance (and l2sp, asg+random) only there or with --methods, to keep `make demo` within
    # 15 minutes (docs/findings.md)
    default_methods=("erm", "asg", "lp-ft", "wise-ft", "asg+l2o"),
    default_seeds=3,
    sets=("synthetic", "mnist5k_test", "uci_digits_test"),
    default=(
        "data.real_split=halves",
        "train.steps=100",
        "train.eval_every=50",
        "data.eval_max_per_set=300",
        "eval.full_eval_selected=false",
    ),
    quick=(
        "data.real_split=halves",
        "train.steps=100",
        "train.eval_every=25",
        "data.num_train=2000",
        "data.eval_max_per_set=200",
        "eval.full_eval_selected=false",
    ),
    full=(
        "data.real_split=halves",
        "train.steps=1200",
        "train.eval_every=150",
        "data.eval_max_per_set=300",
        "eval.full_eval_selected=true",
    ),
    lr_range=(0.003, 0.3, (0.01, 0.03, 0.1)),
    # erm, asg, lp-ft, asg+l2o (and wise-ft, ERM's): chosen on source-val, backbone rate included, by one Optuna
    # study per method at the default length, 6 trials each: `asg demo --benchmarks digits --tune --seeds 1
    # --no-adapt --methods erm,asg,lp-ft,asg+l2o,wise-ft` (docs/demo/digits_tune/report.md). asg+random takes
    # asg+l2o's choice; feature and l2sp keep the previous grid's (backbone 0.1x, not tuned): both run only in
    # --full, which tunes every method at its own length
    chosen=(
        ("erm", ("optim.lr=0.03790679441214498", "optim.backbone_lr_mult=0.3593722364104093")),
        (
            "asg",
            (
                "optim.lr=0.03790679441214498",
                "optim.backbone_lr_mult=0.3593722364104093",
                "method.kl_weight=0.014575348768947389",
            ),
        ),
        (
            "lp-ft",
            ("optim.lr=0.03756196144499839", "optim.backbone_lr_mult=0.3683561622766077", "method.probe_steps=26"),
        ),
        (
            "asg+l2o",
            (
                "optim.lr=0.03756196144499839",
                "optim.backbone_lr_mult=0.3683561622766077",
                "method.kl_weight=0.25766385746135895",
            ),
        ),
        ("wise-ft", ("optim.lr=0.03790679441214498", "optim.backbone_lr_mult=0.3593722364104093")),
        (
            "asg+random",
            (
                "optim.lr=0.03756196144499839",
                "optim.backbone_lr_mult=0.3683561622766077",
                "method.kl_weight=0.25766385746135895",
            ),
        ),
        ("feature", ("optim.lr=0.1", "method.feature_weight=1.0")),
        ("l2sp", ("optim.lr=0.1", "method.l2sp_alpha=0.1")),
    ),
    adapt_target="mnist5k_adapt",
    adapt_methods=("erm", "asg"),  # is a proxy-guided model a better start than plain fine-tuning?
    adapt=(
        "method.name=erm",  # the same self-training (CBST: cross-entropy on both parts) for every starting model
        "l2o.controller=fixed",
        "optim.backbone_lr_mult=0.1",
        "optim.warmup_steps=0",
        "adapt.rounds=1",  # one round, not two, to keep `make demo` within 15 minutes (docs/findings.md)
        "adapt.steps_per_round=25",
        "train.eval_every=25",
        "data.eval_max_per_set=null",  # the round's last evaluation is on the full test halves, once
        "eval.retention=false",
    ),
    adapt_quick=("adapt.rounds=1", "adapt.steps_per_round=20", "train.eval_every=20"),
    adapt_full=("adapt.rounds=2", "adapt.steps_per_round=25", "train.eval_every=25"),
)
# the rates every tuned scenes study chose at the default length (lr, backbone multiplier; see SCENES.chosen)
_SCENES_POINT = ("optim.lr=0.037861878865426045", "optim.backbone_lr_mult=0.3683561622766077")
SCENES = Benchmark(
    name="scenes",
    title="synthetic -> real digit scenes (segmentation)",
    task=SEGMENTATION,
    methods={
        "erm": "digit_scenes_erm",
        "asg": "digit_scenes_asg",
        "lp-ft": "digit_scenes_lpft",
        "wise-ft": "digit_scenes_erm",
        "feature": "digit_scenes_feature",
        "asg+l2o": "digit_scenes_asg_l2o",
        "csg": "digit_scenes_csg",
    },
    # feature guidance (and asg+l2o) only with --full or --methods: a fourth trained method took `make demo` past
    # 15 minutes (docs/findings.md)
    default_methods=("erm", "asg", "lp-ft", "wise-ft"),
    default_seeds=3,
    sets=("synthetic", "mnist_photos"),
    default=("train.steps=400", "train.eval_every=100", "data.eval_max_per_set=200", "eval.full_eval_selected=false"),
    quick=(
        "train.steps=200",
        "train.eval_every=100",
        "data.num_train=800",
        "data.eval_max_per_set=100",
        "eval.full_eval_selected=false",
    ),
    full=("train.steps=1200", "train.eval_every=150", "data.eval_max_per_set=200", "eval.full_eval_selected=true"),
    lr_range=(0.005, 0.2, (0.02, 0.05, 0.1)),
    # chosen on source-val, backbone rate included, by one Optuna study per method at the default length, 6 trials
    # each (random sampler, ASHA): erm and asg by `asg demo --benchmarks digits,scenes --methods erm,asg,csg --tune`
    # (docs/demo/csg_tune), lp-ft and feature by `asg demo --benchmarks scenes --methods lp-ft,feature --tune --seeds
    # 1` (docs/demo/scenes_tune); wise-ft takes ERM's
    chosen=(
        ("erm", _SCENES_POINT),
        ("asg", (*_SCENES_POINT, "method.kl_weight=0.25766385746135895")),
        ("lp-ft", (*_SCENES_POINT, "method.probe_steps=60")),
        ("feature", (*_SCENES_POINT, "method.feature_weight=2.57663857461359")),
        ("wise-ft", _SCENES_POINT),
    ),
    class_groups=(("digit", tuple(range(1, 11))), ("background", (0,))),
)
WISE_FT = "wise-ft"  # a demo label without training of its own (see Benchmark.wise_ft_from)
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (DIGITS, SCENES)}
