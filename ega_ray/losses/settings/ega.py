"""EGA's settings (``distill.ega``): the graph's weights, temperature and size; the math is in ``losses/ega.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ega_ray.losses.settings import MethodSettings

if TYPE_CHECKING:
    from ega_ray.config import Config


class EGASettings(MethodSettings):
    node_weight: float = Field(0.8, ge=0, description="weight of the node term (teacher–student correspondences)")
    edge_weight: float = Field(
        0.24, ge=0, description="weight of the edge term (teacher–teacher vs student–student correlations)"
    )
    temperature: float | None = Field(
        None,
        gt=0,
        description="null: the paper's hard graph (Frobenius norms); τ > 0: the soft graph (softmax of each "
        "row / τ, cross-entropy for nodes, KL for edges)",
    )
    graph_size: int | None = Field(
        64,
        ge=2,
        description="instances per graph, dividing optim.batch_size: each global batch is cut into graphs of "
        "this many rows (the same grouping on every worker) and the loss is their mean; null: one graph per "
        "global batch (the paper's setting whenever the batch is 64). The batch then is a throughput knob and "
        "the graph a method choice; scale the learning rate with optim.lr_scaling when the batch grows "
        "(docs/performance.md)",
    )

    def check_with(self, cfg: Config) -> None:
        g, b = self.graph_size, cfg.optim.batch_size
        if g is not None and b % g:
            raise ValueError(
                f"distill.ega.graph_size {g} must divide optim.batch_size {b} (the batch is cut into graphs of "
                f"graph_size instances; null: one graph per batch)"
            )
