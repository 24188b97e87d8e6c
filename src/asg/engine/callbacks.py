"""Optional jobs of the loop, called at fixed points: TensorBoard, the progress bar, a test's crash.

A callback never takes part in a collective on its own initiative; the built-in jobs that do (checkpoint,
evaluation, guards) are explicit calls of ``Trainer.fit``. A callback with a ``key`` has its ``state_dict``
saved in every checkpoint under that key (``LRControl``'s is ``"controller"``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from asg.config import Config
    from asg.data import DataBundle
    from asg.engine.batches import StepBatch
    from asg.engine.distributed import Dist
    from asg.engine.evaluation.evaluate import EvalResult
    from asg.engine.rundir.folder import RunDir
    from asg.engine.step import StepOutput
    from asg.models import ASGNetwork


class Loop(Protocol):
    """What a callback may read (and, for ``scales``, set) of the loop that calls it: ``Trainer`` is one. Named
    here so that callbacks need not import the trainer, which imports them."""

    cfg: Config
    quiet: bool
    resume: bool
    dist: Dist
    run_dir: RunDir | None
    model: ASGNetwork
    optimizer: torch.optim.Optimizer
    scales: list[float]
    step: int
    data: DataBundle

    def source_val_loss(self, max_batches: int = 4) -> float: ...


class Callback:
    """Hooks of ``Trainer.fit``; each does nothing unless overridden."""

    key = ""  # non-empty: the checkpoint saves ``state_dict()`` under this key

    def on_fit_start(self, trainer: Loop) -> None:
        """After the run folder is open (and a checkpoint restored), before the first batch."""

    def on_step_start(self, trainer: Loop, batch: StepBatch) -> None:
        """Before step ``trainer.step + 1`` is taken on ``batch``."""

    def on_step_end(self, trainer: Loop, out: StepOutput) -> None:
        """After optimizer step ``trainer.step`` (already counted), before its checkpoint and evaluation."""

    def on_eval_end(self, trainer: Loop, row: dict[str, Any], results: dict[str, EvalResult]) -> None:
        """After an evaluation during training (every rank; ``row`` is the line of ``results.jsonl``)."""

    def on_fit_end(self, trainer: Loop) -> None:
        """When ``fit`` leaves, normally or by an exception."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class WindowMean:
    """Means of step logs over the steps since the last read (every ``train.log_every`` steps and at the end)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, logs: dict[str, float]) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def due(self, trainer: Loop) -> bool:
        return trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.cfg.train.steps

    def read(self) -> dict[str, float]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class TensorBoardLogger(Callback):
    """``tb/`` of the run folder (rank 0): windowed step logs, learning rates and scales, evaluation metrics."""

    def __init__(self) -> None:
        self.writer: SummaryWriter | None = None
        self.window = WindowMean()

    def on_fit_start(self, trainer: Loop) -> None:
        if trainer.run_dir is None or not trainer.dist.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the restored checkpoint by the run that crashed
        purge = trainer.step + 1 if trainer.resume else None
        self.writer = SummaryWriter(str(trainer.run_dir.path / "tb"), purge_step=purge)

    def on_step_end(self, trainer: Loop, out: StepOutput) -> None:
        self.window.add(out.logs)
        if self.writer is None or not self.window.due(trainer):
            return
        for k, v in self.window.read().items():
            self.writer.add_scalar(f"train/{k}", v, trainer.step)
        for group, scale in zip(trainer.optimizer.param_groups, trainer.scales):
            self.writer.add_scalar(f"lr/{group['name']}", group["lr"], trainer.step)
            self.writer.add_scalar(f"lr_scale/{group['name']}", scale, trainer.step)

    def on_eval_end(self, trainer: Loop, row: dict[str, Any], results: dict[str, EvalResult]) -> None:
        if self.writer is None:
            return
        for name, r in results.items():
            metrics = r.to_dict()
            scalars = {**metrics, **{f"{g}_mean": v for g, v in metrics.get("group_means", {}).items()}}
            for metric, value in scalars.items():
                if isinstance(value, float):
                    self.writer.add_scalar(f"eval/{name}/{metric}", value, trainer.step)

    def on_fit_end(self, trainer: Loop) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """A tqdm bar over the steps left (stderr), with the windowed loss; off with ``train.progress=false``."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.window = WindowMean()

    def on_fit_start(self, trainer: Loop) -> None:
        if trainer.cfg.train.progress and not trainer.quiet:
            from tqdm import tqdm

            left = trainer.cfg.train.steps - trainer.step
            self.bar = tqdm(total=left, desc=trainer.cfg.name or "train", dynamic_ncols=True)

    def on_step_end(self, trainer: Loop, out: StepOutput) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.window.add({"loss": out.logs["loss"]})
        if self.window.due(trainer):
            self.bar.set_postfix(loss=f"{self.window.read()['loss']:.3f}")

    def on_fit_end(self, trainer: Loop) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
