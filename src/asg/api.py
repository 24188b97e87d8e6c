"""The Python API: the same operations as the CLI, returning Python objects."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asg.config import Config
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.manifest import EXPORTS
from asg.errors import AsgError, WeightsError

if TYPE_CHECKING:
    from asg.engine.callbacks import Callback


def default_run_dir(cfg: Config, default_name: str = "run") -> Path:
    """``runs/<name>``: the folder a recipe's run goes to without ``--out``."""
    return Path("runs") / (cfg.name or default_name)


def run_config(
    config: str | Path | Config | None,
    overrides: list[str] | None,
    out: str | Path | None,
    resume: bool,
    folder_kind: str = "a run folder",
    what: str = "training",
    default_name: str = "run",
) -> tuple[Config, Path]:
    """(config, output folder) of a new run (the recipe + overrides) or, with ``resume``, of the folder's saved
    config + overrides; ``config`` then only names the default folder (it may be None when ``out`` is given).
    Without ``out`` the folder is ``runs/<name>`` (``runs/<default_name>`` for a recipe without a name). A loaded
    config's registry names are checked (``asg.registries``)."""
    from asg.registries import check_registry_names, load_checked_config

    if resume:
        if out is None:
            if config is None:
                raise AsgError("resume needs the run folder (--out) or the recipe that named it (--config)")
            cfg = config if isinstance(config, Config) else load_checked_config(config, overrides)
            out = default_run_dir(cfg, default_name)
        rd = RunDir(out)
        missing = f"cannot resume: {rd.config_path} does not exist (is {out} {folder_kind}?)"
        return check_registry_names(rd.read_config(overrides, missing=missing)), rd.path
    if config is None:
        raise AsgError(f"{what} needs a recipe (--config)")
    cfg = config if isinstance(config, Config) else load_checked_config(config, overrides)
    return cfg, Path(out) if out is not None else default_run_dir(cfg, default_name)


def train(
    config: str | Path | Config | None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    callbacks: list[Callback] | None = None,
):
    """Train a recipe (path or Config) into ``out`` (default ``runs/<name>``); returns a ``TrainResult``.

    With ``resume=True`` the run folder's saved config plus ``overrides`` is used and training continues
    exactly; ``config`` then only names the default folder (it may be None when ``out`` is given). Changed
    optimizer, schedule and length settings are applied from the restored step on; others are refused.
    ``callbacks``: engine callbacks (``asg.engine.callbacks.Callback``) added to the run.
    """
    from asg.engine.trainer import Trainer

    cfg, out = run_config(config, overrides, out, resume, "a run folder", "training")
    from asg.l2o import build_controller

    return Trainer(cfg, out, resume=resume, quiet=quiet, controller_factory=build_controller, callbacks=callbacks).fit()


def adapt(
    config: str | Path | Config | None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    callbacks: list[Callback] | None = None,
):
    """Adapt a trained model (``model.init_from``) to unlabelled target images (``adapt.target``) by
    class-balanced self-training rounds; returns an ``asg.adapt.AdaptResult``. ``resume`` continues a stopped
    adaptation in ``out`` with its saved config (plus ``overrides``) from the round and step where it stopped.
    ``callbacks``: engine callbacks added to every round's training run."""
    from asg.adapt import adapt as run_adaptation

    cfg, out = run_config(config, overrides, out, resume, "an `asg adapt` folder", "adaptation")
    return run_adaptation(cfg, out, resume=resume, quiet=quiet, callbacks=callbacks)


@dataclass
class LoadedRun:
    """A run folder's config, data and model with one checkpoint's weights loaded, ready to evaluate."""

    run_dir: Path
    cfg: Config
    checkpoint: str
    path: Path  # the checkpoint file
    device: Any  # torch.device
    data: Any  # asg.data.DataBundle
    model: Any  # ASGClassifier | ASGSegmenter, on ``device``
    from_folder: bool = True  # False: a weight file with its recipe


