"""Contrastive Representation Distillation (CRD), with its memory bank.

Tian, Krishnan, Isola. "Contrastive Representation Distillation." ICLR 2020; computed as CRD's repository
does (github.com/HobbitLong/RepDistiller: ``crd/criterion.py``, ``crd/memory.py``, and the negatives of
its CIFAR-100 recipe, ``dataset/cifar100.py`` with ``mode='exact'``).

Student and teacher embeddings are L2-normalised (z_s, z_t). A memory keeps one slot per training row for
each side (M_s, M_t: N × d). For a batch with dataset indices idx, K noise rows n_ik are drawn from the
memory (below); with h(a, b) = exp(a·b / τ) / Z (Z fixed from the first batch, Z = N · mean h):

    student anchor:  positive h(z_s,i, M_t[idx_i]),  negatives h(z_s,i, M_t[n_ik])
    teacher anchor:  positive h(z_t,i, M_s[idx_i]),  negatives h(z_t,i, M_s[n_ik])
    NCE(h) = −(1/B) Σ_i [ log( h_i0 / (h_i0 + K/N) ) + Σ_k log( (K/N) / (h_ik + K/N) ) ]
    L = NCE(student anchor) + NCE(teacher anchor)

then the rows idx are updated: M[idx] ← normalize(m · M[idx] + (1 − m) · z), m = 0.5. τ = 0.07 and
K = 16384 as in the paper (K is capped at N − 1 on small datasets). Here the teacher's embedding arrives
detached (the teacher head learns from its own cross-entropy), so only the student-anchored term trains.

Negatives (``negatives_from``). ``other_class`` (the default; RepDistiller's CIFAR recipe): an anchor of
class c draws its K noise slots from the slots whose class is not c, so a negative never shares the
anchor's class. ``any``: uniformly from every slot (RepDistiller's memory without the dataset's draw).
A slot's class is the label of the row whose embedding it last received (a buffer, ``memory_labels``,
kept with the memory); a slot that holds no labeled row (never written yet, or an unlabeled row: label
−1) belongs to no class and may be drawn by every anchor. Unlabeled anchors (label −1) draw from every
slot; so does an anchor whose class fills the whole memory (there is nothing else to draw). The draw: a
generator seeded by (seed, step) gives 62-bit integers r_ik; the allowed slots of anchor i, listed in
ascending (class, slot) order, give n_ik = allowed_i[r_ik mod |allowed_i|].

Deliberate departures from RepDistiller, and why:

- Classes of slots are learned as rows are written, not read from the whole dataset up front (the loss
  sees batches, not the dataset): during the first epoch a not-yet-written slot may be drawn by an anchor
  of its row's class. Such a slot holds its random initialisation, not an embedding of that class. From
  the second epoch on every slot has its class and the draw is the recipe's.
- Draws are with replacement; the recipe draws without replacement when K is at most the number of
  other-class rows. Each noise slot is uniform over the allowed slots either way, so the expected loss and
  gradient are the same; only their variance differs.

Under DDP embeddings, indices and labels are gathered: every rank computes the whole batch's loss, draws the
same noise (a generator seeded by the step) and applies the same updates, so the memories (and their
classes) stay identical on every rank without any other communication. They are buffers of this module:
the training loop saves them in its checkpoints and restores them on resume.

``bank="queue"``: for datasets whose N × d memory should not sit on every GPU, a FIFO of the last
``bank_size`` embeddings per side replaces it (MoCo-style): noise comes from the queue, the positive is
the other side's current embedding, and each batch is enqueued after the step, with its labels, so that
``other_class`` works there too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair, need
from ega_ray.losses.distributed import gather_global

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig

EPS = 1e-7
NEGATIVES_FROM = ("other_class", "any")


def nce_contrast(h: Tensor, noise: int, bank_size: int) -> Tensor:
    """CRD's NCE on scores h (B × (1 + K)); column 0 is the positive."""
    k_pn = noise / bank_size
    log_d1 = torch.log(h[:, 0] / (h[:, 0] + k_pn + EPS))
    log_d0 = torch.log(k_pn / (h[:, 1:] + k_pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / h.shape[0]


class CRDLoss(Distiller):
    search_space: ClassVar[dict[str, dict]] = {
        "distill.crd.temperature": {"type": "loguniform", "low": 0.03, "high": 0.3},
        "distill.beta": {"type": "uniform", "low": 0.2, "high": 2.0},
    }
    default_beta = 0.8

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> CRDLoss:
        s = d.crd
        size = num_samples if s.bank == "dataset" else s.queue_size
        return cls(
            d.embed_dim,
            size,
            s.negatives,
            s.temperature,
            s.momentum,
            s.bank,
            d.global_graph,
            seed,
            negatives_from=s.negatives_from,
        )

    def __init__(
        self,
        embed_dim: int,
        bank_size: int,
        negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        bank: str = "dataset",
        global_batch: bool = True,
        seed: int = 0,
        negatives_from: str = "other_class",
    ) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            embed_dim: the width of both embeddings (the joint space).
            bank_size: memory slots per side: the training rows (``bank='dataset'``) or the queue's length.
            negatives: noise rows per anchor (at most ``bank_size - 1``).
            temperature: temperature of the scores (> 0).
            momentum: memory update M ← normalize(m·M + (1−m)·z), 0 <= m < 1.
            bank: ``dataset`` (one slot per training row, the paper) or ``queue`` (the latest rows).
            global_batch: gather every rank's rows first (all_gather with gradients), so the loss is the global
                batch's, as on one process.
            seed: seeds the memory's initial values and, with the step, each step's noise draws (the same on
                every rank).
            negatives_from: ``other_class`` (noise from other classes' slots only) or ``any``.
        """
        super().__init__()
        if bank not in ("dataset", "queue"):
            raise ValueError(f"CRD bank must be 'dataset' or 'queue', got {bank!r}")
        if negatives_from not in NEGATIVES_FROM:
            raise ValueError(f"CRD negatives_from must be 'other_class' or 'any', got {negatives_from!r}")
        self.negatives_from = negatives_from
        if bank_size < 2 or negatives < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"CRD needs bank_size >= 2, negatives >= 1, temperature > 0, 0 <= momentum < 1; got {bank_size}, "
                f"{negatives}, {temperature}, {momentum}"
            )
        self.bank, self.bank_size = bank, bank_size
        self.negatives = min(negatives, bank_size - 1)
        self.temperature, self.momentum, self.global_batch, self.seed = temperature, momentum, global_batch, seed
        g = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(embed_dim / 3)
        self.register_buffer("memory_s", (torch.rand(bank_size, embed_dim, generator=g) * 2 - 1) * stdv)
        self.register_buffer("memory_t", (torch.rand(bank_size, embed_dim, generator=g) * 2 - 1) * stdv)
        # the class of the row each slot last received; -1: none (never written, or an unlabeled row)
        self.register_buffer("memory_labels", torch.full((bank_size,), -1, dtype=torch.int64))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))  # Z of both anchors, set once
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("head", torch.zeros((), dtype=torch.int64))  # queue: next write position

    def forward(
        self,
        teacher_emb: Tensor,
        student_emb: Tensor,
        *,
        index: Tensor | None = None,
        labels: Tensor | None = None,
        **_: Tensor | None,
    ) -> Tensor:
        """``labels`` (B,), −1 for unlabeled rows; None: every row unlabeled."""
        check_pair("CRD", teacher_emb, student_emb)
        index = need("crd", "index (the rows' dataset indices)", index)
        if labels is None:
            labels = torch.full_like(index, -1)
        if labels.shape != index.shape:
            raise ValueError(f"CRD: labels {tuple(labels.shape)} and index {tuple(index.shape)} differ in shape")
        if self.global_batch:
            teacher_emb, student_emb, index, labels = map(gather_global, (teacher_emb, student_emb, index, labels))
        with torch.autocast(device_type=student_emb.device.type, enabled=False):  # exp(·/τ): full precision
            return self._loss(teacher_emb, student_emb, index, labels.to(self.memory_labels))

    def draw_noise(self, labels: Tensor) -> Tensor:
        """(B, K) noise slots for anchors of classes ``labels`` (−1: none), at the current step (docstring)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        device = self.memory_labels.device
        if self.negatives_from == "any":
            return torch.randint(0, self.bank_size, (len(labels), self.negatives), generator=g).to(device)
        r = torch.randint(0, 1 << 62, (len(labels), self.negatives), generator=g).to(device)
        # slots in ascending (class, slot) order; the slots of class c are one block [start_c, end_c) of it
        sorted_classes, order = torch.sort(self.memory_labels, stable=True)
        start = torch.searchsorted(sorted_classes, labels, side="left")
        excluded = torch.searchsorted(sorted_classes, labels, side="right") - start
        # unlabeled anchors, and anchors whose class fills the memory, exclude nothing
        excluded = torch.where((labels < 0) | (excluded == self.bank_size), 0, excluded)
        pos = r % (self.bank_size - excluded)[:, None]
        pos = pos + (pos >= start[:, None]) * excluded[:, None]  # skip the anchor's class block
        return order[pos]

    def _loss(self, teacher_emb: Tensor, student_emb: Tensor, index: Tensor, labels: Tensor) -> Tensor:
        z_s = F.normalize(student_emb.to(self.memory_s.dtype), dim=1)
        z_t = F.normalize(teacher_emb.to(self.memory_s.dtype), dim=1)
        if self.bank == "dataset":
            if int(index.min()) < 0 or int(index.max()) >= self.bank_size:
                raise ValueError(f"CRD: dataset index outside 0..{self.bank_size - 1} (the memory's size)")
            pos_t, pos_s = self.memory_t[index], self.memory_s[index]
        else:
            pos_t, pos_s = z_t.detach(), z_s.detach()
        noise = self.draw_noise(labels)
        w_t = torch.cat([pos_t[:, None], self.memory_t[noise]], 1)  # (n, 1 + K, d)
        w_s = torch.cat([pos_s[:, None], self.memory_s[noise]], 1)
        h_s = torch.exp(torch.bmm(w_t, z_s[:, :, None]).squeeze(2) / self.temperature)
        h_t = torch.exp(torch.bmm(w_s, z_t[:, :, None]).squeeze(2) / self.temperature)
        with torch.no_grad():
            if self.z[0] < 0:
                self.z.copy_(torch.stack([h_s.mean(), h_t.mean()]).double() * self.bank_size)
        z = self.z.to(h_s.dtype)
        loss = nce_contrast(h_s / z[0], self.negatives, self.bank_size)
        loss = loss + nce_contrast(h_t / z[1], self.negatives, self.bank_size)
        self._update(index, labels, z_s.detach(), z_t.detach())
        return loss

    @torch.no_grad()
    def _update(self, index: Tensor, labels: Tensor, z_s: Tensor, z_t: Tensor) -> None:
        self.step += 1
        if not self.training:
            return
        if self.bank == "dataset":
            m = self.momentum
            self.memory_s[index] = F.normalize(self.memory_s[index] * m + z_s * (1 - m), dim=1)
            self.memory_t[index] = F.normalize(self.memory_t[index] * m + z_t * (1 - m), dim=1)
            self.memory_labels[index] = labels
            return
        rows = (int(self.head) + torch.arange(len(z_s), device=z_s.device)) % self.bank_size
        self.memory_s[rows], self.memory_t[rows], self.memory_labels[rows] = z_s, z_t, labels
        self.head.copy_((self.head + len(z_s)) % self.bank_size)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        # checkpoints from before memory_labels existed: no slot has a class yet (they are learned again)
        state_dict.setdefault(prefix + "memory_labels", torch.full_like(self.memory_labels, -1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"bank={self.bank}, bank_size={self.bank_size}, negatives={self.negatives}, "
            f"negatives_from={self.negatives_from}, "
            f"temperature={self.temperature}, momentum={self.momentum}"
        )
