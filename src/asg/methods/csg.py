"""CSG: contrastive synthetic-to-real generalization (Chen, Yu, Wang, Anandkumar, ICLR 2021), the follow-up of ASG.

Loss = CE(query view) + ``csg_weight`` x sum over the chosen stages of InfoNCE(q, k+, queue):

- two views of every synthetic image (``asg.methods.views``): RandAugment(N=1, M=6) drawn independently for the
  query and the key (classification), or the image as query and a colour-jittered key (segmentation);
- query: the trained network's stage map of the query view (the same forward pass that gives the task logits),
  A-pooled, through a 2-layer MLP ``Linear(C, C) - ReLU - Linear(C, 128)``, L2-normalised;
- key: the frozen ImageNet network's stage map of the key view (the trainer's teacher, never updated), A-pooled
  with attention from the *trained* network's map of the key view (no gradient), through the key MLP, an
  exponential moving average of the query MLP (momentum 0.999, after every optimizer step), L2-normalised;
- InfoNCE at temperature 0.07: logits ``[q . k+, q . queue] / T``, cross-entropy with the positive at index 0,
  mean over the instances; one queue of ``csg_queue`` keys per stage (65,536 in the paper), first in first out,
  filled with the keys of every process after each step (MoCo's queue), initialised with random unit vectors.

A-pool (attentional pooling): with v̄ the average of the map's vectors v_ij, ``a_ij = <v_ij, v̄> / sum_i'j'
<v_i'j', v̄>`` and ``pooled = sum_ij a_ij v_ij`` (a constant map gives its average). Segmentation: each map is cut
into ``csg_chunks x csg_chunks`` patches (8 x 8 by default; fewer when the map is smaller) and every patch is an
instance, A-pooled on its own, its positive the same patch of the key view.

Stages (``csg_stages``): indices into the backbone's ``forward_stages`` maps (Python indexing, -1 the deepest):
for a ResNet the maps are stem, layer1 ... layer4, so CSG's "stages 3 and 4" are ``[3, 4]`` = ``[-2, -1]``; any
backbone the package builds has such a list (timm's ``feature_info`` / ``forward_intermediates``; the ViTs' chosen
blocks).

Reconstruction choices (the paper and the release's documented behaviour, no code of it): the task loss reads
the query view; the query's A-pool attention keeps its gradient; the key encoder runs at the trained network's
output stride (a dilated segmentation ResNet gets a dilated copy of the frozen teacher, so the key's attention and
patches line up with the query's); ``csg_train_mlp=false`` reproduces the release's segmentation optimizer, which
leaves the projection MLP out (it then stays at its random initialisation, and so does the key MLP).
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from asg.collectives import all_gather_rows
from asg.errors import ConfigError
from asg.methods.base import Batch, LossOutput, MethodBase, cross_entropy
from asg.methods.space import Knob
from asg.methods.views import Views


def a_pool(v: Tensor, grid: tuple[int, int] = (1, 1), attention: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """A-pool of maps ``v`` [B, C, h, w] over a ``grid`` of patches -> [B, P, C] (P = grid_h x grid_w).

    Patch p holds the positions whose row falls in row-bin ``floor(r * grid_h / h)`` and column likewise. Within a
    patch, ``a_ij = <v_ij, m> / sum <v_i'j', m>`` (m the patch's mean vector) and the pooled vector is ``sum a_ij
    v_ij``. ``attention``: another map [B, C', h, w] whose own attention weights are used instead (the key's
    attention comes from the trained network's view of the key image). A constant map pools to its average.
    """
    src = v if attention is None else attention
    if src.shape[0] != v.shape[0] or src.shape[-2:] != v.shape[-2:]:
        raise ValueError(f"A-pool: attention map {tuple(src.shape)} does not match the map {tuple(v.shape)}")
    b, _, h, w = v.shape
    member = patch_membership(h, w, grid, v.device).to(_wide(v).dtype)  # [h*w, P]
    counts = member.sum(dim=0)  # [P]
    s = _wide(src).flatten(2)  # [B, C', h*w]
    means = (s @ member) / counts  # [B, C', P]
    dots = torch.einsum("bcn,bcp,np->bn", s, means, member)  # <v_ij, mean of its patch>
    totals = dots @ member  # [B, P]
    weights = dots / (totals @ member.T).clamp_min(eps)  # [B, h*w], each patch's weights sum to 1
    pooled = (_wide(v).flatten(2) * weights.unsqueeze(1)) @ member  # [B, C, P]
    return pooled.transpose(1, 2)


def patch_membership(h: int, w: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """[h*w, P] one-hot: which of the ``grid`` patches each position of an h x w map belongs to."""
    gh, gw = grid
    rows = torch.arange(h, device=device) * gh // h
    cols = torch.arange(w, device=device) * gw // w
    patch = (rows[:, None] * gw + cols[None, :]).reshape(-1)
    return F.one_hot(patch, gh * gw).float()


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE of queries ``q`` [N, D] against their positives ``k`` [N, D] and the negatives ``queue`` [K, D]
    (all L2-normalised): mean cross-entropy of ``[q . k, q . queue] / T`` with target 0, and the fraction of
    instances whose positive scores highest. A key equal to its query with orthogonal negatives gives
    ``log(1 + K exp(-1 / T))``."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.T
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    acc = (logits.argmax(dim=1) == 0).float().mean()
    return F.cross_entropy(logits, target), acc


def projection(channels: int, dim: int) -> nn.Sequential:
    """CSG's projection head of one stage: ``Linear(C, C) - ReLU - Linear(C, dim)``."""
    return nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True), nn.Linear(channels, dim))


