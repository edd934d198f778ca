"""Embedding Graph Alignment (EGA).

Ma, Chen, Akata. "Distilling Knowledge from Self-Supervised Teacher by Embedding Graph Alignment."
BMVC 2022.

Teacher embeddings T and student embeddings S (B × d, already projected to the joint space) are stacked
into Z = [T; S] (2B × d) and turned into a graph by Pearson correlation, C = corr(Z) (2B × 2B):

    E_t = C[:B, :B]   teacher-teacher edges
    E_s = C[B:, B:]   student-student edges
    N   = C[:B, B:]   teacher-student (node) correspondences

Hard graph (``temperature=None``, the paper's loss)::

    L = w_node · ‖N − I‖_F + w_edge · ‖E_t − E_s‖_F

Soft graph (``temperature=τ > 0``): each row of a graph becomes a distribution softmax(row / τ)::

    L_node = ½ [ CE(softmax(N / τ), I) + CE(softmax(Nᵀ / τ), I) ]      (each node finds its twin)
    L_edge = mean_i KL( softmax(E_t[i, ≠i] / τ) ‖ softmax(E_s[i, ≠i] / τ) )
    L      = w_node · L_node + w_edge · L_edge

Self-loops are left out of the soft edge rows: both graphs have 1 there, so they only dilute the rows.

Under DDP (``global_graph=True``, the default) the graph spans the global batch: embeddings are gathered
from every rank with gradients flowing back to each rank's own rows, so every rank computes the loss of
the whole batch and the DDP-averaged gradients equal those of one process holding that batch.

Graph size (``graph_size=g``): the graph is a method choice (the paper's has 64 nodes because its batch is
64), the batch a throughput knob. With ``g`` set, the global batch (rank-major order) is cut into
consecutive groups of ``g`` rows, each group is one graph, and the loss is the mean over graphs:

    L = (1 / G) Σ_k L_graph(T_k, S_k),      G = global batch / g

When the per-rank batch is a multiple of ``g`` every graph lies within one rank and nothing is gathered
(DDP's gradient averaging over equal ranks is then the mean over all graphs); otherwise the batch is
gathered first. ``graph_size=None`` keeps one graph per global batch (or per rank, ``global_graph=False``).

The graph is computed in float32 (float64 inputs stay float64), also under bf16 autocast. A constant
embedding row has no defined correlation; it is treated as uncorrelated with everything (finite loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ega_ray.losses.base import Distiller, check_pair
from ega_ray.losses.distributed import gather_global

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig


def pearson_graph(z: Tensor) -> Tensor:
    """Pearson correlation between the rows of ``z`` (n × d) → (n × n), in at least float32."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    zc = z - z.mean(dim=1, keepdim=True)
    # a constant row is exactly uncorrelated with everything (rounding of its mean must not decide it)
    zc = zc.masked_fill((z == z[:, :1]).all(dim=1, keepdim=True), 0.0)
    zn = zc * torch.rsqrt(zc.square().sum(dim=1, keepdim=True).clamp_min(torch.finfo(zc.dtype).tiny))
    return zn @ zn.T


class EGALoss(Distiller):
    # its own knobs for ``ega-ray benchmark --tune-trials`` (the learning rate is searched for every method)
    search_space: ClassVar[dict[str, dict]] = {
        "distill.ega.temperature": {"type": "loguniform", "low": 0.03, "high": 1.0, "include_none": True},
        "distill.ega.node_weight": {"type": "uniform", "low": 0.1, "high": 2.0},
        "distill.ega.edge_weight": {"type": "uniform", "low": 0.05, "high": 1.0},
    }

    @classmethod
    def from_config(cls, d: DistillConfig, num_samples: int, seed: int) -> EGALoss:
        s = d.ega
        return cls(s.node_weight, s.edge_weight, s.temperature, d.global_graph, s.graph_size)

    def __init__(
        self,
        node_weight: float = 0.8,
        edge_weight: float = 0.24,
        temperature: float | None = None,
        global_graph: bool = True,
        graph_size: int | None = None,
    ) -> None:
        """The loss as configured; a bad value is a ValueError naming it.

        Args:
            node_weight: weight of the node term ‖N − I‖ (teacher–student correspondences), >= 0.
            edge_weight: weight of the edge term ‖E_t − E_s‖ (teacher–teacher vs student–student), >= 0.
            temperature: None for the paper's hard graph (Frobenius norms); τ > 0 for the soft graph.
            global_graph: one graph over every rank's rows (all_gather with gradients), as on one process.
            graph_size: instances per graph (>= 2): the batch is cut into graphs of this size; None: one graph.
        """
        super().__init__()
        if graph_size is not None and graph_size < 2:
            raise ValueError(f"EGA graph_size must be >= 2 or None, got {graph_size}")
        self.graph_size = graph_size
        if node_weight < 0 or edge_weight < 0:
            raise ValueError(f"EGA weights must be >= 0, got node_weight={node_weight}, edge_weight={edge_weight}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"EGA temperature must be > 0 or None, got {temperature}")
        self.node_weight, self.edge_weight = node_weight, edge_weight
        self.temperature, self.global_graph = temperature, global_graph

    def forward(self, teacher_emb: Tensor, student_emb: Tensor, **_: Tensor | None) -> Tensor:
        check_pair("EGA", teacher_emb, student_emb)
        g = self.graph_size
        if (g is None and self.global_graph) or (g is not None and teacher_emb.shape[0] % g):
            teacher_emb, student_emb = gather_global(teacher_emb), gather_global(student_emb)
        if g is None:
            g = teacher_emb.shape[0]
        elif teacher_emb.shape[0] % g:
            raise ValueError(f"EGA graph_size {g} does not divide the global batch of {teacher_emb.shape[0]} rows")
        with torch.autocast(device_type=student_emb.device.type, enabled=False):
            graphs = [self._graph_loss(t, s) for t, s in zip(teacher_emb.split(g), student_emb.split(g), strict=True)]
            return torch.stack(graphs).mean()

    def _graph_loss(self, t: Tensor, s: Tensor) -> Tensor:
        b = t.shape[0]
        dtype = torch.promote_types(t.dtype, s.dtype)
        c = pearson_graph(torch.cat([t.to(dtype), s.to(dtype)], 0))
        e_t, e_s, n = c[:b, :b], c[b:, b:], c[:b, b:]
        if self.temperature is None:
            eye = torch.eye(b, device=c.device, dtype=c.dtype)
            return self.node_weight * torch.linalg.matrix_norm(n - eye) + self.edge_weight * torch.linalg.matrix_norm(
                e_t - e_s
            )
        tau = self.temperature
        target = torch.arange(b, device=c.device)
        node = 0.5 * (F.cross_entropy(n / tau, target) + F.cross_entropy(n.T / tau, target))
        off_diag = ~torch.eye(b, dtype=torch.bool, device=c.device)
        rows_t = (e_t[off_diag].view(b, b - 1)) / tau
        rows_s = (e_s[off_diag].view(b, b - 1)) / tau
        edge = F.kl_div(F.log_softmax(rows_s, 1), F.log_softmax(rows_t, 1), log_target=True, reduction="batchmean")
        return self.node_weight * node + self.edge_weight * edge

    def extra_repr(self) -> str:
        return (
            f"node_weight={self.node_weight}, edge_weight={self.edge_weight}, "
            f"temperature={self.temperature}, global_graph={self.global_graph}, graph_size={self.graph_size}"
        )
