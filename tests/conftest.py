import contextlib
import os
import signal

import pytest
import torch
from torch.utils.data import Dataset

from asg.config import load_config
from asg.data import DataBundle
from asg.engine.callbacks import Callback
from asg.engine.trainer import Trainer


class RandomImages(Dataset):
    """Fixed random images whose label is encoded in a bright patch position (learnable, tiny)."""

    def __init__(self, n: int, num_classes: int = 3, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g).tolist()
        self.images = torch.rand(n, 3, size, size, generator=g) * 0.3
        for i, y in enumerate(self.labels):
            self.images[i, :, :8, 8 * y : 8 * y + 8] = 1.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.fixture
def one_thread():
    """Tiny tensors: a single intra-op thread avoids contention on shared CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_bundle():
    return DataBundle(
        train=RandomImages(48, seed=0),
        eval_sets={"source_val": RandomImages(12, seed=1), "real": RandomImages(12, seed=2)},
        source_val_name="source_val",
        class_names=["a", "b", "c"],
    )


# the tiny run of the trainer tests (also used by the spawned processes of test_distributed)
TINY_OVERRIDES = [
    "data.batch_size=8",
    "data.image_size=32",
    "train.steps=4",
    "train.eval_every=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.progress=false",
    "optim.lr=0.05",
    "optim.warmup_steps=0",
    "eval.retention=false",
    "name=tiny",
    "method.name=asg",
    "method.kl_weight=1",
]


@pytest.fixture
def tiny_config():
    def make(*overrides: str):
        return load_config(None, TINY_OVERRIDES + list(overrides))

    return make


class CrashAt(Callback):
    """Stop a run as a crash would, when the trainer is about to take step ``step + 1``: raise ``error``
    (``KeyboardInterrupt`` by default), or with ``kill=True`` die by SIGKILL (no handler, no clean-up)."""

    def __init__(self, step: int, error: type[BaseException] = KeyboardInterrupt, kill: bool = False, when=None):
        self.step, self.error, self.kill, self.when = step, error, kill, when

    def on_step_start(self, trainer, batch) -> None:
        if trainer.step == self.step and (self.when is None or self.when(trainer)):
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise self.error(f"CrashAt({self.step})")


@contextlib.contextmanager
def every_trainer_crashes_at(step: int, error: type[BaseException] = KeyboardInterrupt, when=None):
    """Within the block, every trainer built (also those built inside ``asg.adapt``, the API...) gets a
    ``CrashAt(step, error, when=when)`` callback."""
    build = Trainer.__init__

    def with_crash(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), CrashAt(step, error, when=when)]
        build(self, *args, **kwargs)

    Trainer.__init__ = with_crash
    try:
        yield
    finally:
        Trainer.__init__ = build
