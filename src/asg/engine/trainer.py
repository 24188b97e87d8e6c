"""The one training loop. A method gives the loss, a controller the layer-group LR scales, the data the samples.

``Trainer`` builds the parts (or takes them) and runs ``fit``; each job lives in its own object: ``StepRunner``
(one optimizer step), ``BatchStream`` (this rank's batches), ``TeacherSource`` (the teacher's outputs),
``Checkpointer`` (the run folder's checkpoints), ``Evaluator`` (evaluation and best weights), ``FinalReport``
(selections, summary, report) and the callbacks (learning-rate control, TensorBoard, progress bar).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import Dataset

from asg.config import Config
from asg.data import DataBundle, build_data, check_bundle_files, warn_bundle
from asg.engine.batches import BatchStream, StepBatch, dataset_size
from asg.engine.callbacks import Callback, ProgressBar, TensorBoardLogger
from asg.engine.checkpointing import Checkpointer, Restored
from asg.engine.control import ControllerFactory, LRControl, LRController, fixed_only
from asg.engine.distributed import Dist
from asg.engine.evaluation.evaluator import Evaluator
from asg.engine.evaluation.final import FinalReport
from asg.engine.gradient_sync import broadcast_module
from asg.engine.guards import LossGuard
from asg.engine.optim import build_optimizer
from asg.engine.precision import Precision, compile_modules
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.init_from import load_init_weights
from asg.engine.sampler import steps_per_epoch
from asg.engine.schedule import build_schedule
from asg.engine.step import StepOutput, StepRunner
from asg.engine.teacher.source import TeacherSource
from asg.engine.timing import PhaseTimer
from asg.errors import AsgError
from asg.methods import Method, build_method, with_method_parameters
from asg.models import ASGNetwork, Teacher, build_model, make_teacher
from asg.models.fusion import inference_copy
from asg.tasks import CLASSIFICATION, Task, heldout_loss, task_of
from asg.utils import seed_everything


@dataclass
class TrainResult:
    """Evaluation rows over training and the final, labelled selections."""

    history: list[dict[str, Any]] = field(default_factory=list)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: Path | None = None
    controller_history: list[dict[str, Any]] = field(default_factory=list)
    task: Task = CLASSIFICATION  # what the metrics of ``selections`` measure


class Trainer:
    """Train ``cfg`` into ``out_dir`` (None: in memory only, as meta-training episodes do).

    Pass ``data``/``model``/``controller``/``method`` to reuse objects built elsewhere; otherwise they come from
    ``cfg`` (a controller other than ``fixed`` from ``controller_factory``, e.g. ``asg.l2o.build_controller``).
    ``target``: a pseudo-labelled target dataset of ``(image, pseudo-label)`` whose batches ride along with the
    source batches (domain adaptation). ``check_files`` stats every image file before training. ``callbacks``
    run after the built-in ones (learning-rate control, TensorBoard, progress bar).

    Under ``torchrun`` (``dist``: default from the environment) each process trains on its part of every global
    batch of ``data.batch_size`` images and the gradients are averaged; only rank 0 writes the run folder.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path | None = None,
        *,
        data: DataBundle | None = None,
        model: ASGNetwork | None = None,
        controller: LRController | None = None,
        controller_factory: ControllerFactory = fixed_only,
        method: Method | None = None,
        target: Dataset | None = None,
        quiet: bool = False,
        resume: bool = False,
        check_files: bool = True,
        dist: Dist | None = None,
        callbacks: list[Callback] | None = None,
    ) -> None:
        self.timer = PhaseTimer()
        self.dist = dist if dist is not None else Dist.from_env(cfg.train.device)
        self.cfg, self.quiet, self.resume = cfg, quiet or not self.dist.is_main, resume
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_dir = RunDir(self.out_dir) if self.out_dir is not None else None  # read-only on ranks > 0
        seed_everything(cfg.train.seed)
        self.device = self.dist.device(cfg.train.device)
        self.data = data if data is not None else build_data(cfg.data)
        self.task = task_of(self.data)  # metrics, protocol fields, held-out loss of this task
        self.skipped: list[str] = []
        if check_files:
            self.data, self.skipped = check_bundle_files(self.data, cfg.data.on_bad_image)
            warn_bundle(self.data)  # e.g. a single-class training set trains to a meaningless 100%
        self.model = (model or build_model(cfg.model, self.data.num_classes, task=self.data.task)).to(self.device)
        self.teacher: Teacher = make_teacher(self.model).to(self.device)  # ImageNet weights, before init_from
        if cfg.teacher.fuse_bn:  # it is always in eval mode: its BatchNorms are fixed affine maps
            self.teacher = cast(Teacher, inference_copy(self.teacher))
        self.precision = Precision(cfg.train.precision, self.device)
        if cfg.model.init_from and not resume:  # (a resume restores its own weights)
            load_init_weights(self.model, cfg, self.data.num_classes, self.data.task)
        self.method: Method = method if method is not None else build_method(cfg.method)
        self.teacher.set_output(self.method.teacher_output)  # ImageNet logits, or pooled features (feature guidance)
        if hasattr(self.method, "bind_teacher"):  # CSG runs the frozen teacher itself, as its key encoder
            self.method.bind_teacher(self.teacher)
        self.method.setup(self.model)
        self.groups = with_method_parameters(self.model.layer_groups(), self.method)  # + CSG's MLPs, in "head"
        self.optimizer = build_optimizer(self.groups, cfg.optim)
        min_batch = 2 if cfg.optim.bn_mode == "train" else 1  # BatchNorm cannot train on one image
        if cfg.data.batch_size < min_batch * self.dist.world:
            per = " (2 images per process with optim.bn_mode=train)" if min_batch > 1 else ""
            raise AsgError(
                f"data.batch_size={cfg.data.batch_size} is the global batch, split over {self.dist.world} "
                f"processes: it must be at least {min_batch * self.dist.world}{per}"
            )
        n_train = dataset_size(self.data.train)
        if cfg.data.batch_size > n_train:
            from asg.data.bundle import DataWarning

            line = (
                f"data.batch_size={cfg.data.batch_size} is larger than the training set ({n_train} images): "
                f"every batch holds at most those {n_train} images; lower data.batch_size or add images"
            )
            warnings.warn(DataWarning(line), stacklevel=2)
        epoch = cfg.l2o.steps_per_epoch or steps_per_epoch(n_train, cfg.data.batch_size, min_batch)
        self.controller = controller if controller is not None else controller_factory(cfg, epoch)
        if hasattr(self.controller, "bind_probe"):
            self.controller.bind_probe(self.source_val_loss)
        self.scales = list(self.controller.start([name for name, _ in self.groups], cfg.train.steps))
        self.teacher_source = TeacherSource(
            cfg, self.teacher, self.method, self.data, self.dist, self.device, self.quiet
        )
        self.loss_guard = LossGuard(cfg.train.loss_explosion_factor)
        self.step = self.first_step = 0  # first_step: where this process started (after a resume: the restored one)
        self.elapsed = 0.0  # seconds trained, as of the last checkpoint (restored by a resume)
        self.batches = BatchStream(self.data, cfg, self.dist, min_batch, target)
        self.batches.timer = self.timer
        self.checkpointer = Checkpointer(
            self.run_dir, cfg, self.model, self.dist, self.precision, self.loss_guard, self.say
        )
        schedule = build_schedule(cfg.optim, cfg.train.steps)
        self.stepper = StepRunner(
            cfg,
            self.model,
            self.method,
            self.optimizer,
            schedule,
            self.precision,
            self.dist,
            self.device,
            self.teacher_source,
            self.loss_guard,
            self.batches.has_share,
            self.checkpointer.kept,
        )
        self.evaluator = Evaluator(
            cfg, self.model, self.data, self.task, self.device, self.dist, self.run_dir, self.protocol(), self.quiet
        )
        self.callbacks: list[Callback] = [
            LRControl(self.controller, epoch),
            TensorBoardLogger(),
            ProgressBar(),
            *(callbacks or []),
        ]
        if cfg.train.compile:  # after every weight is in place; in place, so groups and checkpoints are unchanged
            live = [self.teacher] if self.teacher_source.live else []
            compile_modules(cfg.train.compile_backend, self.model, *live)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Train to ``cfg.train.steps``: open the run folder, step, checkpoint and evaluate when due, report."""
        main = self.dist.is_main
        with self.run_dir if self.run_dir is not None and main else contextlib.nullcontext():
            try:
                if self.run_dir is not None:
                    self.checkpointer.open(self.resume, self.data, self.skipped, self._restore)  # or refuse
                for cb in self.callbacks:
                    cb.on_fit_start(self)
                t0 = time.time() - self.elapsed
                broadcast_module(self.dist, self.model)  # identical already (same seed or checkpoint): a guarantee
                if self.evaluator.pending:  # a resume at a step whose evaluation did not finish
                    self._evaluate(time.time() - t0)
                self.first_step = self.step
                self.batches.begin(self.step)
                self.timer.mark_setup_done()
                for batch in self.batches:
                    for cb in self.callbacks:
                        cb.on_step_start(self, batch)
                    with self.timer("train_step"):
                        out = self.train_step(batch)
                    for cb in self.callbacks:
                        cb.on_step_end(self, out)
                    if self.checkpointer.due(self.step):
                        with self.timer("checkpoint"):
                            self.elapsed = time.time() - t0
                            self._save()  # before evaluating: a bad image cannot cost the step
                    if self.evaluator.due(self.step):
                        self._evaluate(time.time() - t0)
                return self._finish()
            finally:
                for cb in self.callbacks:
                    cb.on_fit_end(self)

    def train_step(self, batch: StepBatch) -> StepOutput:
        """One optimizer step on ``batch`` with the current layer-group scales; counts the step."""
        out = self.stepper(batch, self.step, self.scales)
        self.step += 1
        return out

    def _save(self) -> None:
        ev = self.evaluator
        self.checkpointer.save(self.step, self.state_dict, ev.best, ev.evaluated_through, self.stepper.last_batch_loss)

    def _evaluate(self, elapsed: float) -> None:
        with self.timer("eval"):
            checkpointed = self.checkpointer.committed_step == self.step
            done = self.evaluator.run(self.step, elapsed, self.scales, checkpointed)
        if done is not None:
            for cb in self.callbacks:
                cb.on_eval_end(self, *done)

    def _finish(self) -> TrainResult:
        history = list(getattr(self.controller, "history", []))
        result = TrainResult(self.evaluator.history, out_dir=self.out_dir, controller_history=history, task=self.task)
        if self.run_dir is not None and self.dist.is_main:
            report = FinalReport(
                self.run_dir,
                self.cfg,
                self.model,
                self.teacher,
                self.data,
                self.task,
                self.device,
                self.evaluator,
                self.timer,
                self.protocol(),
            )
            groups, cache = [name for name, _ in self.groups], self.teacher_source.describe()
            world = self.dist.world
            result.selections = report.write(
                self.step,
                self.first_step,
                controller_history=history,
                group_names=groups,
                teacher_cache=cache,
                world_size=world,
            )
        return result

    def _restore(self, restored: Restored) -> None:
        """Apply a checkpoint the checkpointer read back (its weights are in the model already)."""
        self.load_state_dict(restored.state)
        self.step = restored.step
        self.evaluator.restore(restored.best, restored.evaluated_through, restored.step)

    # ------------------------------------------------------------------ state and facts
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights that a resume needs (the checkpoint's ``state``)."""
        state = {
            "scales": torch.tensor(self.scales),
            "optimizer": self.optimizer.state_dict(),
            "loss_guard": self.loss_guard.state_dict(),
            "elapsed_s": self.elapsed,
            "torch_rng": torch.get_rng_state(),
            "method": self.method.state_dict(),
            **self.teacher_source.state_dict(),
            "world_size": self.dist.world,
            "precision": self.precision.state_dict(),
        }
        return {**state, **{cb.key: cb.state_dict() for cb in self.callbacks if cb.key}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # the config given now decides rates, momentum and decay (resume obeys)
        for cb in self.callbacks:
            if cb.key:
                cb.load_state_dict(state.get(cb.key, {}))
        self.scales = [float(s) for s in state["scales"]]
        self.loss_guard.load_state_dict(state["loss_guard"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(state["torch_rng"])
        self.method.load_state_dict(state.get("method", {}))
        self.precision.load_state_dict(state.get("precision", {}))
        self.teacher_source.load_state_dict(state)

    def protocol(self) -> dict[str, Any]:
        """How the numbers of a result line were obtained (recorded in every line of results.jsonl)."""
        cfg = self.cfg
        out = {
            "tta_flip": cfg.eval.tta_flip,
            "eval_max_per_set": cfg.data.eval_max_per_set,
            "bn_mode": cfg.optim.bn_mode,
            "world_size": self.dist.world,
        }
        return {**out, **self.task.protocol(cfg, self.data.num_classes)}

    def source_val_loss(self, max_batches: int = 4) -> float:
        """Mean task loss of the current model on the held-out synthetic split (for L2O rewards)."""
        return heldout_loss(self.model, self.data, self.cfg, self.device, max_batches)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)
