"""Evaluation during training and the checkpoints it selects.

Every ``train.eval_every`` steps (and at the last) the model is evaluated on every evaluation set (capped at
``data.eval_max_per_set`` images, the same balanced subset each time), each rank on its share with the confusion
matrices summed, so the numbers are those of one process. Rank 0 appends the row to ``results.jsonl`` and keeps
the weights of the best source-val step (the valid rule) and of the best oracle step (real labels: a bound).

:class:`Evaluator` is given what it uses (the model, the data, the folder, the processes); the loop hands it the
step, the layer-group scales and whether that step's checkpoint is committed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from asg.config import Config
from asg.data import DataBundle, balanced_subset
from asg.engine.batches import dataset_size
from asg.engine.distributed import Dist
from asg.engine.evaluation.evaluate import evaluate_sets
from asg.engine.evaluation.metrics import EvalResult
from asg.engine.rundir.folder import RunDir
from asg.engine.rundir.summary import EvalReport
from asg.engine.rundir.weights import weights_to_save
from asg.tasks import Task


class Evaluator:
    """Evaluations of ``model`` on ``data``'s evaluation sets: rows in ``history``, selected weights in ``best``.

    ``run_dir`` (None: an in-memory run) receives the rows and the selected weights on rank 0; ``protocol``: the
    fields of every row that say how its numbers were obtained (``Trainer.protocol``).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        data: DataBundle,
        task: Task,
        device: torch.device,
        dist: Dist,
        run_dir: RunDir | None,
        protocol: dict[str, Any],
        quiet: bool = False,
    ) -> None:
        self.cfg, self.model, self.data, self.task, self.device = cfg, model, data, task, device
        self.dist, self.run_dir, self.protocol, self.quiet = dist, run_dir, protocol, quiet
        cap = cfg.data.eval_max_per_set
        self.sets = {
            k: balanced_subset(v, cap, seed=0) if cap and dataset_size(v) > cap else v
            for k, v in data.eval_sets.items()
        }
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}  # rule -> {step, score, set, file, sha256}
        self.pending = False  # restored at an evaluation step whose evaluation did not finish

    def due(self, step: int) -> bool:
        return step % self.cfg.train.eval_every == 0 or step == self.cfg.train.steps

    @property
    def evaluated_through(self) -> int | None:
        """The step of the last evaluation (None before the first)."""
        return self.history[-1]["step"] if self.history else None

    @property
    def oracle_set(self) -> str | None:
        if self.cfg.eval.oracle_set:
            return self.cfg.eval.oracle_set
        return self.data.real_set_names[0] if self.data.real_set_names else None

    def restore(self, best: dict[str, dict[str, Any]], evaluated: int | None, step: int) -> None:
        """After loading the checkpoint of ``step``: its best weights, and the rows it had evaluated."""
        self.best = best

        def seen(row: dict[str, Any]) -> bool:
            return evaluated is not None and row["step"] <= evaluated

        rd = self.run_dir
        assert rd is not None
        self.history = rd.truncate_rows(seen) if self.dist.is_main else [row for row in rd.read_rows() if seen(row)]
        self.pending = self.due(step) and (evaluated is None or evaluated < step)

    def evaluate(self, sets: dict[str, Dataset]) -> dict[str, EvalResult]:
        """Evaluate the model on ``sets`` in this process."""
        cfg = self.cfg
        show = cfg.train.progress and not self.quiet
        return evaluate_sets(
            self.model,
            sets,
            self.data.num_classes,
            cfg,
            self.device,
            show_progress=show,
            task=self.data.task,
            class_groups=self.data.class_groups,
        )

    def evaluate_sharded(self, sets: dict[str, Dataset]) -> dict[str, EvalResult]:
        """``evaluate`` with each rank on the items ``rank::world`` of every set, confusion matrices summed."""
        dist = self.dist
        if dist.world == 1:
            return self.evaluate(sets)
        parts = self.evaluate({k: Subset(v, dist.shard(dataset_size(v))) for k, v in sets.items()})
        summed = dist.all_reduce_sum(torch.stack([torch.from_numpy(r.confusion) for r in parts.values()]))
        return {
            k: EvalResult(c.numpy(), task=r.task, class_groups=r.class_groups)
            for (k, r), c in zip(parts.items(), summed)
        }

    def run(
        self, step: int, elapsed: float, scales: list[float], checkpointed: bool
    ) -> tuple[dict[str, Any], dict[str, EvalResult]] | None:
        """Evaluate the weights of ``step`` now (every rank), record the row, and on rank 0 log it and keep best
        weights. ``checkpointed``: the checkpoint of ``step`` is committed (its manifest then counts this
        evaluation)."""
        if not self.sets:
            return None
        results = self.evaluate_sharded(self.sets)
        head = {"step": step, "elapsed_s": round(elapsed, 1), **self.protocol, "scales": list(scales)}
        metric = self.task.primary_metric
        report = EvalReport.of({k: r.to_dict() for k, r in results.items()}, self.data.real_set_names, metric)
        row = {**head, **report.to_dict()}
        self.history.append(row)
        if self.run_dir is not None:
            self.dist.together((lambda: self._record(step, row, results, checkpointed)) if self.dist.is_main else None)
        return row, results

    def _record(self, step: int, row: dict[str, Any], results: dict[str, EvalResult], checkpointed: bool) -> None:
        """Rank 0: the row to results.jsonl, best weights, and the manifest's evaluated step."""
        rd = self.run_dir
        assert rd is not None
        rd.append_row(row)
        for rule, set_name in (("source-val", self.data.source_val_name), ("oracle", self.oracle_set)):
            if set_name is None or set_name not in results:
                continue
            score = results[set_name].primary
            if rule not in self.best or score >= self.best[rule]["score"]:  # a tie goes to the later step
                tag = f"best_{rule.replace('-', '_')}_step_{step:07d}"
                entry = rd.write_weights(tag, weights_to_save(self.model), step)
                self.best[rule] = {**entry, "score": score, "set": set_name}
        if checkpointed:  # the checkpoint of this step now counts its evaluation
            rd.update_manifest(best=self.best, evaluated_through=step)