def load_run(
    run_dir: str | Path, checkpoint: str = "last", overrides: list[str] | None = None, config: str | Path | None = None
) -> LoadedRun:
    """Load a run folder's saved config (plus ``overrides``), its data and the model with ``checkpoint``'s weights.

    ``checkpoint`` is ``last``, ``source-val``, ``oracle`` or a path to a ``.safetensors`` file. ``run_dir`` may
    instead be a weight file from elsewhere (an official ASG ``.pth.tar``, a ``.safetensors`` file) with the
    recipe ``config`` that builds its model and data; it is read as ``model.init_from`` reads it.
    """
    from asg.data import build_data
    from asg.engine.rundir.weights import load_weights
    from asg.models import build_model
    from asg.models.base_weights import check_run_base_weights
    from asg.registries import check_registry_names
    from asg.utils import resolve_device

    if Path(run_dir).is_file():
        return _load_weight_file(Path(run_dir), config, overrides)
    rd = RunDir(run_dir)
    run_dir = rd.path
    missing = f"{run_dir} is not a run folder: {rd.config_path} does not exist (pass the --out folder of `asg train`)"
    cfg = check_registry_names(rd.read_config(overrides, missing=missing))
    if checkpoint not in EXPORTS and not checkpoint.endswith(".safetensors"):
        raise AsgError(f"checkpoint {checkpoint!r}: use {', '.join(EXPORTS)} or the path of a .safetensors file")
    check_run_base_weights(run_dir, cfg.model, "evaluate")  # LoRA: the backbone is rebuilt from its file
    # a named checkpoint is the file the manifest commits (checkpoint.json), not whatever a link points at; read
    # now, as a training running in the folder may delete it once it commits the next checkpoint
    if checkpoint in EXPORTS:
        path, blob = rd.read_checkpoint(checkpoint)
    else:
        path = Path(checkpoint)
        if not path.is_file():
            found = ", ".join(sorted(f.name for f in run_dir.glob("*.safetensors"))) or "none"
            raise WeightsError(f"checkpoint {path} does not exist (checkpoints in {run_dir}: {found})")
        blob = path.read_bytes()
    device = resolve_device(cfg.train.device)  # before the (slow) data, so a missing GPU fails at once
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.num_classes, task=data.task)
    load_weights(model, path, blob)
    model.to(device)
    return LoadedRun(run_dir, cfg, checkpoint, path, device, data, model)


def _load_weight_file(path: Path, config: str | Path | None, overrides: list[str] | None) -> LoadedRun:
    from asg.data import build_data
    from asg.engine.rundir.init_from import load_init_weights
    from asg.models import build_model
    from asg.registries import load_checked_config
    from asg.utils import resolve_device

    if config is None:
        raise AsgError(
            f"{path} is a weight file, not a run folder: pass --config RECIPE (the recipe that builds its "
            "model and data, e.g. gta5_cityscapes_fcn8s_vgg16_asg)"
        )
    cfg = load_checked_config(config, [*(overrides or []), f"model.init_from={path}"])
    device = resolve_device(cfg.train.device)
    data = build_data(cfg.data)
    model = build_model(cfg.model, data.num_classes, task=data.task)
    load_init_weights(model, cfg, data.num_classes, data.task)  # says what it found in the file
    return LoadedRun(path.parent, cfg, path.name, path, device, data, model.to(device), from_folder=False)


