"""Evaluation during training and the checkpoints it selects.

Every ``train.eval_every`` steps (and at the last) the model is evaluated on every evaluation set (capped at
``data.eval_max_per_set`` images, the same balanced subset each time), each rank on its share with the confusion
matrices summed, so the numbers are those of one process. Rank 0 appends the row to ``results.jsonl`` and keeps
the weights of the best source-val step (the valid rule) and of the best oracle step (real labels: a bound).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset, Subset

from asg.data import balanced_subset
from asg.engine.batches import dataset_size
from asg.engine.checkpoint import weights_to_save
from asg.engine.evaluate import evaluate_sets
from asg.engine.metrics import EvalResult, real_average
from asg.engine.rundir import RunDir

if TYPE_CHECKING:
    from asg.engine.trainer import Trainer


class Evaluator:
    """Evaluations of ``trainer``'s model: rows in ``history``, selected weights in ``best``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        cfg, data = trainer.cfg, trainer.data
        cap = cfg.data.eval_max_per_set
        self.sets = {k: balanced_subset(v, cap, seed=0) if cap and dataset_size(v) > cap else v
                     for k, v in data.eval_sets.items()}  # fmt: skip
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}  # rule -> {step, score, set, file, sha256}
        self.pending = False  # restored at an evaluation step whose evaluation did not finish

    def due(self, step: int) -> bool:
        return step % self.trainer.cfg.train.eval_every == 0 or step == self.trainer.cfg.train.steps

    @property
    def oracle_set(self) -> str | None:
        cfg, data = self.trainer.cfg, self.trainer.data
        if cfg.eval.oracle_set:
            return cfg.eval.oracle_set
        return data.real_set_names[0] if data.real_set_names else None

    def restore(self, best: dict[str, dict[str, Any]], evaluated: int | None, rd: RunDir, main: bool) -> None:
        """After loading the checkpoint of ``trainer.step``: its best weights, and the rows it had evaluated."""
        self.best = best

        def seen(row: dict[str, Any]) -> bool:
            return evaluated is not None and row["step"] <= evaluated

        self.history = rd.truncate_rows(seen) if main else [row for row in rd.read_rows() if seen(row)]
        step = self.trainer.step
        self.pending = self.due(step) and (evaluated is None or evaluated < step)

    def evaluate(self, sets: dict[str, Dataset]) -> dict[str, EvalResult]:
        """Evaluate the model on ``sets`` in this process."""
        t = self.trainer
        show = t.cfg.train.progress and not t.quiet
        return evaluate_sets(t.model, sets, t.data.num_classes, t.cfg, t.device, show_progress=show, task=t.data.task)

    def evaluate_sharded(self, sets: dict[str, Dataset]) -> dict[str, EvalResult]:
        """``evaluate`` with each rank on the items ``rank::world`` of every set, confusion matrices summed."""
        dist = self.trainer.dist
        if dist.world == 1:
            return self.evaluate(sets)
        parts = self.evaluate({k: Subset(v, dist.shard(dataset_size(v))) for k, v in sets.items()})
        summed = dist.all_reduce_sum(torch.stack([torch.from_numpy(r.confusion) for r in parts.values()]))
        return {k: EvalResult(c.numpy(), task=r.task) for (k, r), c in zip(parts.items(), summed)}

    def run(self, elapsed: float) -> tuple[dict[str, Any], dict[str, EvalResult]] | None:
        """Evaluate now (every rank), record the row, and on rank 0 log it and keep best weights."""
        if not self.sets:
            return None
        t = self.trainer
        results = self.evaluate_sharded(self.sets)
        row = {
            "step": t.step,
            "elapsed_s": round(elapsed, 1),
            **t.protocol(),
            "scales": list(t.scales),
            "metrics": {k: r.to_dict() for k, r in results.items()},
        }
        average = real_average(row["metrics"], t.data.real_set_names, t.task.primary_metric)
        if average is not None:
            row["real_average"] = average
        self.history.append(row)
        if t.run_dir is not None:
            t.dist.together((lambda: self._record(row, results)) if t.dist.is_main else None)
        return row, results

    def _record(self, row: dict[str, Any], results: dict[str, EvalResult]) -> None:
        """Rank 0: the row to results.jsonl, best weights, and the manifest's evaluated step."""
        t, rd = self.trainer, self.trainer.run_dir
        assert rd is not None
        rd.append_row(row)
        for rule, set_name in (("source-val", t.data.source_val_name), ("oracle", self.oracle_set)):
            if set_name is None or set_name not in results:
                continue
            score = results[set_name].primary
            if rule not in self.best or score >= self.best[rule]["score"]:  # a tie goes to the later step
                tag = f"best_{rule.replace('-', '_')}_step_{t.step:07d}"
                entry = rd.write_weights(tag, weights_to_save(t.model), t.step)
                self.best[rule] = {**entry, "score": score, "set": set_name}
        if t.checkpointer.committed_step == t.step:  # the checkpoint of this step now counts its evaluation
            rd.update_manifest(best=self.best, evaluated_through=t.step)
