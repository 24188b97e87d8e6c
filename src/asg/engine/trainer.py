"""The one training loop. A method gives the loss, a controller the layer-group LR scales, the data the samples."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from asg.config import Config, config_to_dict
from asg.data import DataBundle, balanced_subset, build_data
from asg.engine.checkpoint import atomic_write, load_state, load_weights, save_state, save_weights
from asg.engine.evaluate import EvalResult, evaluate, imagenet_retention
from asg.engine.optim import build_optimizer
from asg.engine.sampler import EpochBatchSampler, IndexedDataset
from asg.engine.schedule import build_schedule
from asg.errors import AsgError, TrainingDiverged
from asg.l2o.base import LRController, StepStats
from asg.methods import build_method
from asg.models import ASGClassifier, Teacher, build_model, make_teacher
from asg.utils import progress, resolve_device, seed_everything, versions


@dataclass
class TrainResult:
    """Evaluation rows over training and the final, labelled selections."""

    history: list[dict[str, Any]] = field(default_factory=list)
    selections: dict[str, dict[str, Any]] = field(default_factory=dict)
    out_dir: Path | None = None
    controller_history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Train ``cfg`` into ``out_dir`` (None: in memory only, as meta-training episodes do).

    Pass ``data``/``model``/``controller`` to reuse objects built elsewhere; otherwise they come from ``cfg``.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path | None = None,
        *,
        data: DataBundle | None = None,
        model: ASGClassifier | None = None,
        controller: LRController | None = None,
        quiet: bool = False,
        resume: bool = False,
    ) -> None:
        self.cfg, self.quiet, self.resume = cfg, quiet, resume
        self.out_dir = Path(out_dir) if out_dir is not None else None
        seed_everything(cfg.train.seed)
        self.device = resolve_device(cfg.train.device)
        self.data = data if data is not None else build_data(cfg.data)
        self.num_classes = self.data.num_classes
        self.model = (model if model is not None else build_model(cfg.model, self.num_classes)).to(self.device)
        self.teacher: Teacher = make_teacher(self.model).to(self.device)
        self.method = build_method(cfg.method)
        self.method.setup(self.model)
        self.groups = self.model.layer_groups()
        self.optimizer = build_optimizer(self.groups, cfg.optim)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = build_schedule(cfg.optim, cfg.train.steps)
        self.steps_per_epoch = math.ceil(len(self.data.train) / cfg.data.batch_size)
        if controller is None:
            from asg.l2o import build_controller

            controller = build_controller(cfg, cfg.l2o.steps_per_epoch or self.steps_per_epoch)
        self.controller = controller
        if hasattr(controller, "bind_probe"):
            controller.bind_probe(self.source_val_loss)
        self.scales = list(controller.start([name for name, _ in self.groups], cfg.train.steps))
        self.use_cache = cfg.method.teacher_cache and self.method.needs_teacher and not self.data.has_augmentation
        self.teacher_cache: torch.Tensor | None = None
        self.cached: torch.Tensor | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.writer = None
        self._eval_sets = self._curve_sets()

    # ------------------------------------------------------------------ set-up helpers
    def _curve_sets(self) -> dict[str, Any]:
        cap = self.cfg.data.eval_max_per_set
        sets = self.data.eval_sets
        return {k: balanced_subset(v, cap, seed=0) if cap and len(v) > cap else v for k, v in sets.items()}

    def _open_run_dir(self) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
        atomic_write(self.out_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        atomic_write(self.out_dir / "versions.json", lambda tmp: Path(tmp).write_text(json.dumps(versions(), indent=1)))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out_dir / "tb"))

    def _restore(self) -> None:
        assert self.out_dir is not None
        state = load_state(self.out_dir / "state.pt")
        load_weights(self.model, self.out_dir / "last.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.step, self.scales = state["step"], [float(s) for s in state["scales"]]
        self.best = json.loads(state["best"])
        self.history = json.loads(state["history"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("teacher_cache") is not None:
            self.teacher_cache, self.cached = state["teacher_cache"], state["cached"]
        if not self.quiet:
            print(f"resumed {self.out_dir} at step {self.step}/{self.cfg.train.steps}")

    def _save(self) -> None:
        if self.out_dir is None:
            return
        save_weights(self.model, self.out_dir / "last.safetensors")
        state = {
            "step": self.step,
            "scales": torch.tensor(self.scales),
            "optimizer": self.optimizer.state_dict(),
            "controller": self.controller.state_dict(),
            "best": json.dumps(self.best),
            "history": json.dumps(self.history),
            "torch_rng": torch.get_rng_state(),
            "teacher_cache": self.teacher_cache,
            "cached": self.cached,
        }
        save_state(state, self.out_dir / "state.pt")

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.out_dir is not None:
            if (self.out_dir / "done").exists() and self.resume:
                raise AsgError(f"{self.out_dir} already finished (remove its 'done' file or use another --out)")
            if self.resume:
                self._restore()
            elif (self.out_dir / "state.pt").exists():
                raise AsgError(f"{self.out_dir} holds a run already: pass --resume to continue it, or choose --out")
            self._open_run_dir()
        sampler = EpochBatchSampler(
            len(self.data.train), cfg.data.batch_size, cfg.train.seed, self.step, cfg.train.steps
        )
        loader = DataLoader(
            IndexedDataset(self.data.train),
            batch_sampler=sampler,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator(),
        )  # keeps the global RNG untouched (exact resume)
        window: dict[str, float] = {}
        bar = progress(
            loader,
            desc=cfg.name or "train",
            enabled=cfg.train.progress and not self.quiet,
            total=len(sampler),
            initial=0,
        )
        t0 = time.time()
        for x, y, idx in bar:
            logs = self._train_step(x, y, idx)
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
            if self.step % cfg.train.eval_every == 0 or self.step == cfg.train.steps:
                self._evaluate_and_log(time.time() - t0)
            if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.steps:
                self._save()
        return self._finish()

    def _teacher_logits(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.method.needs_teacher:
            return None
        if not self.use_cache:
            return self.teacher(x)
        if self.teacher_cache is None:
            self.teacher_cache = torch.zeros(len(self.data.train), 1000)
            self.cached = torch.zeros(len(self.data.train), dtype=torch.bool)
        if not bool(self.cached[idx].all()):
            self.teacher_cache[idx] = self.teacher(x).float().cpu()
            self.cached[idx] = True
        return self.teacher_cache[idx].to(self.device)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        mult = self.schedule(self.step)
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            group["lr"] = group["base_lr"] * mult * scale
        self.model.train(cfg.optim.bn_mode == "train")  # "frozen": eval mode, ImageNet BN statistics kept
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            teacher_logits = self._teacher_logits(x, idx)
            out = self.model(x)
            lo = self.method.loss(out, y, teacher_logits)
        loss = lo.loss
        if not torch.isfinite(loss):
            self._diverged("loss", {k: float(v) for k, v in lo.logs.items()})
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(grad_norm):
            self._diverged("gradient norm", {"grad_norm": grad_norm})
        self.optimizer.step()
        logs = {k: float(v) for k, v in lo.logs.items()}
        logs.update(loss=float(loss.detach()), grad_norm=grad_norm)
        self._control(logs)
        return logs

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

    def _diverged(self, what: str, values: dict[str, float]) -> None:
        last = self.out_dir / "last.safetensors" if self.out_dir else None
        kept = f"the last good checkpoint {last} is kept" if last and last.exists() else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"non-finite {what} at step {self.step} ({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); "
            f"training stopped and {kept}. Lower optim.lr or method.kl_weight, or set optim.max_grad_norm."
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
        return {
            name: evaluate(
                self.model,
                ds,
                self.num_classes,
                batch_size=self.cfg.data.eval_batch_size,
                tta_flip=self.cfg.eval.tta_flip,
                device=self.device,
                num_workers=self.cfg.data.num_workers,
                desc=f"eval {name}",
                show_progress=show,
                channels_last=self.cfg.model.channels_last,
            )
            for name, ds in sets.items()
        }

    def _evaluate_and_log(self, elapsed: float) -> None:
        if not self._eval_sets:
            return
        results = self._eval_all(self._eval_sets)
        row = {
            "step": self.step,
            "elapsed_s": round(elapsed, 1),
            "tta_flip": self.cfg.eval.tta_flip,
            "eval_max_per_set": self.cfg.data.eval_max_per_set,
            "scales": list(self.scales),
            "metrics": {k: r.to_dict() for k, r in results.items()},
        }
        self.history.append(row)
        if self.out_dir is not None:
            with open(self.out_dir / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            for name, r in results.items():
                self.writer.add_scalar(f"eval/{name}/mean_class_acc", r.mean_class_acc, self.step)
                self.writer.add_scalar(f"eval/{name}/acc", r.acc, self.step)
            self._track_best(results)

    def _track_best(self, results: dict[str, EvalResult]) -> None:
        """Keep the weights of the best source-val step and of the best step on the oracle real set."""
        for rule, set_name in (("source-val", self.data.source_val_name), ("oracle", self.oracle_set)):
            if set_name is None or set_name not in results:
                continue
            score = results[set_name].mean_class_acc
            if rule not in self.best or score > self.best[rule]["score"]:
                self.best[rule] = {"step": self.step, "score": score, "set": set_name}
                save_weights(self.model, self.out_dir / f"best_{rule.replace('-', '_')}.safetensors")

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
        loader = DataLoader(ds, batch_size=self.cfg.data.eval_batch_size, shuffle=False)
        was_training, total, n = self.model.training, 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                if i >= max_batches:
                    break
                out = self.model(x.to(self.device))
                total += float(nn.functional.cross_entropy(out.logits.float(), y.to(self.device), reduction="sum"))
                n += len(y)
        self.model.train(was_training)
        return total / max(n, 1)

    def _finish(self) -> TrainResult:
        result = TrainResult(
            history=self.history, out_dir=self.out_dir, controller_history=list(getattr(self.controller, "history", []))
        )
        if self.out_dir is None:
            return result
        result.selections = self._selections()
        summary = {
            "name": self.cfg.name,
            "method": self.cfg.method.name,
            "seed": self.cfg.train.seed,
            "steps": self.cfg.train.steps,
            "selections": result.selections,
            "controller_history": result.controller_history,
            "group_names": [name for name, _ in self.groups],
            "class_names": self.data.class_names,
            "source_val_set": self.data.source_val_name,
        }
        text = json.dumps(summary, indent=1)
        atomic_write(self.out_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
        self.writer.close()
        (self.out_dir / "done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        return result

    def _selections(self) -> dict[str, dict[str, Any]]:
        """Final metrics on the full evaluation sets for each checkpoint rule, each labelled."""
        full_needed = self.cfg.data.eval_max_per_set is not None
        out: dict[str, dict[str, Any]] = {}
        last_metrics = self._eval_all(self.data.eval_sets) if full_needed else None
        out["last"] = {
            "step": self.step,
            "checkpoint": "last.safetensors",
            "metrics": {k: r.to_dict() for k, r in last_metrics.items()}
            if last_metrics
            else self.history[-1]["metrics"]
            if self.history
            else {},
        }
        if last_metrics:
            out["last"]["confusion"] = {k: r.confusion.tolist() for k, r in last_metrics.items()}
        live = copy.deepcopy(self.model.state_dict())
        for rule, info in self.best.items():
            ckpt = self.out_dir / f"best_{rule.replace('-', '_')}.safetensors"
            out[rule] = {"step": info["step"], "checkpoint": ckpt.name, "selected_on": info["set"]}
            if self.cfg.eval.full_eval_selected or not full_needed:
                load_weights(self.model, ckpt)
                metrics = {k: r.to_dict() for k, r in self._eval_all(self.data.eval_sets).items()}
            else:  # the in-training evaluation of that step, on the capped subsets (labelled)
                metrics = next(row["metrics"] for row in self.history if row["step"] == info["step"])
                out[rule]["eval_max_per_set"] = self.cfg.data.eval_max_per_set
            out[rule]["metrics"] = metrics
            if rule == "oracle":
                out[rule]["note"] = "oracle: chosen with real test labels; an upper bound, not a valid protocol"
            if self.cfg.eval.full_eval_selected or not full_needed:
                self._add_retention(out[rule])
        self.model.load_state_dict(live)
        self._add_retention(out["last"])
        for sel in out.values():
            sel["tta_flip"] = self.cfg.eval.tta_flip
        return out

    def _add_retention(self, selection: dict[str, Any]) -> None:
        """Add ``metrics.real_photos`` (ImageNet retention of the model currently loaded)."""
        if not self.cfg.eval.retention:
            return
        if not hasattr(self, "_photos"):
            from asg.data import real_photos

            self._photos = real_photos(224)[0]
        selection["metrics"]["real_photos"] = imagenet_retention(self.model, self.teacher, self._photos)
