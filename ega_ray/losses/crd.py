"""Contrastive Representation Distillation (CRD), with its memory bank.

Tian, Krishnan, Isola. "Contrastive Representation Distillation." ICLR 2020.

Student and teacher embeddings are L2-normalised (z_s, z_t). A memory keeps one slot per training row for
each side (M_s, M_t: N × d). For a batch with dataset indices idx, K noise rows are drawn uniformly from
the memory; with h(a, b) = exp(a·b / τ) / Z (Z fixed from the first batch, Z = N · mean h):

    student anchor:  positive h(z_s,i, M_t[idx_i]),  negatives h(z_s,i, M_t[n_ik])
    teacher anchor:  positive h(z_t,i, M_s[idx_i]),  negatives h(z_t,i, M_s[n_ik])
    NCE(h) = −(1/B) Σ_i [ log( h_i0 / (h_i0 + K/N) ) + Σ_k log( (K/N) / (h_ik + K/N) ) ]
    L = NCE(student anchor) + NCE(teacher anchor)

then the rows idx are updated: M[idx] ← normalize(m · M[idx] + (1 − m) · z), m = 0.5. τ = 0.07 and
K = 16384 as in the paper (K is capped at N − 1 on small datasets). Here the teacher's embedding arrives
detached (the teacher head learns from its own cross-entropy), so only the student-anchored term trains.

Under DDP embeddings and indices are gathered: every rank computes the whole batch's loss, draws the same
noise (a generator seeded by the step) and applies the same updates, so the memories stay identical on
every rank without any other communication. They are buffers of this module: the training loop saves
them in its checkpoints and restores them on resume.

``bank="queue"``: for datasets whose N × d memory should not sit on every GPU, a FIFO of the last
``bank_size`` embeddings per side replaces it (MoCo-style): noise comes from the queue, the positive is
the other side's current embedding, and each batch is enqueued after the step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair, need
from ega_ray.losses.distributed import gather_global

EPS = 1e-7


def nce_contrast(h: Tensor, noise: int, bank_size: int) -> Tensor:
    """CRD's NCE on scores h (B × (1 + K)); column 0 is the positive."""
    k_pn = noise / bank_size
    log_d1 = torch.log(h[:, 0] / (h[:, 0] + k_pn + EPS))
    log_d0 = torch.log(k_pn / (h[:, 1:] + k_pn + EPS))
    return -(log_d1.sum() + log_d0.sum()) / h.shape[0]


class CRDLoss(Distiller):
    default_beta = 0.8

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
    ) -> None:
        super().__init__()
        if bank not in ("dataset", "queue"):
            raise ValueError(f"CRD bank must be 'dataset' or 'queue', got {bank!r}")
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
        self.register_buffer("z", torch.full((2,), -1.0, dtype=torch.float64))  # Z of both anchors, set once
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("head", torch.zeros((), dtype=torch.int64))  # queue: next write position

    def forward(
        self, teacher_emb: Tensor, student_emb: Tensor, *, index: Tensor | None = None, **_: Tensor | None
    ) -> Tensor:
        check_pair("CRD", teacher_emb, student_emb)
        index = need("crd", "index (the rows' dataset indices)", index)
        if self.global_batch:
            teacher_emb, student_emb, index = map(gather_global, (teacher_emb, student_emb, index))
        with torch.autocast(device_type=student_emb.device.type, enabled=False):  # exp(·/τ): full precision
            return self._loss(teacher_emb, student_emb, index)

    def _loss(self, teacher_emb: Tensor, student_emb: Tensor, index: Tensor) -> Tensor:
        z_s = F.normalize(student_emb.to(self.memory_s.dtype), dim=1)
        z_t = F.normalize(teacher_emb.to(self.memory_s.dtype), dim=1)
        n = len(z_s)
        if self.bank == "dataset":
            if int(index.min()) < 0 or int(index.max()) >= self.bank_size:
                raise ValueError(f"CRD: dataset index outside 0..{self.bank_size - 1} (the memory's size)")
            pos_t, pos_s = self.memory_t[index], self.memory_s[index]
        else:
            pos_t, pos_s = z_t.detach(), z_s.detach()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        noise = torch.randint(0, self.bank_size, (n, self.negatives), generator=g).to(z_s.device)
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
        self._update(index, z_s.detach(), z_t.detach())
        return loss

    @torch.no_grad()
    def _update(self, index: Tensor, z_s: Tensor, z_t: Tensor) -> None:
        self.step += 1
        if not self.training:
            return
        if self.bank == "dataset":
            m = self.momentum
            self.memory_s[index] = F.normalize(self.memory_s[index] * m + z_s * (1 - m), dim=1)
            self.memory_t[index] = F.normalize(self.memory_t[index] * m + z_t * (1 - m), dim=1)
            return
        rows = (int(self.head) + torch.arange(len(z_s), device=z_s.device)) % self.bank_size
        self.memory_s[rows], self.memory_t[rows] = z_s, z_t
        self.head.copy_((self.head + len(z_s)) % self.bank_size)

    def extra_repr(self) -> str:
        return (
            f"bank={self.bank}, bank_size={self.bank_size}, negatives={self.negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}"
        )