class KeyQueue:
    """A first-in-first-out queue of ``size`` keys [size, dim] per stage with a write pointer that wraps."""

    def __init__(self, size: int, dim: int, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.keys = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
        self.ptr = 0

    def push(self, keys: Tensor) -> None:
        """Write ``keys`` [n, dim] over the oldest entries (the pointer wraps; only the last ``size`` of a batch
        larger than the queue stay)."""
        size = len(self.keys)
        keys = keys.detach()[-size:].to(self.keys.device, self.keys.dtype)
        n = len(keys)
        pos = (self.ptr + torch.arange(n, device=self.keys.device)) % size
        self.keys[pos] = keys
        self.ptr = (self.ptr + n) % size


class CSG(MethodBase):
    """CE + ``method.csg_weight`` x the multi-stage InfoNCE against the frozen teacher (see the module docstring)."""

    knobs = (Knob("method.csg_weight", 1e-3, 100.0, (0.01, 0.1, 1.0)),)
    needs_teacher = False  # the trainer's teacher outputs are not used: CSG runs the teacher itself on the key view

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.views: Views | None = None  # set up once the task is known ("auto": by task)
        self.teacher: nn.Module | None = None
        self.key_encoder: Any = None  # the frozen teacher's Backbone (asg.models.base)
        self.mlp_q = nn.ModuleList()
        self.mlp_k = nn.ModuleList()
        self.queues: list[KeyQueue] = []
        self.stages: list[int] = []
        self.step = 0
        self.pending: list[tuple[Tensor, Tensor]] | None = None  # (keys [B, P, D], idx [B]) per stage, to enqueue

    # ------------------------------------------------------------------ set-up
    def bind_teacher(self, teacher: nn.Module) -> None:
        """The trainer's frozen ImageNet teacher (``asg.models.Teacher``): its backbone is the key encoder."""
        self.teacher = teacher

    def setup(self, model: nn.Module) -> None:
        if self.teacher is None:
            raise ConfigError(
                "method csg needs the frozen teacher as its key encoder; the trainer binds it "
                "(Method.bind_teacher) before set-up"
            )
        if not hasattr(model, "forward_with_stages"):
            raise ConfigError(f"method csg needs a network with stage maps, not {type(model).__name__}")
        backbone = cast(Any, model).backbone
        n = len(backbone.stage_channels)
        self.stages = []
        for s in self.cfg.csg_stages:
            if not -n <= s < n:
                raise ConfigError(
                    f"method.csg_stages={list(self.cfg.csg_stages)}: {type(backbone).__name__} has "
                    f"{n} stage maps (indices 0..{n - 1}, or -{n}..-1)"
                )
            self.stages.append(s % n)
        if len(set(self.stages)) != len(self.stages) or not self.stages:
            raise ConfigError(f"method.csg_stages={list(self.cfg.csg_stages)}: name each stage once, at least one")
        dense = _is_segmenter(model)
        augment = self.cfg.csg_augment
        if augment == "auto":
            augment = "jitter" if dense else "randaugment"
        if dense and augment == "randaugment":
            raise ConfigError(
                "method.csg_augment=randaugment shears, rotates and translates the query view, so the "
                "segmentation labels would no longer fit it: use jitter (the key view colour-"
                "jittered, as CSG's GTA5 loader) or none"
            )
        ra = self.cfg.csg_randaugment
        self.views = Views(augment, ra[0], ra[1], self.cfg.csg_jitter)
        key = cast(Any, self.teacher).backbone
        if key.output_stride != backbone.output_stride:  # a dilated student: its maps line up with a dilated key
            key = copy.deepcopy(key)
            key.set_output_stride(backbone.output_stride)
            for p in key.parameters():
                p.requires_grad_(False)
        self.key_encoder = key.eval()
        device = next(model.parameters()).device
        dim = self.cfg.csg_dim
        self.mlp_q = nn.ModuleList(projection(backbone.stage_channels[s], dim) for s in self.stages).to(device)
        self.mlp_k = copy.deepcopy(self.mlp_q)
        self.mlp_q.requires_grad_(self.cfg.csg_train_mlp)
        self.mlp_k.requires_grad_(False)
        self.queues = [KeyQueue(self.cfg.csg_queue, dim, device, seed=i) for i in range(len(self.stages))]

    def extra_parameters(self) -> list[nn.Parameter]:
        """The query MLPs' parameters: they train with the new head (its group, its learning rate)."""
        return [p for p in self.mlp_q.parameters() if p.requires_grad]

    def begin_step(self, model: nn.Module, step: int) -> None:
        self.step = step

    # ------------------------------------------------------------------ the loss
    def forward_loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        if self.key_encoder is None or self.views is None:
            raise ConfigError("method csg was not set up (Method.setup) before its first step")
        xq, xk = self.views(batch.x, batch.idx, self.step)
        out, stages_q = cast(Any, model).forward_with_stages(xq)
        task = cross_entropy(out.logits, batch.y)
        dense = out.logits.ndim > 2
        backbone = cast(Any, model).backbone
        with torch.no_grad():
            enc = cast(Any, self.key_encoder)
            stages_k = enc.forward_dense(enc.normalize(xk))[0]
            stages_att = backbone.forward_dense(backbone.normalize(xk))[0] if self.cfg.csg_apool else None
        total = task.new_zeros(())
        accs, pending = [], []
        for j, s in enumerate(self.stages):
            vq, vk = stages_q[s], stages_k[s]
            if vq.shape[-2:] != vk.shape[-2:]:
                raise ConfigError(
                    f"method csg: stage {s} maps differ in size between the trained network "
                    f"{tuple(vq.shape)} and the key encoder {tuple(vk.shape)}"
                )
            grid = (min(self.cfg.csg_chunks, vq.shape[-2]), min(self.cfg.csg_chunks, vq.shape[-1])) if dense else (1, 1)
            if self.cfg.csg_apool:
                pq = a_pool(vq, grid)
                pk = a_pool(vk, grid, attention=stages_att[s] if stages_att is not None else None)
            else:
                pq, pk = _avg_pool(vq, grid), _avg_pool(vk, grid)
            b, p, _ = pq.shape
            q = F.normalize(_wide(self.mlp_q[j](pq.reshape(b * p, -1))), dim=1)
            with torch.no_grad():
                k = F.normalize(_wide(self.mlp_k[j](pk.reshape(b * p, -1))), dim=1).to(q.dtype)
            loss, acc = info_nce(q, k, self.queues[j].keys.to(q.dtype), self.cfg.csg_temperature)
            total = total + loss
            accs.append(acc)
            pending.append((k.reshape(b, p, -1), batch.idx))
        self.pending = pending
        logs = {"task_loss": task.detach(), "csg": total.detach(), "csg_acc": torch.stack(accs).mean().detach()}
        return LossOutput(task + self.cfg.csg_weight * total, logs)

    def loss(self, out, labels: Tensor, teacher_logits: Tensor | None) -> LossOutput:
        raise ConfigError(
            "method csg computes its loss from two views of the batch (forward_loss), not from one forward pass"
        )

    # ------------------------------------------------------------------ after the step
    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Momentum update of the key MLPs, then this step's keys (of every process) into the queues."""
        m = self.cfg.csg_momentum
        for pq_, pk_ in zip(self.mlp_q.parameters(), self.mlp_k.parameters()):
            pk_.mul_(m).add_(pq_.detach(), alpha=1.0 - m)
        if self.pending is None:
            return
        for queue, (keys, idx) in zip(self.queues, self.pending):
            queue.push(gather_keys(keys, idx))
        self.pending = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Both MLPs, the queues and their pointers (the checkpoint's ``method`` entry)."""
        return {
            "mlp_q": {k: v.detach().cpu().clone() for k, v in self.mlp_q.state_dict().items()},
            "mlp_k": {k: v.detach().cpu().clone() for k, v in self.mlp_k.state_dict().items()},
            "queues": [q.keys.detach().cpu().clone() for q in self.queues],
            "pointers": torch.tensor([q.ptr for q in self.queues], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        saved = state["queues"]
        if len(saved) != len(self.queues) or any(s.shape != q.keys.shape for s, q in zip(saved, self.queues)):
            shapes = [tuple(s.shape) for s in saved]
            raise ConfigError(
                f"method csg: the checkpoint's queues {shapes} do not fit method.csg_stages / csg_queue / csg_dim "
                "of this run (resume with the settings it was saved with)"
            )
        self.mlp_q.load_state_dict(state["mlp_q"])  # in place: the optimizer keeps the same parameters
        self.mlp_k.load_state_dict(state["mlp_k"])
        for q, keys, ptr in zip(self.queues, saved, state["pointers"].tolist()):
            q.keys.copy_(keys)
            q.ptr = int(ptr)


def _is_segmenter(model: nn.Module) -> bool:
    from asg.models.segmenter import ASGSegmenter

    return isinstance(model, ASGSegmenter)


def _avg_pool(v: Tensor, grid: tuple[int, int]) -> Tensor:
    """Plain average of each patch of ``v`` [B, C, h, w] -> [B, P, C] (``method.csg_apool=false``)."""
    member = patch_membership(v.shape[-2], v.shape[-1], grid, v.device).to(_wide(v).dtype)
    return ((_wide(v).flatten(2) @ member) / member.sum(dim=0)).transpose(1, 2)


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it is (half-precision maps are pooled and compared in float32)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gather_keys(keys: Tensor, idx: Tensor) -> Tensor:
    """This step's keys of every process, in the order of the global batch: ``keys`` [B_r, P, D] of this rank's
    images ``idx`` [B_r] -> [N, D] rows.

    Rank r holds the slots ``r::world`` of each global batch (``asg.engine.distributed``), so slot ``r + j *
    world`` is rank r's j-th image; the images are put back in slot order, and an image that appears twice (a rank
    with no share of a last, partial batch repeats the batch's first image) is kept once. One process: ``keys``.
    """
    parts = all_gather_rows(keys)
    if len(parts) == 1:
        return keys.reshape(-1, keys.shape[-1])
    images = all_gather_rows(idx.to(keys.device, torch.long))
    world = len(parts)
    slots = sorted((r + j * world, r, j) for r, part in enumerate(parts) for j in range(len(part)))
    seen, rows = set(), []
    for _, r, j in slots:
        image = int(images[r][j])
        if image not in seen:
            seen.add(image)
            rows.append(parts[r][j])
    return torch.cat(rows).to(keys.device)
