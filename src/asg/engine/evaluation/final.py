"""The end of a run (rank 0): each checkpoint rule's final, labelled metrics, figures, summary.json, report.md, done.

Each set of weights is evaluated once on the full sets: a rule that selected the last step reuses its numbers, and
without ``data.eval_max_per_set`` the evaluations during training already were full-set ones.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asg.config import Config
from asg.data import DataBundle
from asg.engine.evaluation.evaluator import Evaluator
from asg.engine.evaluation.report import plot_predictions, plot_run_curves, run_report_markdown
from asg.engine.evaluation.retention import imagenet_retention, teacher_photo_logits
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.summary import EvalReport, RunSummary, Selection
from asg.engine.rundir.weights import load_weights
from asg.engine.timing import PhaseTimer, peak_memory_mib
from asg.io import atomic_write
from asg.models import Teacher
from asg.models.inference import segmentation_probs, sliding_options
from asg.tasks import Task


class FinalReport:
    """Writes the end of a run of ``model`` into ``run_dir``: the selections of ``evaluator`` evaluated in full,
    ImageNet retention against ``teacher``, summary.json, report.md and figures. ``protocol``: the fields that say
    how the numbers were obtained (``Trainer.protocol``)."""

    def __init__(
        self,
        run_dir: RunDir,
        cfg: Config,
        model: nn.Module,
        teacher: Teacher,
        data: DataBundle,
        task: Task,
        device: torch.device,
        evaluator: Evaluator,
        timer: PhaseTimer,
        protocol: dict[str, Any],
    ) -> None:
        self.rd, self.cfg, self.model, self.teacher, self.data, self.task = run_dir, cfg, model, teacher, data, task
        self.device, self.evaluator, self.timer, self.protocol = device, evaluator, timer, protocol
        self.retention: dict[int, dict[str, float]] = {}  # step -> ImageNet retention of that step's weights
        self._photos: torch.Tensor | None = None
        self._photo_teacher: torch.Tensor | None = None

    def write(
        self,
        step: int,
        first_step: int,
        *,
        controller_history: list[dict[str, Any]],
        group_names: list[str],
        teacher_cache: Any,
        world_size: int,
    ) -> dict[str, dict[str, Any]]:
        """Selections of the weights at ``step``, summary.json, report.md, figures, then ``done``; returns the
        selections. ``first_step``: where this process started (the restored step after a resume)."""
        cfg = self.cfg
        with self.timer("final"):
            selections = self.selections(step)  # rank 0 alone, nothing collective: plain full evaluations
            summary = RunSummary(
                name=cfg.name,
                method=cfg.method.name,
                seed=cfg.train.seed,
                steps=cfg.train.steps,
                selections={rule: Selection.from_dict(sel) for rule, sel in selections.items()},
                controller_history=controller_history,
                group_names=group_names,
                class_names=self.data.class_names,
                task=self.data.task,
                primary_metric=self.task.primary_metric,
                protocol=self.protocol,
                teacher_cache=teacher_cache,
                source_val_set=self.data.source_val_name,
                init_from=cfg.model.init_from,
                on_bad_image=cfg.data.on_bad_image,
                skipped_images=self.rd.read_lines("skipped_images.txt"),
                world_size=world_size,
            )
            summary.figures = self.figures(step)
        timing = self.timer.summary(step - first_step)
        summary.timing = {**timing, "first_step": first_step, **peak_memory_mib(self.device)}
        self.rd.write_summary(summary)
        self.rd.write_text("report.md", run_report_markdown(summary, self.evaluator.history))
        self.rd.finish()
        return selections

    def selections(self, step: int) -> dict[str, dict[str, Any]]:
        """Final metrics on the full evaluation sets for each checkpoint rule, each labelled (``step``: the last)."""
        cfg, model, data = self.cfg, self.model, self.data
        history, evaluate = self.evaluator.history, self.evaluator.evaluate
        capped = cfg.data.eval_max_per_set is not None
        full: dict[int, dict[str, Any]] = {}  # step -> full-set metrics of that step's weights
        out: dict[str, dict[str, Any]] = {"last": {"step": step, "checkpoint": "last.safetensors"}}
        if capped:
            results = evaluate(data.eval_sets)
            full[step] = {k: r.to_dict() for k, r in results.items()}
            out["last"]["confusion"] = {k: r.confusion.tolist() for k, r in results.items()}
        elif history:
            full[step] = history[-1]["metrics"]
        self._measure_retention(step)
        live = copy.deepcopy(model.state_dict())
        for rule, info in self.evaluator.best.items():
            chosen = info["step"]
            sel: dict[str, Any] = {
                "step": chosen,
                "checkpoint": f"best_{rule.replace('-', '_')}.safetensors",
                "selected_on": info["set"],
            }
            if cfg.eval.full_eval_selected or not capped:
                if chosen not in full:
                    if capped:
                        load_weights(model, self.rd.path / info["file"])
                        full[chosen] = {k: r.to_dict() for k, r in evaluate(data.eval_sets).items()}
                    else:  # the in-training evaluation of that step already used the full sets
                        full[chosen] = next(row["metrics"] for row in history if row["step"] == chosen)
                if cfg.eval.retention and chosen not in self.retention:
                    load_weights(model, self.rd.path / info["file"])
                    self._measure_retention(chosen)
                sel["metrics"] = {**full[chosen], **self._retention_entry(chosen)}
            else:  # the in-training evaluation of that step, on the capped subsets (labelled)
                sel["metrics"] = next(row["metrics"] for row in history if row["step"] == chosen)
                sel["eval_max_per_set"] = cfg.data.eval_max_per_set
            if rule == "oracle":
                sel["note"] = "oracle: chosen with real test labels; an upper bound, not a valid protocol"
            out[rule] = sel
        model.load_state_dict(live)
        out["last"]["metrics"] = {**full.get(step, {}), **self._retention_entry(step)}
        for sel in out.values():
            subset = sel.get("eval_max_per_set")  # set above only where the metrics are the capped subsets'
            sel.update(self.protocol)
            sel["eval_max_per_set"] = subset  # None: evaluated on the full sets, whatever the curves used
            report = EvalReport.of(sel.get("metrics", {}), data.real_set_names, self.task.primary_metric)
            if report.real_average is not None:
                sel["real_average"] = report.real_average
        return out

    def _measure_retention(self, step: int) -> None:
        """ImageNet retention of the weights now loaded (those of ``step``), on the shipped photos."""
        if not self.cfg.eval.retention or step in self.retention:
            return
        if self._photos is None:
            from asg.data import real_photos

            self._photos = real_photos(224)[0]
            logits_teacher = self.teacher.with_output("logits")  # feature guidance's teacher answers features
            self._photo_teacher = teacher_photo_logits(logits_teacher, self._photos)  # the same for every step
        assert self._photo_teacher is not None
        self.retention[step] = imagenet_retention(self.model, self._photo_teacher, self._photos)

    def _retention_entry(self, step: int) -> dict[str, Any]:
        return {"real_photos": self.retention[step]} if step in self.retention else {}

    def figures(self, step: int, num_samples: int = 4) -> list[str]:
        """Write curves.png and, for segmentation, predictions.png (last weights, of ``step``, on the first real
        set)."""
        path, data = self.rd.path, self.data
        history = self.evaluator.history
        metric, title = self.task.primary_metric, self.cfg.name or "run"
        written = []
        if history:
            atomic_write(path / "curves.png", lambda tmp: plot_run_curves(history, metric, Path(tmp), title))
            written.append("curves.png")
        names = data.real_set_names or list(data.eval_sets)
        palette = data.palette
        if palette and names:  # a palette: the data are label maps
            ds = data.eval_sets[names[0]]
            items = [ds[i] for i in range(min(num_samples, len(ds)))]  # type: ignore[arg-type]
            rows = [
                (image.permute(1, 2, 0).numpy(), label.numpy(), self._predict_labels(image, tuple(label.shape)))
                for image, label in (item for item in items if item is not None)
            ]
            title = f"{names[0]}, step {step}"
            atomic_write(
                path / "predictions.png",
                lambda tmp: plot_predictions(rows, palette, Path(tmp), title, data.class_names),
            )
            written.append("predictions.png")
        return written

    @torch.no_grad()
    def _predict_labels(self, image: torch.Tensor, size: tuple[int, ...]) -> Any:
        """Class-id map [H, W] (numpy) of one image [3, h, w], upsampled to ``size``, with the eval protocol."""
        model, cfg = self.model, self.cfg
        was_training = model.training
        model.eval()
        window, stride = sliding_options(cfg)
        x = image[None].to(self.device)
        probs = segmentation_probs(model, x, tta_flip=cfg.eval.tta_flip, window=window, stride=stride)
        model.train(was_training)
        probs = nn.functional.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs[0].argmax(0).cpu().numpy()
