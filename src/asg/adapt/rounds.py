"""``asg adapt``: rounds of class-balanced self-training from a trained model (CBST/CRST, docs/adaptation.md).

Each round r (1-based) pseudo-labels the unlabelled target images with the model so far, keeping per class the
most confident portion p_r = min(init_portion + (r - 1) * portion_step, max_portion), then trains
``steps_per_round`` steps on the labelled synthetic data plus the pseudo-labelled target images
(:class:`asg.methods.SelfTraining`), starting from the previous round's weights with a fresh optimizer and
schedule (as CBST retrains per round). Target labels are never read; evaluation uses the benchmark's separate
labelled test sets. Pseudo-label precision is computed afterwards, for the report only (``asg.adapt.report``).

Folder: ``config.yaml``, ``start.json`` (the starting model's evaluation), ``round_NN/`` (pseudo-labels, then a
normal run folder: checkpoints, results.jsonl, ...), ``adaptation.json`` (rounds done), ``report.md``,
``adaptation.png``. A stopped adaptation resumes at the round and step where it stopped.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from asg.adapt.pseudo import DamagedPseudoLabels, PseudoLabels, load_pseudo_labels, pseudo_label
from asg.adapt.report import AdaptResult, add_precision, write_report
from asg.config import Config
from asg.data import DataBundle, build_data, check_bundle_files
from asg.data.targets import PseudoLabeled, target_dataset
from asg.engine.callbacks import Callback
from asg.engine.evaluation.evaluate import evaluate_sets
from asg.engine.rundir.folder import RunDir, RunKind
from asg.engine.rundir.init_from import ADAPTATION_FILE, init_record, init_weights_path, load_init_weights
from asg.engine.rundir.summary import EvalReport, Selection
from asg.engine.rundir.weights import load_weights, save_weights
from asg.engine.trainer import Trainer
from asg.errors import AsgError, ConfigError
from asg.io import sha256_file
from asg.l2o import build_controller
from asg.methods import SelfTraining, build_method
from asg.models import build_model
from asg.tasks import task_of
from asg.utils import resolve_device, seed_everything

START_FILE = "start.json"
# an adaptation resumes once its starting model was evaluated; a resume before that starts afresh
ADAPTATION = RunKind(
    noun="adaptation",
    markers=(START_FILE, ADAPTATION_FILE),
    missing=None,
    stopped_before="its starting model was evaluated",
    leftovers=(),
)
# data settings that decide the evaluation sets and their images (a run that shares them evaluated the same)
_EVAL_DATA_KEYS = (
    "name",
    "root",
    "image_size",
    "num_train",
    "source_val_fraction",
    "split_seed",
    "real_split",
    "real_split_seed",
    "eval_lists",
    "eval_roots",
    "eval_resize",
    "class_set",
    "split",
)


def portion_of_round(cfg: Config, r: int) -> float:
    """p of round ``r`` (1-based): CBST's schedule, start + (r - 1) * step, capped."""
    a = cfg.adapt
    return min(a.init_portion + (r - 1) * a.portion_step, a.max_portion)


def round_folder(r: int) -> str:
    return f"round_{r:02d}"


