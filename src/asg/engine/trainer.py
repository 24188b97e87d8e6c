"""The one training loop. A method gives the loss, a controller the layer-group LR scales, the data the samples."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from asg.config import Config, config_to_dict, load_config
from asg.data import (
    DataBundle,
    balanced_subset,
    build_data,
    check_bundle_files,
    collate_skip_none,
    set_skip_log,
    warn_bundle,
)
from asg.engine.checkpoint import atomic_write, load_weights
from asg.engine.distributed import (
    Dist,
    ShardedBatchSampler,
    average_gradients,
    broadcast_module,
    rank_seed,
)
from asg.engine.evaluate import (
    PRIMARY_METRIC,
    EvalResult,
    evaluate_sets,
    imagenet_retention,
    list_collate,
    real_average,
    same_size_groups,
    segmentation_probs,
    sliding_options,
    teacher_photo_logits,
)
from asg.engine.guards import LossGuard, non_finite_tensors
from asg.engine.init_from import load_init_weights
from asg.engine.optim import build_optimizer
from asg.engine.precision import MAX_OVERFLOW_STREAK, Precision, compile_modules
from asg.engine.report import plot_predictions, plot_run_curves, run_report_markdown
from asg.engine.resume import check_resume_changes
from asg.engine.rundir import RunDir
from asg.engine.sampler import EpochBatchSampler, IndexedDataset, steps_per_epoch
from asg.engine.schedule import build_schedule
from asg.engine.teacher_cache import TeacherLogitCache, UnfingerprintableDataset, cache_key, resolve_key_mode
from asg.engine.timing import PhaseTimer, peak_memory_mib
from asg.errors import AsgError, ConfigError, TrainingDiverged
from asg.l2o.base import LRController, StepStats
from asg.methods import Batch, Method, TargetBatch, build_method, cross_entropy
from asg.models import ASGClassifier, ASGSegmenter, Teacher, build_model, make_teacher
from asg.models.fusion import inference_copy
from asg.utils import progress, seed_everything, versions

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


_END = object()  # the end of the source batches


def _size(ds: Dataset) -> int:
    """``len(ds)``: every dataset here has one, though torch's ``Dataset`` type does not declare it."""
    return len(cast(Sized, ds))


