"""Where the frozen teacher's outputs come from: the live teacher, a cache in memory, or a persistent disk cache.

Without augmentation the teacher sees each training image identically every epoch, so its outputs are computed
once: in memory (saved in the checkpoint) or in a disk cache shared by runs (``teacher.cache_storage``).
With a random training transform the teacher runs live on each augmented batch.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from asg.config import Config
from asg.data import DataBundle
from asg.engine.batches import dataset_size
from asg.engine.distributed import Dist
from asg.engine.teacher.cache import TeacherLogitCache
from asg.engine.teacher.keys import UnfingerprintableDataset, cache_key, resolve_key_mode
from asg.errors import ConfigError
from asg.methods import Method
from asg.models import Teacher


class TeacherSource:
    """``outputs(x, idx)``: the teacher's [B, 1000] logits (or [B, D] features) of training images ``idx``."""

    def __init__(
        self,
        cfg: Config,
        teacher: Teacher,
        method: Method,
        data: DataBundle,
        dist: Dist,
        device: torch.device,
        quiet: bool = False,
    ) -> None:
        self.cfg, self.teacher, self.method, self.data = cfg, teacher, method, data
        self.dist, self.device, self.quiet = dist, device, quiet
        m = cfg.teacher
        self.use_cache = m.cache and method.needs_teacher and not data.has_augmentation
        if m.cache and method.needs_teacher and data.has_augmentation:
            self._say(
                "asg: note: teacher.cache is off for this run: the training transform is random, so "
                "the teacher must see each augmented image"
            )
        self.memory: torch.Tensor | None = None  # [N, K] outputs of the training set, filled as batches come
        self.cached: torch.Tensor | None = None  # [N] bool: which rows of ``memory`` are filled
        self.disk_cache: TeacherLogitCache | None = None
        storage = m.cache_storage
        if self.use_cache and teacher.output != "logits" and storage not in ("memory", "fp32"):
            raise ConfigError(
                f"teacher.cache_storage={storage} stores and measures ImageNet logits, but the teacher "
                f"gives {teacher.output} to method {cfg.method.name}: use memory or fp32"
            )
        if self.use_cache and storage != "memory":  # rank 0 builds it, then the others open it
            first = dist.together(self._open_disk_cache if dist.is_main else None)
            self.disk_cache = first if dist.is_main else self._open_disk_cache()

    @property
    def live(self) -> bool:
        """Does the teacher run during training (and so deserve compiling)?"""
        return self.method.needs_teacher and not self.use_cache

    def outputs(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """Teacher outputs for the batch ``x`` [B, 3, H, W] of training images ``idx`` [B]; None without teacher."""
        if not self.method.needs_teacher:
            return None
        if not self.use_cache:
            return self.teacher(x)
        if self.disk_cache is not None:
            return self.disk_cache.logits(idx).to(self.device, non_blocking=True)
        if self.memory is None or self.cached is None or not bool(self.cached[idx].all()):
            out = self.teacher(x).float().cpu()
            if self.memory is None or self.cached is None:  # allocated (or restored) together
                self.memory = torch.zeros(dataset_size(self.data.train), out.shape[1])
                self.cached = torch.zeros(dataset_size(self.data.train), dtype=torch.bool)
            self.memory[idx] = out
            self.cached[idx] = True
        return self.memory[idx].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """The in-memory cache (the checkpoint's ``teacher_cache`` and ``cached`` entries)."""
        return {"teacher_cache": self.memory, "cached": self.cached}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("teacher_cache") is not None:
            self.memory, self.cached = state["teacher_cache"], state["cached"]

    def describe(self) -> dict[str, Any] | None:
        """Where the teacher's outputs came from (summary.json): live, in memory, or a disk cache and its error."""
        if not self.method.needs_teacher:
            return None
        if self.disk_cache is not None:
            meta = self.disk_cache.meta
            key = resolve_key_mode(self.data.train, self.cfg.teacher.cache_key)
            return {
                "storage": meta["storage"],
                "path": str(self.disk_cache.path),
                "error": meta.get("storage_error"),
                "key": key,
            }
        return {"storage": "memory" if self.use_cache else "live"}

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr)

    def _open_disk_cache(self) -> TeacherLogitCache | None:
        """The persistent cache of this training set (built now if absent); None when the dataset cannot be
        fingerprinted (then the in-memory cache is used, with a note)."""
        m, d = self.cfg.teacher, self.cfg.data
        transform = (
            f"{d.name} image_size={d.image_size} train_resize={d.train_resize} backbone={self.cfg.model.backbone}"
        )
        if self.teacher.output != "logits":  # another cache than the logits' (their keys stay as they were)
            transform += f" teacher_output={self.teacher.output}"
        try:
            key = cache_key(self.data.train, transform, self.teacher, m.cache_storage, m.cache_topk, m.cache_key)
        except UnfingerprintableDataset as exc:
            self._say(f"asg: note: the teacher cache stays in memory: {exc}")
            return None
        cache = TeacherLogitCache.build_or_open(
            m.cache_dir,
            key,
            self.data.train,
            self.teacher,
            storage=m.cache_storage,
            k=m.cache_topk,
            batch_size=d.eval_batch_size,
            device=self.device,
            description=f"{self.cfg.name}: {d.name} training set, {dataset_size(self.data.train)} images, {transform}",
            show_progress=self.cfg.train.progress and not self.quiet,
        )
        if cache.replaced:
            self._say(f"asg: note: rebuilt the teacher cache {cache.path} ({cache.replaced})")
        return cache
