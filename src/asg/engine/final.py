"""The end of a run (rank 0): each checkpoint rule's final, labelled metrics, figures, summary.json, report.md, done.

Each set of weights is evaluated once on the full sets: a rule that selected the last step reuses its numbers, and
without ``data.eval_max_per_set`` the evaluations during training already were full-set ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from asg.engine.checkpoint import load_weights
from asg.engine.metrics import real_average
from asg.engine.report import plot_predictions, plot_run_curves, run_report_markdown
from asg.engine.retention import imagenet_retention, teacher_photo_logits
from asg.engine.rundir import RunDir
from asg.engine.timing import peak_memory_mib
from asg.io import atomic_write
from asg.models.inference import segmentation_probs, sliding_options

if TYPE_CHECKING:
    from asg.engine.trainer import Trainer


class FinalReport:
    """Writes the end of ``trainer``'s run into ``run_dir``."""

    def __init__(self, trainer: Trainer, run_dir: RunDir) -> None:
        self.t, self.rd = trainer, run_dir
        self.retention: dict[int, dict[str, float]] = {}  # step -> ImageNet retention of that step's weights
        self._photos: torch.Tensor | None = None
        self._photo_teacher: torch.Tensor | None = None

    def write(self) -> dict[str, dict[str, Any]]:
        """Selections, summary.json, report.md, figures, then ``done``; returns the selections."""
        t, cfg = self.t, self.t.cfg
        with t.timer("final"):
            selections = self.selections()  # rank 0 alone, nothing collective: plain full evaluations
            summary = {
                "name": cfg.name,
                "method": cfg.method.name,
                "seed": cfg.train.seed,
                "steps": cfg.train.steps,
                "selections": selections,
                "controller_history": list(getattr(t.controller, "history", [])),
                "group_names": [name for name, _ in t.groups],
                "class_names": t.data.class_names,
                "task": t.data.task,
                "primary_metric": t.task.primary_metric,
                "protocol": t.protocol(),
                "teacher_cache": t.teacher_source.describe(),
                "source_val_set": t.data.source_val_name,
                "init_from": cfg.model.init_from,
                "on_bad_image": cfg.data.on_bad_image,
                "skipped_images": self._skipped_lines(),
                "world_size": t.dist.world,
            }
            summary["figures"] = self.figures()
        timing = t.timer.summary(t.step - t.first_step)
        summary["timing"] = {**timing, "first_step": t.first_step, **peak_memory_mib(t.device)}
        self.rd.write_text("summary.json", json.dumps(summary, indent=1))
        self.rd.write_text("report.md", run_report_markdown(summary, t.evaluator.history))
        self.rd.finish()
        return selections

    def selections(self) -> dict[str, dict[str, Any]]:
        """Final metrics on the full evaluation sets for each checkpoint rule, each labelled."""
        t, cfg = self.t, self.t.cfg
        history, evaluate = t.evaluator.history, t.evaluator.evaluate
        capped = cfg.data.eval_max_per_set is not None
        full: dict[int, dict[str, Any]] = {}  # step -> full-set metrics of that step's weights
        out: dict[str, dict[str, Any]] = {"last": {"step": t.step, "checkpoint": "last.safetensors"}}
        if capped:
            results = evaluate(t.data.eval_sets)
            full[t.step] = {k: r.to_dict() for k, r in results.items()}
            out["last"]["confusion"] = {k: r.confusion.tolist() for k, r in results.items()}
        elif history:
            full[t.step] = history[-1]["metrics"]
        self._measure_retention(t.step)
        live = copy.deepcopy(t.model.state_dict())
        for rule, info in t.evaluator.best.items():
            step = info["step"]
            sel: dict[str, Any] = {
                "step": step,
                "checkpoint": f"best_{rule.replace('-', '_')}.safetensors",
                "selected_on": info["set"],
            }
            if cfg.eval.full_eval_selected or not capped:
                if step not in full:
                    if capped:
                        load_weights(t.model, self.rd.path / info["file"])
                        full[step] = {k: r.to_dict() for k, r in evaluate(t.data.eval_sets).items()}
                    else:  # the in-training evaluation of that step already used the full sets
                        full[step] = next(row["metrics"] for row in history if row["step"] == step)
                if cfg.eval.retention and step not in self.retention:
                    load_weights(t.model, self.rd.path / info["file"])
                    self._measure_retention(step)
                sel["metrics"] = {**full[step], **self._retention_entry(step)}
            else:  # the in-training evaluation of that step, on the capped subsets (labelled)
                sel["metrics"] = next(row["metrics"] for row in history if row["step"] == step)
                sel["eval_max_per_set"] = cfg.data.eval_max_per_set
            if rule == "oracle":
                sel["note"] = "oracle: chosen with real test labels; an upper bound, not a valid protocol"
            out[rule] = sel
        t.model.load_state_dict(live)
        out["last"]["metrics"] = {**full.get(t.step, {}), **self._retention_entry(t.step)}
        for sel in out.values():
            sel.update(t.protocol())
            average = real_average(sel.get("metrics", {}), t.data.real_set_names, t.task.primary_metric)
            if average is not None:
                sel["real_average"] = average
        return out

    def _measure_retention(self, step: int) -> None:
        """ImageNet retention of the weights now loaded (those of ``step``), on the shipped photos."""
        if not self.t.cfg.eval.retention or step in self.retention:
            return
        if self._photos is None:
            from asg.data import real_photos

            self._photos = real_photos(224)[0]
            logits_teacher = self.t.teacher.with_output("logits")  # feature guidance's teacher answers features
            self._photo_teacher = teacher_photo_logits(logits_teacher, self._photos)  # the same for every step
        assert self._photo_teacher is not None
        self.retention[step] = imagenet_retention(self.t.model, self._photo_teacher, self._photos)

    def _retention_entry(self, step: int) -> dict[str, Any]:
        return {"real_photos": self.retention[step]} if step in self.retention else {}

    def figures(self, num_samples: int = 4) -> list[str]:
        """Write curves.png and, for segmentation, predictions.png (last weights on the first real set)."""
        t, path = self.t, self.rd.path
        history = t.evaluator.history
        metric, title = t.task.primary_metric, t.cfg.name or "run"
        written = []
        if history:
            atomic_write(path / "curves.png", lambda tmp: plot_run_curves(history, metric, Path(tmp), title))
            written.append("curves.png")
        names = t.data.real_set_names or list(t.data.eval_sets)
        palette = t.data.palette
        if palette and names:  # a palette: the data are label maps
            ds = t.data.eval_sets[names[0]]
            items = [ds[i] for i in range(min(num_samples, len(ds)))]  # type: ignore[arg-type]
            rows = [
                (image.permute(1, 2, 0).numpy(), label.numpy(), self._predict_labels(image, tuple(label.shape)))
                for image, label in (item for item in items if item is not None)
            ]
            title = f"{names[0]}, step {t.step}"
            atomic_write(path / "predictions.png", lambda tmp: plot_predictions(rows, palette, Path(tmp), title))
            written.append("predictions.png")
        return written

    @torch.no_grad()
    def _predict_labels(self, image: torch.Tensor, size: tuple[int, ...]) -> Any:
        """Class-id map [H, W] (numpy) of one image [3, h, w], upsampled to ``size``, with the eval protocol."""
        model, cfg = self.t.model, self.t.cfg
        was_training = model.training
        model.eval()
        window, stride = sliding_options(cfg)
        x = image[None].to(self.t.device)
        probs = segmentation_probs(model, x, tta_flip=cfg.eval.tta_flip, window=window, stride=stride)
        model.train(was_training)
        probs = nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs[0].argmax(0).cpu().numpy()

    def _skipped_lines(self) -> list[str]:
        path = self.rd.path / "skipped_images.txt"
        return path.read_text().splitlines() if path.exists() else []