def _evaluate_loaded(
    run: LoadedRun, names: list[str] | None, tta: bool, show_progress: bool, label: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """``{set: metrics, confusion, n, role}`` of ``run.model`` as it is now on the evaluation sets ``names``
    (None: all, full sets); ``label`` is added to every set's entry."""
    from asg.engine.evaluation.evaluate import evaluate_sets

    data = run.data
    chosen = data.eval_sets if names is None else {n: data.eval_sets[n] for n in names}
    results = evaluate_sets(
        run.model,
        chosen,
        data.num_classes,
        run.cfg,
        run.device,
        tta_flip=tta,
        show_progress=show_progress,
        task=data.task,
        class_groups=data.class_groups,
    )
    return {
        name: {
            **r.to_dict(),
            "confusion": r.confusion.tolist(),
            "n": int(r.confusion.sum()),
            "role": "source-val" if name == data.source_val_name else "real",
            **(label or {}),
        }
        for name, r in results.items()
    }


def _check_set_names(run: LoadedRun, sets: list[str] | tuple[str, ...] | None) -> list[str] | None:
    if sets is None:
        return None
    unknown = [n for n in sets if n not in run.data.eval_sets]
    if unknown:
        raise AsgError(f"evaluation set {unknown[0]!r} is not one of this run's: {', '.join(run.data.eval_sets)}")
    return list(sets)


def _pretrained_backbone_state(run: LoadedRun) -> dict[str, Any]:
    """The ImageNet backbone the run started from (its config's weights, before any ``model.init_from``)."""
    from asg.models import build_model
    from asg.models.base_weights import check_base_weights, read_record

    if run.cfg.model.weights == "none":
        raise AsgError("WiSE-FT interpolates towards the pretrained backbone, but this run's model.weights is none")
    if run.from_folder:  # the run's recorded file: the same bytes, or a refusal
        check_base_weights(read_record(run.run_dir), run.cfg.model, "wise-ft")
    pretrained = build_model(run.cfg.model, run.data.num_classes, task=run.data.task)
    return {k: v.to(run.device) for k, v in pretrained.backbone.state_dict().items()}


def evaluate(
    run_dir: str | Path,
    checkpoint: str = "last",
    tta_flip: bool | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    wise_ft: float | None = None,
    config: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's checkpoint on every evaluation set (full sets, no subsetting); or a weight file
    from elsewhere (an official ASG ``.pth.tar``) with the recipe ``config`` that builds its model and data.

    ``checkpoint`` is ``last``, ``source-val``, ``oracle`` or a path to a ``.safetensors`` file. The result
    names the checkpoint, the TTA and each set, with accuracy, mean per-class accuracy and confusion matrices.
    ``wise_ft``: evaluate the WiSE-FT interpolation at this alpha in [0, 1] instead (backbone = (1 - alpha) x
    ImageNet + alpha x fine-tuned, fine-tuned task head; ``asg.methods.wise_ft``); the result and each set's
    entry then carry ``wise_ft_alpha``.
    """
    from asg.engine.rundir.summary import EvalReport
    from asg.tasks import task_of

    alpha = None
    if wise_ft is not None:
        from asg.methods.wise_ft import check_alpha, interpolate_backbone

        alpha = check_alpha(wise_ft)  # before the (slow) data
    run = load_run(run_dir, checkpoint, overrides, config)
    cfg, data = run.cfg, run.data
    tta = cfg.eval.tta_flip if tta_flip is None else tta_flip
    label: dict[str, Any] = {}
    if alpha is not None:
        interpolate_backbone(run.model, _pretrained_backbone_state(run), alpha)
        label = {"wise_ft_alpha": alpha}
    sets = _evaluate_loaded(run, None, tta, show_progress, label)
    if checkpoint == "oracle":
        note = "oracle: checkpoint chosen with real test labels; an upper bound, not a valid protocol"
    else:
        note = ""
    result = {
        "run": str(run.run_dir),
        "checkpoint": run.checkpoint,
        "checkpoint_file": str(run.path),
        "tta_flip": tta,
        **label,
        "task": data.task,
        "sliding_window": cfg.eval.sliding_window,
        "eval_resize": cfg.data.eval_resize,
        "class_names": data.class_names,
        "sets": sets,
        "note": note,
    }
    average = EvalReport.of(sets, data.real_set_names, task_of(data).primary_metric).real_average
    if average is not None:
        result["real_average"] = {**average, **label}
    return result


def evaluate_wise_ft(
    run_dir: str | Path,
    alphas: tuple[float, ...] | list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    checkpoint: str = "last",
    sets: list[str] | tuple[str, ...] | None = None,
    *,
    tta_flip: bool | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = False,
) -> dict[float, dict[str, dict[str, Any]]]:
    """WiSE-FT of a run's checkpoint at each alpha: ``{alpha: {set name: metrics}}``.

    The run, its data and the model are loaded once; for each alpha (in the given order) the backbone is set to
    ``(1 - alpha) x ImageNet + alpha x fine-tuned`` (``asg.methods.wise_ft.interpolate_backbone``, task head
    fine-tuned) and evaluated on the evaluation sets ``sets`` (None: all of the run's, e.g. ``["synthetic"]``
    for the source-val split only; full sets). Each set's metrics are those of ``evaluate`` (``acc``,
    ``mean_class_acc`` or ``miou``..., ``confusion``, ``n``, ``role``) plus ``wise_ft_alpha``. Choose alpha on
    source-val with ``asg.methods.wise_ft.choose_alpha``.
    """
    from asg.methods.wise_ft import check_alpha, interpolate_backbone

    checked = [check_alpha(a) for a in alphas]
    if not checked:
        raise AsgError("evaluate_wise_ft needs at least one alpha")
    run = load_run(run_dir, checkpoint, overrides)
    names = _check_set_names(run, sets)
    tta = run.cfg.eval.tta_flip if tta_flip is None else tta_flip
    pretrained = _pretrained_backbone_state(run)
    finetuned = {k: v.detach().clone() for k, v in run.model.backbone.state_dict().items()}
    out: dict[float, dict[str, dict[str, Any]]] = {}
    for alpha in checked:
        interpolate_backbone(run.model, pretrained, alpha, finetuned)
        out[alpha] = _evaluate_loaded(run, names, tta, show_progress, {"wise_ft_alpha": alpha})
    return out


def load(
    run: str | Path,
    checkpoint: str = "last",
    *,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    wise_ft: float | None = None,
    device: str = "auto",
    **options: Any,
):
    """A ``asg.predict.Predictor`` of a run folder's ``checkpoint`` (``last``, ``source-val``, ``oracle`` or a
    ``.safetensors`` path), a weight file with its recipe ``config``, or an exported ``.onnx`` file; its
    ``.predict(images)`` takes PIL images, numpy arrays, tensors or paths. Never reads the training data.
    ``options``: ``batch_size``, ``tta_flip``, ``sliding_window``, ``scales``, ``precision``, ``top_k``,
    ``class_names`` (for a run of an earlier asg that does not record them)."""
    from asg.predict.run import load_predictor

    predictor, _ = load_predictor(
        run, checkpoint, config=config, overrides=overrides, wise_ft=wise_ft, device=device, **options
    )
    return predictor


def export(run: str | Path, out: str | Path | None = None, checkpoint: str = "last", **options: Any) -> Path:
    """Export a run's task model to ONNX (``asg export``); returns the ``.onnx`` path (sidecar: ``<path>.json``).
    ``options``: ``config``, ``overrides``, ``wise_ft``, ``tolerance``, ``opset``."""
    from asg.predict.export import export_run

    return export_run(run, out, checkpoint, **options)[0]


def save_evaluation(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``eval_<checkpoint>[_tta][_wise_ft<alpha>].json`` (atomically) and confusion-matrix plots into
    ``out_dir``.

    ``out_dir`` is created if needed; an OSError (e.g. a read-only folder) is left to the caller.
    """
    from asg.engine.evaluation.report import plot_confusion
    from asg.io import atomic_write

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = Path(result["checkpoint"]).stem.replace("-", "_") + ("_tta" if result["tta_flip"] else "")
    alpha = result.get("wise_ft_alpha")
    if alpha is not None:  # beside the plain evaluation, never over it
        tag += f"_wise_ft{alpha:g}"
    path = out_dir / f"eval_{tag}.json"
    text = json.dumps(result, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    for name, r in result["sets"].items():
        plot_confusion(
            r["confusion"],
            result["class_names"],
            out_dir / f"confusion_{tag}_{name}.png",
            title=f"{name} ({result['checkpoint']}, tta_flip={result['tta_flip']}"
            + (f", wise_ft_alpha={alpha:g})" if alpha is not None else ")"),
        )
    return path