@dataclass
class TrainResult:
    """Evaluation rows over training and the final, labelled selections."""

    history: list[dict[str, Any]] = field(default_factory=list)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: Path | None = None
    controller_history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train ``cfg`` into ``out_dir`` (None: in memory only, as meta-training episodes do).

    Pass ``data``/``model``/``controller``/``method`` to reuse objects built elsewhere; otherwise they come from
    ``cfg``. ``target``: a pseudo-labelled target dataset of ``(image, pseudo-label)`` whose batches ride along
    with the source batches (domain adaptation; see ``asg.adapt``). ``check_files`` stats every image file
    before training (``data.on_bad_image`` says what a bad one does).

    Under ``torchrun`` (``dist``: default from the environment) each of the processes trains on its part of every
    global batch of ``data.batch_size`` images and averages the gradients (``asg.engine.distributed``); only
    rank 0 writes the run folder.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path | None = None,
        *,
        data: DataBundle | None = None,
        model: ASGClassifier | ASGSegmenter | None = None,
        controller: LRController | None = None,
        method: Method | None = None,
        target: Dataset | None = None,
        quiet: bool = False,
        resume: bool = False,
        check_files: bool = True,
        dist: Dist | None = None,
    ) -> None:
        self.timer = PhaseTimer()
        self.dist = dist if dist is not None else Dist.from_env(cfg.train.device)
        self.cfg, self.quiet, self.resume = cfg, quiet or not self.dist.is_main, resume
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_dir = RunDir(self.out_dir) if self.out_dir is not None else None  # read-only on ranks > 0
        seed_everything(cfg.train.seed)
        self.device = self.dist.device(cfg.train.device)
        self.data = data if data is not None else build_data(cfg.data)
        self.skipped: list[str] = []
        if check_files:
            self.data, self.skipped = check_bundle_files(self.data, cfg.data.on_bad_image)
            warn_bundle(self.data)  # e.g. a single-class training set trains to a meaningless 100%
        self.num_classes = self.data.num_classes
        if model is None:
            model = build_model(cfg.model, self.num_classes, task=self.data.task)
        self.model = model.to(self.device)
        self.teacher: Teacher = make_teacher(self.model).to(self.device)  # ImageNet weights, before init_from
        if cfg.method.teacher_fuse_bn:  # it is always in eval mode: its BatchNorms are fixed affine maps
            self.teacher = cast(Teacher, inference_copy(self.teacher))
        self.precision = Precision(cfg.train.precision, self.device)
        self.init_weights: str | None = None
        if cfg.model.init_from and not resume:  # (a resume restores its own weights)
            self.init_weights = load_init_weights(self.model, cfg, self.num_classes, self.data.task)
        self.method: Method = method if method is not None else build_method(cfg.method)
        self.teacher.set_output(self.method.teacher_output)  # ImageNet logits, or pooled features (feature guidance)
        self.method.setup(self.model)
        self.target = target
        self.groups = self.model.layer_groups()
        self.optimizer = build_optimizer(self.groups, cfg.optim)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = build_schedule(cfg.optim, cfg.train.steps)
        self.min_batch = 2 if cfg.optim.bn_mode == "train" else 1  # BatchNorm cannot train on one image
        if cfg.data.batch_size < self.min_batch * self.dist.world:
            per = " (2 images per process with optim.bn_mode=train)" if self.min_batch > 1 else ""
            raise AsgError(f"data.batch_size={cfg.data.batch_size} is the global batch, split over {self.dist.world} "
                           f"processes: it must be at least {self.min_batch * self.dist.world}{per}")  # fmt: skip
        self.steps_per_epoch = steps_per_epoch(_size(self.data.train), cfg.data.batch_size, self.min_batch)
        if controller is None:
            from asg.l2o import build_controller

            controller = build_controller(cfg, cfg.l2o.steps_per_epoch or self.steps_per_epoch)
        self.controller = controller
        if hasattr(controller, "bind_probe"):
            controller.bind_probe(self.source_val_loss)
        self.scales = list(controller.start([name for name, _ in self.groups], cfg.train.steps))
        self.use_cache = cfg.method.teacher_cache and self.method.needs_teacher and not self.data.has_augmentation
        if cfg.method.teacher_cache and self.method.needs_teacher and self.data.has_augmentation:
            self._say("asg: note: method.teacher_cache is off for this run: the training transform is random, so "
                      "the teacher must see each augmented image")  # fmt: skip
        self.teacher_cache: torch.Tensor | None = None
        self.cached: torch.Tensor | None = None
        self.disk_cache: TeacherLogitCache | None = None
        storage = cfg.method.teacher_cache_storage
        if self.use_cache and self.teacher.output != "logits" and storage not in ("memory", "fp32"):
            raise ConfigError(f"method.teacher_cache_storage={storage} stores and measures ImageNet logits, but the "
                              f"teacher gives {self.teacher.output} to method {cfg.method.name}: use memory or "
                              "fp32")  # fmt: skip
        if self.use_cache and storage != "memory":  # rank 0 builds it, then the others open it
            first = self.dist.together(self._open_disk_cache if self.dist.is_main else None)
            self.disk_cache = first if self.dist.is_main else self._open_disk_cache()
        self.loss_guard = LossGuard(cfg.train.loss_explosion_factor)
        self.step = 0
        self.first_step = 0  # the step this process started at (after a resume: the restored one)
        self.elapsed0 = 0.0  # seconds trained before a resume
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}  # rule -> {step, score, set, file, sha256}
        self.committed_step: int | None = None  # step of the checkpoint on disk
        self._pending_eval = False  # restored at an evaluation step whose evaluation did not finish
        self._last_batch: Batch | None = None
        self._last_share = 0.0  # this rank's number of images in the last batch (weight of its loss)
        self._has_share: Callable[[int], bool] = lambda step: True  # does a step's global batch give this rank images
        self.writer: SummaryWriter | None = None
        self._eval_sets = self._curve_sets()
        if cfg.train.compile:  # after every weight is in place; in place, so groups and checkpoints are unchanged
            live_teacher = self.method.needs_teacher and not self.use_cache
            compile_modules(cfg.train.compile_backend, self.model, *([self.teacher] if live_teacher else []))

    # ------------------------------------------------------------------ set-up helpers
    def _curve_sets(self) -> dict[str, Any]:
        cap = self.cfg.data.eval_max_per_set
        sets = self.data.eval_sets
        return {k: balanced_subset(v, cap, seed=0) if cap and _size(v) > cap else v for k, v in sets.items()}

    def _open_disk_cache(self) -> TeacherLogitCache | None:
        """The persistent teacher cache of this training set (built now if absent); None when the dataset cannot
        be fingerprinted (then the in-memory cache is used, with a note)."""
        m, d = self.cfg.method, self.cfg.data
        transform = (
            f"{d.name} image_size={d.image_size} train_resize={d.train_resize} backbone={self.cfg.model.backbone}"
        )
        if self.teacher.output != "logits":  # another cache than the logits' (their keys stay as they were)
            transform += f" teacher_output={self.teacher.output}"
        try:
            key = cache_key(self.data.train, transform, self.teacher, m.teacher_cache_storage, m.teacher_cache_topk,
                            m.teacher_cache_key)  # fmt: skip
        except UnfingerprintableDataset as exc:
            self._say(f"asg: note: the teacher cache stays in memory: {exc}")
            return None
        cache = TeacherLogitCache.build_or_open(
            m.teacher_cache_dir, key, self.data.train, self.teacher, storage=m.teacher_cache_storage,
            k=m.teacher_cache_topk, batch_size=d.eval_batch_size, device=self.device,
            description=f"{self.cfg.name}: {d.name} training set, {_size(self.data.train)} images, {transform}",
            show_progress=self.cfg.train.progress and not self.quiet,
        )  # fmt: skip
        if cache.replaced:
            self._say(f"asg: note: rebuilt the teacher cache {cache.path} ({cache.replaced})")
        return cache

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def _open_run_dir(self) -> None:
        """Refuse a finished or foreign run, restore or clear leftovers, write config, versions, skipped list."""
        rd = self.run_dir
        assert rd is not None
        if rd.exists("done") and self.resume:
            raise AsgError(f"{rd.path} already finished (remove its 'done' file or use another --out)")
        if self.resume:
            self._restore()
        elif rd.has_checkpoint() or rd.exists("done"):
            raise AsgError(f"{rd.path} holds a run already: pass --resume to continue it, or choose another --out")
        else:
            removed = rd.clear_leftovers()
            if removed:
                self._say(f"asg: note: {rd.path} held an earlier run that stopped before its first checkpoint; "
                          f"removed its {', '.join(removed)} and starting afresh")  # fmt: skip
        rd.write_text("config.yaml", yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        compiled = self.cfg.train.compile_backend if self.cfg.train.compile else None
        computed = self.precision.describe(self.cfg.model.channels_last, compiled)
        rd.write_text("versions.json", json.dumps({**versions(), "world_size": self.dist.world, **computed}, indent=1))
        skip_log = rd.path / "skipped_images.txt"
        if self.skipped:
            rd.write_text(skip_log.name, "".join(line + "\n" for line in self.skipped))
            self._say(f"asg: warning: left out {len(self.skipped)} missing or empty image(s) (data.on_bad_image=skip); "
                      f"they and any image that fails to decode later are listed in {skip_log}")  # fmt: skip
        if self.cfg.data.on_bad_image == "skip":
            set_skip_log(self.data, skip_log)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the restored checkpoint by the run that crashed
        self.writer = SummaryWriter(str(rd.path / "tb"), purge_step=self.step + 1 if self.resume else None)

    def _restore(self) -> None:
        """Load the committed checkpoint; rank 0 also notes changes and makes the folder match it."""
        rd = self.run_dir
        assert rd is not None
        manifest, state, weights = rd.load_checkpoint()
        step = int(manifest["step"])
        if self.dist.is_main:
            self._note_resume(step, int(state.get("world_size", 1)))
        load_weights(self.model, weights)
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)  # the config given now decides rates, momentum and decay (resume obeys)
        self.controller.load_state_dict(state["controller"])
        self.step, self.scales = step, [float(s) for s in state["scales"]]
        self.committed_step = step
        self.loss_guard.load_state_dict(state["loss_guard"])
        self.elapsed0 = float(state.get("elapsed_s", 0.0))
        torch.set_rng_state(state["torch_rng"])
        self.method.load_state_dict(state.get("method", {}))
        self.precision.load_state_dict(state.get("precision", {}))
        if state.get("teacher_cache") is not None:
            self.teacher_cache, self.cached = state["teacher_cache"], state["cached"]
        self.best = dict(manifest.get("best", {}))
        evaluated = manifest.get("evaluated_through")

        def seen(row: dict[str, Any]) -> bool:
            return evaluated is not None and row["step"] <= evaluated

        if self.dist.is_main:
            self.history = rd.truncate_rows(seen)
            rd.sync_files(manifest)
        else:
            self.history = [row for row in rd.read_rows() if seen(row)]
        self._pending_eval = self._is_eval_step(step) and (evaluated is None or evaluated < step)
        self._say(f"resumed {rd.path} at step {self.step}/{self.cfg.train.steps}")

    def _note_resume(self, step: int, saved_world: int) -> None:
        """Say (and append to resumes.jsonl) which settings and number of processes changed since the save."""
        rd = self.run_dir
        assert rd is not None
        row: dict[str, Any] = {"step": step}
        if (rd.path / "config.yaml").is_file():
            changes = check_resume_changes(load_config(rd.path / "config.yaml"), self.cfg, step)
            if changes:
                listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
                self._say(f"asg: note: resuming with changed settings, applied from step {step} on: {listed}")
                row["changes"] = {k: list(v) for k, v in changes.items()}
        if saved_world != self.dist.world:
            self._say(f"asg: note: the checkpoint of step {step} was saved by {saved_world} process(es) and resumes "
                      f"on {self.dist.world}; data.batch_size={self.cfg.data.batch_size} is the global batch, so "
                      "batches and augmentations continue as before")  # fmt: skip
            row["world_size"] = [saved_world, self.dist.world]
        if len(row) > 1:
            rd.append_row(row, "resumes.jsonl")

    def _save(self, elapsed: float) -> None:
        """Check the weights, then commit a checkpoint of this step (before it is evaluated)."""
        if self.run_dir is None:
            return
        self._check_before_save()  # on every rank: its loss is reduced, so all ranks decide alike
        self.dist.together((lambda: self._write_checkpoint(elapsed)) if self.dist.is_main else None)
        self.committed_step = self.step

    def _write_checkpoint(self, elapsed: float) -> None:
        assert self.run_dir is not None
        state = {
            "scales": torch.tensor(self.scales),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
            "loss_guard": self.loss_guard.state_dict(),
            "elapsed_s": elapsed,
            "torch_rng": torch.get_rng_state(),
            "method": self.method.state_dict(),
            "teacher_cache": self.teacher_cache,
            "cached": self.cached,
            "world_size": self.dist.world,
            "precision": self.precision.state_dict(),
        }
        evaluated = self.history[-1]["step"] if self.history else None
        self.run_dir.save_checkpoint(self.step, self.model.state_dict(), state, self.best, evaluated)

    def _check_before_save(self) -> None:
        """Refuse to checkpoint weights that are non-finite or whose loss on the last batch has exploded."""
        bad = non_finite_tensors(self.model)
        if bad:
            self._diverged("non-finite weights", {"tensors": len(bad)}, f" (first: {bad[0]})", step=self.step)
        if self._last_batch is None:
            return
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            lo = self.method.forward_loss(self.model, self._last_batch)
        loss = self.dist.weighted_mean({"loss": lo.loss}, self._last_share)["loss"]
        self.model.train(was_training)
        if self.loss_guard.exploded(loss):
            self._diverged("exploded loss of the weights to be saved", {"loss": loss, "scale": self.loss_guard.scale},
                           step=self.step)  # fmt: skip

    def _is_eval_step(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.steps

    def _autocast(self) -> torch.autocast:
        return self.precision.autocast()

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        """Train to ``cfg.train.steps``; with a run folder, hold its lock for the whole run."""
        if self.run_dir is None:
            return self._run()
        main = self.dist.is_main
        with self.run_dir if main else contextlib.nullcontext():
            try:
                self.dist.together(self._open_run_dir if main else None)
                # then the other ranks read the checkpoint rank 0 has verified (and it changes nothing until the
                # first collective of the training loop, which they join after reading)
                self.dist.together(self._restore if self.resume and not main else None)
                return self._run()
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _run(self) -> TrainResult:
        cfg = self.cfg
        t0 = time.time() - self.elapsed0
        broadcast_module(self.dist, self.model)  # identical already (same seed or checkpoint): a cheap guarantee
        if self._pending_eval:
            with self.timer("eval"):
                self._evaluate_and_log(time.time() - t0)
        self.first_step = self.step
        sampler = EpochBatchSampler(
            _size(self.data.train),
            cfg.data.batch_size,
            cfg.train.seed,
            self.step,
            cfg.train.steps,
            self.min_batch,
            with_seeds=self.data.has_augmentation,  # random crops/flips drawn per (step, slot): exact resume
        )
        loader = DataLoader(
            IndexedDataset(self.data.train),
            batch_sampler=self._shard_batches(sampler, source=True),
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_none,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )  # its own generator keeps the global RNG untouched (exact resume)
        window: dict[str, float] = {}
        bar = progress(
            loader,
            desc=cfg.name or "train",
            enabled=cfg.train.progress and not self.quiet,
            total=len(sampler),
            initial=0,
        )
        targets = self._target_loader() if self.target is not None else None
        batches = iter(bar)
        self.timer.mark_setup_done()
        while True:
            with self.timer("data"):
                batch: Any = next(batches, _END)
                target = next(targets) if targets is not None and batch is not _END else None
            if batch is _END:
                break
            if batch is None:
                raise AsgError(f"every image in the batch of step {self.step + 1} was unreadable (skipped_images.txt)")
            x, y, idx = batch
            with self.timer("train_step"):
                logs = self._train_step(x, y, idx, target)
            self.step += 1
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                n = cfg.train.log_every if self.step % cfg.train.log_every == 0 else self.step % cfg.train.log_every
                means = {k: v / n for k, v in window.items()}
                window = {}
                self._log_scalars(means)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{means['loss']:.3f}")
            if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.steps:
                with self.timer("checkpoint"):
                    self._save(time.time() - t0)  # before evaluating: a bad evaluation image cannot cost the step
            if self._is_eval_step(self.step):
                with self.timer("eval"):
                    self._evaluate_and_log(time.time() - t0)
        return self._finish()

    def _target_loader(self) -> Iterator[Any]:
        """Batches of the pseudo-labelled target set, step-aligned with the source batches (exact resume)."""
        assert self.target is not None
        cfg = self.cfg
        sampler = EpochBatchSampler(
            _size(self.target),
            cfg.adapt.target_batch_size or cfg.data.batch_size,
            cfg.train.seed + 7919,  # another order than the source's
            self.step,
            cfg.train.steps,
            self.min_batch,
            with_seeds=self.data.has_augmentation or bool(getattr(self.target, "is_random", False)),
        )
        loader = DataLoader(
            IndexedDataset(self.target),
            batch_sampler=self._shard_batches(sampler),
            num_workers=cfg.data.num_workers,
            collate_fn=collate_skip_none,
            generator=torch.Generator().manual_seed(cfg.train.seed + 7919),
        )
        return iter(loader)

    def _shard_batches(self, sampler: EpochBatchSampler, source: bool = False) -> Any:
        """``sampler`` itself (one process), or this rank's part of each global batch; the source sampler also
        tells ``_train_step`` which steps give this rank images (see ``ShardedBatchSampler``)."""
        if self.dist.world == 1:
            return sampler
        sharded = ShardedBatchSampler(sampler, self.dist.rank, self.dist.world)
        if source:
            self._has_share = sharded.has_share
        return sharded

    def _teacher_logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.method.needs_teacher:
            return None
        if not self.use_cache:
            return self.teacher(x)
        if self.disk_cache is not None:
            return self.disk_cache.logits(idx).to(self.device, non_blocking=True)
        if self.teacher_cache is None or self.cached is None or not bool(self.cached[idx].all()):
            out = self.teacher(x).float().cpu()  # [B, 1000] logits or [B, D] features (teacher.output)
            if self.teacher_cache is None or self.cached is None:  # allocated (or restored) together
                self.teacher_cache = torch.zeros(_size(self.data.train), out.shape[1])
                self.cached = torch.zeros(_size(self.data.train), dtype=torch.bool)
            self.teacher_cache[idx] = out
            self.cached[idx] = True
        return self.teacher_cache[idx].to(self.device)

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, target: list[torch.Tensor] | None = None
    ) -> dict[str, float]:
        """One optimizer step on a source batch (x, y, idx) and, in adaptation, a target batch (x', pseudo, idx')."""
        cfg = self.cfg
        mult = self.schedule(self.step)
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            group["lr"] = group["base_lr"] * mult * scale
        self.model.train(cfg.optim.bn_mode == "train")  # "frozen": eval mode, ImageNet BN statistics kept
        self.method.begin_step(self.model, self.step)  # e.g. LP-FT freezes or unfreezes the backbone
        if self.dist.rank > 0:  # rank 0 keeps the run's RNG stream (checkpointed); the others draw other dropout
            torch.manual_seed(rank_seed(cfg.train.seed, self.step, self.dist.rank))
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target_part = None
        if target is not None:
            tx, pseudo, tidx = target
            tx = tx.to(self.device, non_blocking=True)
            if cfg.model.channels_last:
                tx = tx.contiguous(memory_format=torch.channels_last)
            target_part = TargetBatch(tx, pseudo.to(self.device, non_blocking=True), tidx)
        with self._autocast():
            batch = Batch(x, y, idx, self._teacher_logits(x, idx), target_part)
            lo = self.method.forward_loss(self.model, batch)
        self._last_batch, self._last_share = batch, float(len(idx)) if self._has_share(self.step) else 0.0
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler  # fp16: loss scaling; otherwise every call below passes through
        scaler.scale(lo.loss).backward()
        # gradients, loss and logs averaged over the ranks in one all_reduce: every rank decides alike below
        values = average_gradients(self.dist, self.trainable, {"loss": lo.loss.detach(), **lo.logs}, self._last_share)
        loss_value = values.pop("loss")
        if self.loss_guard.exploded(loss_value):
            what = "non-finite loss"
            if math.isfinite(loss_value):
                what = f"exploding loss ({self.loss_guard.factor:g} x its scale {self.loss_guard.scale:.4g})"
            self._diverged(what, {"loss": loss_value, **values})
        self.loss_guard.update(loss_value)
        scaler.unscale_(self.optimizer)  # the gradients are identical on every rank: so is the overflow decision
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(grad_norm):
            self._gradient_overflow(grad_norm)
        else:
            self.precision.overflow_streak = 0
        scaler.step(self.optimizer)  # fp16: skipped when the gradients overflowed
        scaler.update()
        if cfg.optim.bn_mode == "train":  # each rank normalised its own images: keep rank 0's running statistics
            broadcast_module(self.dist, self.model, buffers_only=True)
        self.method.after_step(self.model)
        logs = {**values, "loss": loss_value, "grad_norm": grad_norm if math.isfinite(grad_norm) else 0.0}
        if self.precision.scaling:
            logs["loss_scale"] = float(scaler.get_scale())
            logs["skipped_step"] = float(not math.isfinite(grad_norm))
        self._control(logs)
        return logs

    def _gradient_overflow(self, grad_norm: float) -> None:
        """A non-finite gradient norm: divergence in fp32/bf16; in fp16 a skipped step, unless it keeps happening."""
        if not self.precision.scaling:
            self._diverged("non-finite gradient norm", {"grad_norm": grad_norm})
        self.precision.overflow_streak += 1
        if self.precision.overflow_streak >= MAX_OVERFLOW_STREAK:
            self._diverged(
                f"fp16 gradients overflowed at {MAX_OVERFLOW_STREAK} steps in a row",
                {"grad_norm": grad_norm, "loss_scale": float(self.precision.scaler.get_scale())},
                " (try train.precision=bf16 or fp32)",
            )

    def _control(self, logs: dict[str, float]) -> None:
        w = self.model.last_layer_weight.detach()
        stats = StepStats(
            step=self.step + 1,
            total_steps=self.cfg.train.steps,
            task_loss=logs["task_loss"],
            kl=logs.get("kl", 0.0),
            last_weight_mean=float(w.mean()),
            last_weight_std=float(w.std()),
            steps_per_epoch=self.cfg.l2o.steps_per_epoch or self.steps_per_epoch,
        )
        new = self.controller.after_step(stats)
        if new is not None:
            self.scales = list(new)
        if self.dist.world > 1:  # rank 0's controller decides (the others' decide alike, but must not drift)
            self.scales = self.dist.broadcast(torch.tensor(self.scales, dtype=torch.float64)).tolist()

    def _diverged(self, what: str, values: dict[str, float], detail: str = "", step: int | None = None) -> None:
        """Raise TrainingDiverged for ``what`` at ``step`` (default: the step being taken)."""
        if self.run_dir is None:
            kept = "nothing is saved (in-memory run)"
        elif self.committed_step is not None:
            manifest = self.run_dir.manifest_path
            kept = f"the last good checkpoint (step {self.committed_step}, {manifest}) is kept"
        else:
            kept = "no checkpoint was written yet"
        raise TrainingDiverged(
            f"{what} at step {self.step + 1 if step is None else step} "
            f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}){detail}; "
            f"training stopped and {kept}. Lower optim.lr or method.kl_weight, or set optim.max_grad_norm "
            "(a resume applies them: --resume --set optim.lr=...)"
        )

    # ------------------------------------------------------------------ logging and evaluation
    def _log_scalars(self, means: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in means.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            self.writer.add_scalar(f"lr/{group['name']}", group["lr"], self.step)
            self.writer.add_scalar(f"lr_scale/{group['name']}", scale, self.step)

    def _eval_all(self, sets: dict[str, Any]) -> dict[str, EvalResult]:
        show = self.cfg.train.progress and not self.quiet
        return evaluate_sets(
            self.model, sets, self.num_classes, self.cfg, self.device, show_progress=show, task=self.data.task
        )

    def _eval_sharded(self, sets: dict[str, Any]) -> dict[str, EvalResult]:
        """``_eval_all`` with each rank on the items ``rank::world`` of every set; the confusion matrices are
        summed over the ranks, so the metrics are exactly those of one process."""
        if self.dist.world == 1:
            return self._eval_all(sets)
        parts = self._eval_all({k: Subset(v, self.dist.shard(_size(v))) for k, v in sets.items()})
        summed = self.dist.all_reduce_sum(torch.stack([torch.from_numpy(r.confusion) for r in parts.values()]))
        return {k: EvalResult(c.numpy(), task=r.task) for (k, r), c in zip(parts.items(), summed)}

    def _evaluate_and_log(self, elapsed: float) -> None:
        if not self._eval_sets:
            return
        results = self._eval_sharded(self._eval_sets)
        row = {
            "step": self.step,
            "elapsed_s": round(elapsed, 1),
            **self.protocol(),
            "scales": list(self.scales),
            "metrics": {k: r.to_dict() for k, r in results.items()},
        }
        average = real_average(row["metrics"], self.data.real_set_names, PRIMARY_METRIC[self.data.task])
        if average is not None:
            row["real_average"] = average
        self.history.append(row)
        if self.run_dir is not None:
            self.dist.together((lambda: self._log_evaluation(row, results)) if self.dist.is_main else None)

    def _log_evaluation(self, row: dict[str, Any], results: dict[str, EvalResult]) -> None:
        """Rank 0: the row to results.jsonl and TensorBoard, best weights, and the manifest's evaluated step."""
        assert self.run_dir is not None and self.writer is not None  # the writer opens with the run folder
        self.run_dir.append_row(row)
        for name, r in results.items():
            for metric, value in r.to_dict().items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"eval/{name}/{metric}", value, self.step)
        self._track_best(results)
        if self.committed_step == self.step:  # the checkpoint of this step now counts its evaluation
            self.run_dir.update_manifest(best=self.best, evaluated_through=self.step)

    def _track_best(self, results: dict[str, EvalResult]) -> None:
        """Keep the weights of the best source-val step and of the best step on the oracle real set."""
        rd = self.run_dir
        assert rd is not None
        for rule, set_name in (("source-val", self.data.source_val_name), ("oracle", self.oracle_set)):
            if set_name is None or set_name not in results:
                continue
            score = results[set_name].primary
            if rule not in self.best or score > self.best[rule]["score"]:
                tag = f"best_{rule.replace('-', '_')}_step_{self.step:07d}"
                entry = rd.write_weights(tag, self.model.state_dict(), self.step)
                self.best[rule] = {**entry, "score": score, "set": set_name}

    def protocol(self) -> dict[str, Any]:
        """How the numbers of a result line were obtained (recorded in every line of results.jsonl)."""
        cfg = self.cfg
        out: dict[str, Any] = {
            "tta_flip": cfg.eval.tta_flip,
            "eval_max_per_set": cfg.data.eval_max_per_set,
            "bn_mode": cfg.optim.bn_mode,
            "world_size": self.dist.world,
        }
        if self.data.is_segmentation:
            out.update(
                split=cfg.data.split,
                class_set=self.num_classes,
                eval_resize=cfg.data.eval_resize or "native",
                sliding_window=cfg.eval.sliding_window or "whole image",
            )
        return out

    @property
    def oracle_set(self) -> str | None:
        if self.cfg.eval.oracle_set:
            return self.cfg.eval.oracle_set
        return self.data.real_set_names[0] if self.data.real_set_names else None

    def source_val_loss(self, max_batches: int = 4) -> float:
        """Mean task cross-entropy of the current model on the held-out synthetic split (for L2O rewards)."""
        name = self.data.source_val_name
        if name is None:
            raise AsgError("a held-out reward needs a source-val split (data.source_val_fraction > 0)")
        ds = self.data.eval_sets[name]
        loader = DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, shuffle=False, collate_fn=list_collate)
        was_training, total, n = self.model.training, 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                for group in same_size_groups(batch):
                    x = torch.stack([item[0] for item in group]).to(self.device)
                    y = torch.stack([torch.as_tensor(item[1]) for item in group]).to(self.device)
                    total += float(cross_entropy(self.model(x).logits, y)) * len(group)
                    n += len(group)
        self.model.train(was_training)
        return total / max(n, 1)

    def _finish(self) -> TrainResult:
        result = TrainResult(
            history=self.history, out_dir=self.out_dir, controller_history=list(getattr(self.controller, "history", []))
        )
        if self.run_dir is None or not self.dist.is_main:
            return result
        with self.timer("final"):
            result.selections = self._selections()  # rank 0 alone, nothing collective: plain full evaluations
        summary = {
            "name": self.cfg.name,
            "method": self.cfg.method.name,
            "seed": self.cfg.train.seed,
            "steps": self.cfg.train.steps,
            "selections": result.selections,
            "controller_history": result.controller_history,
            "group_names": [name for name, _ in self.groups],
            "class_names": self.data.class_names,
            "task": self.data.task,
            "primary_metric": PRIMARY_METRIC[self.data.task],
            "protocol": self.protocol(),
            "teacher_cache": self._teacher_cache_entry(),
            "source_val_set": self.data.source_val_name,
            "init_from": self.cfg.model.init_from,
            "on_bad_image": self.cfg.data.on_bad_image,
            "skipped_images": self._skipped_lines(),
            "world_size": self.dist.world,
        }
        with self.timer("final"):
            summary["figures"] = self._figures()
        timing = self.timer.summary(self.step - self.first_step)
        summary["timing"] = {**timing, "first_step": self.first_step, **peak_memory_mib(self.device)}
        self.run_dir.write_text("summary.json", json.dumps(summary, indent=1))
        self.run_dir.write_text("report.md", run_report_markdown(summary, self.history))
        self.run_dir.write_text("done", time.strftime("%Y-%m-%d %H:%M:%S\n"))
        return result

    def _teacher_cache_entry(self) -> dict[str, Any] | None:
        """Where the teacher's logits came from (summary.json): live, in memory, or a disk cache and its error."""
        if not self.method.needs_teacher:
            return None
        if self.disk_cache is not None:
            meta = self.disk_cache.meta
            key = resolve_key_mode(self.data.train, self.cfg.method.teacher_cache_key)
            return {"storage": meta["storage"], "path": str(self.disk_cache.path), "error": meta.get("storage_error"),
                    "key": key}  # fmt: skip
        return {"storage": "memory" if self.use_cache else "live"}

    def _figures(self, num_samples: int = 4) -> list[str]:
        """Write curves.png and, for segmentation, predictions.png (last weights on the first real set)."""
        rd = self.run_dir
        assert rd is not None
        metric, title = PRIMARY_METRIC[self.data.task], self.cfg.name or "run"
        written = []
        if self.history:
            atomic_write(rd.path / "curves.png", lambda tmp: plot_run_curves(self.history, metric, Path(tmp), title))
            written.append("curves.png")
        names = self.data.real_set_names or list(self.data.eval_sets)
        palette = self.data.palette
        if self.data.is_segmentation and palette and names:
            ds = self.data.eval_sets[names[0]]
            items = [ds[i] for i in range(min(num_samples, _size(ds)))]
            rows = [
                (image.permute(1, 2, 0).numpy(), label.numpy(), self._predict_labels(image, tuple(label.shape)))
                for image, label in (item for item in items if item is not None)
            ]
            title = f"{names[0]}, step {self.step}"
            atomic_write(rd.path / "predictions.png", lambda tmp: plot_predictions(rows, palette, Path(tmp), title))
            written.append("predictions.png")
        return written

    @torch.no_grad()
    def _predict_labels(self, image: torch.Tensor, size: tuple[int, ...]) -> Any:
        """Class-id map [H, W] (numpy) of one image [3, h, w], upsampled to ``size``, with the eval protocol."""
        was_training = self.model.training
        self.model.eval()
        window, stride = sliding_options(self.cfg)
        x = image[None].to(self.device)
        probs = segmentation_probs(self.model, x, tta_flip=self.cfg.eval.tta_flip, window=window, stride=stride)
        self.model.train(was_training)
        probs = nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs[0].argmax(0).cpu().numpy()

    def _skipped_lines(self) -> list[str]:
        path = self.run_dir.path / "skipped_images.txt" if self.run_dir is not None else None
        return path.read_text().splitlines() if path is not None and path.exists() else []

    def _selections(self) -> dict[str, dict[str, Any]]:
        """Final metrics on the full evaluation sets for each checkpoint rule, each labelled.

        Each set of weights is evaluated once: a rule that selected the last step reuses the last step's
        numbers, and without ``data.eval_max_per_set`` the in-training evaluations already are full-set ones.
        """
        rd = self.run_dir
        assert rd is not None
        capped = self.cfg.data.eval_max_per_set is not None
        full: dict[int, dict[str, Any]] = {}  # step -> full-set metrics of that step's weights
        retention: dict[int, dict[str, float]] = {}  # step -> ImageNet retention of that step's weights
        out: dict[str, dict[str, Any]] = {"last": {"step": self.step, "checkpoint": "last.safetensors"}}
        if capped:
            results = self._eval_all(self.data.eval_sets)
            full[self.step] = {k: r.to_dict() for k, r in results.items()}
            out["last"]["confusion"] = {k: r.confusion.tolist() for k, r in results.items()}
        elif self.history:
            full[self.step] = self.history[-1]["metrics"]
        self._retention(retention, self.step)
        live = copy.deepcopy(self.model.state_dict())
        for rule, info in self.best.items():
            step = info["step"]
            sel: dict[str, Any] = {
                "step": step,
                "checkpoint": f"best_{rule.replace('-', '_')}.safetensors",
                "selected_on": info["set"],
            }
            if self.cfg.eval.full_eval_selected or not capped:
                if step not in full:
                    if capped:
                        load_weights(self.model, rd.path / info["file"])
                        full[step] = {k: r.to_dict() for k, r in self._eval_all(self.data.eval_sets).items()}
                    else:  # the in-training evaluation of that step already used the full sets
                        full[step] = next(row["metrics"] for row in self.history if row["step"] == step)
                if self.cfg.eval.retention and step not in retention:
                    load_weights(self.model, rd.path / info["file"])
                    self._retention(retention, step)
                sel["metrics"] = {**full[step], **self._retention_entry(retention, step)}
            else:  # the in-training evaluation of that step, on the capped subsets (labelled)
                sel["metrics"] = next(row["metrics"] for row in self.history if row["step"] == step)
                sel["eval_max_per_set"] = self.cfg.data.eval_max_per_set
            if rule == "oracle":
                sel["note"] = "oracle: chosen with real test labels; an upper bound, not a valid protocol"
            out[rule] = sel
        self.model.load_state_dict(live)
        out["last"]["metrics"] = {**full.get(self.step, {}), **self._retention_entry(retention, self.step)}
        for sel in out.values():
            sel.update(self.protocol())
            average = real_average(sel.get("metrics", {}), self.data.real_set_names, PRIMARY_METRIC[self.data.task])
            if average is not None:
                sel["real_average"] = average
        return out

    def _retention(self, cache: dict[int, dict[str, float]], step: int) -> None:
        """``cache[step]`` = ImageNet retention of the model currently loaded (the weights of ``step``)."""
        if not self.cfg.eval.retention or step in cache:
            return
        if not hasattr(self, "_photos"):
            from asg.data import real_photos

            self._photos = real_photos(224)[0]
            logits_teacher = self.teacher.with_output("logits")  # feature guidance's teacher answers features
            self._photo_teacher = teacher_photo_logits(logits_teacher, self._photos)  # the same for every step
        cache[step] = imagenet_retention(self.model, self._photo_teacher, self._photos)

    @staticmethod
    def _retention_entry(cache: dict[int, dict[str, float]], step: int) -> dict[str, Any]:
        return {"real_photos": cache[step]} if step in cache else {}