class Adaptation:
    """Runs ``cfg``'s adaptation into ``out_dir`` (``resume`` continues a stopped one); ``data`` reuses a bundle
    built elsewhere (otherwise it comes from ``cfg.data``); ``callbacks`` are added to every round's trainer."""

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        quiet: bool = False,
        data: DataBundle | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        if not cfg.adapt.target:
            raise ConfigError("asg adapt needs adapt.target (a target set of the benchmark, a list file or a folder)")
        if not cfg.model.init_from:
            raise ConfigError("asg adapt needs model.init_from=RUN_FOLDER|FILE (the trained model to adapt)")
        self.cfg, self.out, self.resume, self.quiet = cfg, Path(out_dir), resume, quiet
        self.callbacks = list(callbacks or [])
        self.rd = RunDir(self.out)
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        data = data if data is not None else build_data(cfg.data)
        self.data: DataBundle
        self.data, self.skipped = check_bundle_files(data, cfg.data.on_bad_image)
        self.target, self.target_name, self.target_note = target_dataset(
            cfg.adapt.target, cfg.data, self.data.task, self.data.target_sets
        )
        if len(self.target) == 0:  # type: ignore[arg-type]
            raise AsgError(f"adapt.target {cfg.adapt.target}: the target set holds no image")
        if self.target_note:
            self._say(f"asg: note: {self.target_note}")
        self.metric = task_of(self.data).primary_metric

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    # ------------------------------------------------------------------ folder state
    def _state(self) -> dict[str, Any]:
        return self.rd.read_json(ADAPTATION_FILE) or {"rounds": []}

    def _write_state(self, state: dict[str, Any]) -> None:
        """Write ``adaptation.json`` (its only writer): target, start, the rounds done (with their precision
        once the report computed it)."""
        self.rd.write_text(ADAPTATION_FILE, json.dumps(state, indent=1))

    def _where_stopped(self) -> str | None:
        """'round N at step S' of an adaptation that began in ``out`` (None when nothing began)."""
        done = len(self._state()["rounds"])
        if done == 0 and not (self.out / START_FILE).is_file():
            return None
        rd = RunDir(self.out / round_folder(done + 1))
        if rd.manifest_path.exists():
            return f"round {done + 1} at step {rd.read_manifest()['step']}"
        return f"round {done + 1} (before training)" if done < self.cfg.adapt.rounds else "its end"

    # ------------------------------------------------------------------ the rounds
    def run(self) -> AdaptResult:
        with self.rd:
            stopped = None if self.rd.is_done() else self._where_stopped()
            self.rd.begin(self.resume, ADAPTATION, where=stopped)
            if stopped is not None:
                self._say(f"asg: resuming the adaptation in {self.out} in {stopped}")
            self.rd.write_config(self.cfg)
            self.rd.write_versions()
            start = self._start()
            state = self._state()
            state.update(target=self.target_name, target_images=len(self.target), start=start)  # type: ignore[arg-type]
            for r in range(len(state["rounds"]) + 1, self.cfg.adapt.rounds + 1):
                state["rounds"].append(self._round(r))
                self._write_state(state)
            result = AdaptResult(self.out, start, state["rounds"], self.target_name, self.metric)
            truth = self.data.target_truth.get(result.target)
            if truth is not None:
                add_precision(result.rounds, self.out, truth, self.data.num_classes)
                self._write_state(state)
            write_report(self.rd, result, self.data.class_names, self.data.real_set_names, self._report_note(truth))
            self.rd.finish()
            return result

    def _report_note(self, truth: Any) -> str | None:
        """The report's note: what the target set is, and why precision is missing when it is."""
        if truth is not None:
            return self.target_note
        extra = "pseudo-label precision is not available: the benchmark has no labelled view of this target"
        return f"{self.target_note}; {extra}" if self.target_note else extra

    def _model(self, weights: str | None = None) -> Any:
        """A fresh model with ``model.init_from``'s weights (or the file ``weights``)."""
        model = build_model(self.cfg.model, self.data.num_classes, task=self.data.task)
        if weights is None:
            load_init_weights(model, self.cfg, self.data.num_classes, self.data.task)
        else:
            load_weights(model, Path(weights))
        return model.to(self.device)

    def _evaluate(self, model: Any) -> dict[str, Any]:
        show = self.cfg.train.progress and not self.quiet
        results = evaluate_sets(
            model,
            self.data.eval_sets,
            self.data.num_classes,
            self.cfg,
            self.device,
            show_progress=show,
            task=self.data.task,
            class_groups=self.data.class_groups,
        )
        metrics = {k: r.to_dict() for k, r in results.items()}
        return EvalReport.of(metrics, self.data.real_set_names, self.metric).to_dict()

    def _start(self) -> dict[str, Any]:
        """Evaluation of the starting model and what it is (``start.json``, computed once; on a resume the
        starting weights must still be the recorded ones)."""
        path = self.out / START_FILE
        m = self.cfg.model
        assert m.init_from is not None
        start = self.rd.read_json(START_FILE)
        if start is not None:
            recorded = start.get("init_weights")
            if recorded is not None:
                weights, _ = init_weights_path(m.init_from, m.init_checkpoint)
                if not weights.is_file() or sha256_file(weights) != recorded["sha256"]:
                    raise AsgError(
                        f"the starting model changed since this adaptation began: {weights} is not the file of "
                        f"step {recorded['step']} (SHA-256 {recorded['sha256'][:12]}...) recorded in {path}; "
                        "start a new adaptation (another --out)"
                    )
            return start
        record = init_record(m.init_from, m.init_checkpoint, self.cfg.adapt.from_unfinished)
        if record["finished"] is False:
            self._say(
                f"asg: warning: starting from {m.init_from}, which never finished (checkpoint of step "
                f"{record['step']}; adapt.from_unfinished)"
            )
        start = self._evaluated_by_init_run() or {"init_from": m.init_from, **self._evaluate(self._model())}
        start["init_weights"] = record
        self.rd.write_text(START_FILE, json.dumps(start, indent=1))
        return start

    def _evaluated_by_init_run(self) -> dict[str, Any] | None:
        """The starting model's full-set metrics from its own run's summary, when that run evaluated the same
        weights on the same sets with the same protocol (sharing work); None otherwise."""
        run = Path(str(self.cfg.model.init_from))
        rd = RunDir(run)
        summary = rd.read_summary() if run.is_dir() else None
        if summary is None or not rd.config_path.is_file():
            return None
        theirs = rd.read_config()
        same_data = all(getattr(theirs.data, k) == getattr(self.cfg.data, k) for k in _EVAL_DATA_KEYS)
        same_eval = (theirs.eval.tta_flip, theirs.eval.sliding_window) == (
            self.cfg.eval.tta_flip,
            self.cfg.eval.sliding_window,
        )
        if not same_data or not same_eval:
            return None
        rule = {"source-val": "source-val", "oracle": "oracle"}.get(self.cfg.model.init_checkpoint, "last")
        sel = summary.selections.get(rule)
        metrics = sel.metrics if sel is not None else {}
        full = rule == "last" or theirs.eval.full_eval_selected or theirs.data.eval_max_per_set is None
        if not full or not set(self.data.eval_sets) <= set(metrics):
            return None  # evaluated on capped subsets ("last" is always re-evaluated on the full sets), or not all
        mine = EvalReport.of({k: metrics[k] for k in self.data.eval_sets}, self.data.real_set_names, self.metric)
        return {"init_from": str(run), **mine.to_dict(), "from_summary": True}

    def _round(self, r: int) -> dict[str, Any]:
        cfg, folder = self.cfg, self.out / round_folder(r)
        prev = self.out / round_folder(r - 1) if r > 1 else None
        try:
            pseudo = load_pseudo_labels(folder)
        except DamagedPseudoLabels as exc:
            self._say(f"asg: note: round {r}: {exc} (with the same model, so the same labels)")
            pseudo = None
        if pseudo is None:
            ema_file = prev / "ema.safetensors" if prev is not None else None
            labeller = ema_file if ema_file is not None and ema_file.is_file() and cfg.adapt.ema_decay else None
            weights = str(labeller) if labeller is not None else (str(prev / "last.safetensors") if prev else None)
            model = self._model(weights)
            self._say(
                f"round {r}/{cfg.adapt.rounds}: pseudo-labelling {len(self.target)} target images, "  # type: ignore[arg-type]
                f"portion {portion_of_round(cfg, r):.2f}"
            )
            show = cfg.train.progress and not self.quiet
            pseudo = pseudo_label(
                model,
                self.target,
                cfg,
                portion_of_round(cfg, r),
                self.data.num_classes,
                folder,
                self.device,
                self.data.task,
                show_progress=show,
            )
            del model
        summary = RunDir(folder).read_summary() if RunDir(folder).is_done() else None
        if summary is not None:  # stopped after the round finished, before adaptation.json was updated
            last = summary.selections.get("last")
        else:
            trainer = self._round_trainer(r, folder, prev, pseudo)
            selections = trainer.fit().selections
            last = Selection.from_dict(selections["last"]) if "last" in selections else None
            ema = getattr(trainer.method, "ema", None)
            if cfg.adapt.ema_decay is not None and ema is not None:
                save_weights(ema, folder / "ema.safetensors")
        row: dict[str, Any] = {
            "round": r,
            "folder": folder.name,
            "portion": pseudo.stats["portion"],
            "pseudo": {k: pseudo.stats[k] for k in ("selected", "total", "unit", "images", "class_counts")},
            "thresholds": pseudo.stats["thresholds"],
            "metrics": last.metrics if last is not None else {},
            "step": last.step if last is not None else None,
        }
        if last is not None and last.report.real_average is not None:
            row["real_average"] = last.report.real_average
        return row

    def _round_trainer(self, r: int, folder: Path, prev: Path | None, pseudo: PseudoLabels) -> Trainer:
        cfg = copy.deepcopy(self.cfg)
        cfg.model.init_from = str(prev) if prev is not None else self.cfg.model.init_from
        cfg.model.init_checkpoint = "last" if prev is not None else self.cfg.model.init_checkpoint
        cfg.train.steps = self.cfg.adapt.steps_per_round
        cfg.train.seed = self.cfg.train.seed + r - 1  # another batch order per round
        cfg.name = f"{self.cfg.name or 'adapt'} round {r}"
        pair_tf = task_of(self.data).target_pair_transform(cfg.data)
        target = PseudoLabeled(self.target, pseudo.indices, pseudo.label, pair_tf)
        method = SelfTraining(build_method(cfg.method), cfg.adapt)
        resume = RunDir(folder).has_progress()
        self._say(
            f"round {r}/{self.cfg.adapt.rounds}: training {cfg.train.steps} steps on the synthetic data and "
            f"{len(target)} pseudo-labelled target images" + (" (resumed)" if resume else "")
        )
        return Trainer(
            cfg,
            folder,
            data=self.data,
            method=method,
            target=target,
            resume=resume,
            quiet=self.quiet,
            check_files=False,
            controller_factory=build_controller,
            callbacks=self.callbacks,
        )


def adapt(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    quiet: bool = False,
    data: DataBundle | None = None,
    callbacks: list[Callback] | None = None,
) -> AdaptResult:
    """Run (or, with ``resume``, continue) ``cfg``'s adaptation into ``out_dir``; ``callbacks`` are added to every
    round's trainer."""
    return Adaptation(cfg, out_dir, resume=resume, quiet=quiet, data=data, callbacks=callbacks).run()
