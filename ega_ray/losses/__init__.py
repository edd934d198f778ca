"""Distillation losses, one per file (lightly style), and the registry that picks one by name.

``DISTILLERS.build(name, d=cfg.distill, num_samples=N, seed=s)`` makes the distiller that
``distill.method`` names; every distiller takes the teacher's and the student's embeddings (and, by
keyword, what else its method needs: see ``base.py``) and returns a scalar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ega_ray.losses.base import Distiller
from ega_ray.losses.ccl import CCLLoss
from ega_ray.losses.crd import CRDLoss
from ega_ray.losses.ega import EGALoss, pearson_graph
from ega_ray.losses.hint import HintLoss
from ega_ray.losses.kd import KDLoss, LogitKD
from ega_ray.losses.nce import NCELoss
from ega_ray.losses.ntxent import NTXentLoss
from ega_ray.losses.pkt import PKTLoss
from ega_ray.losses.rkd import RKDLoss
from ega_ray.registry import Registry

if TYPE_CHECKING:
    from ega_ray.config import DistillConfig

DISTILLERS: Registry[Distiller] = Registry("distiller")
# the class behind each name: its reference loss weights (default_gamma, default_beta) for the benchmark
DISTILLER_CLASSES: dict[str, type[Distiller]] = {
    "ega": EGALoss,
    "kd": LogitKD,
    "hint": HintLoss,
    "rkd": RKDLoss,
    "pkt": PKTLoss,
    "crd": CRDLoss,
    "nce": NCELoss,
    "ccl": CCLLoss,
}


@DISTILLERS.register("ega")
def ega(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return EGALoss(d.node_weight, d.edge_weight, d.temperature, d.global_graph, d.graph_size)


@DISTILLERS.register("kd")
def kd(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return LogitKD(d.kd_temperature)


@DISTILLERS.register("hint")
def hint(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return HintLoss()


@DISTILLERS.register("rkd")
def rkd(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return RKDLoss(d.rkd_distance_weight, d.rkd_angle_weight, d.global_graph)


@DISTILLERS.register("pkt")
def pkt(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return PKTLoss(d.global_graph)


@DISTILLERS.register("crd")
def crd(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    size = num_samples if d.crd_bank == "dataset" else d.crd_queue_size
    return CRDLoss(
        d.embed_dim,
        size,
        d.crd_negatives,
        d.crd_temperature,
        d.crd_momentum,
        d.crd_bank,
        d.global_graph,
        seed,
        negatives_from=d.crd_negatives_from,
    )


@DISTILLERS.register("nce")
def nce(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return NCELoss(d.contrast_temperature, d.global_graph)


@DISTILLERS.register("ccl")
def ccl(d: DistillConfig, num_samples: int, seed: int) -> Distiller:
    return CCLLoss(d.contrast_temperature, d.ccl_temperature, d.global_graph)


__all__ = [
    "DISTILLERS",
    "DISTILLER_CLASSES",
    "CCLLoss",
    "CRDLoss",
    "Distiller",
    "EGALoss",
    "HintLoss",
    "KDLoss",
    "LogitKD",
    "NCELoss",
    "NTXentLoss",
    "PKTLoss",
    "RKDLoss",
    "pearson_graph",
]
