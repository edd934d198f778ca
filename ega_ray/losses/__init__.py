"""Distillation losses, one per file (lightly style), and the registry that picks one by name."""

from torch import nn

from ega_ray.losses.ega import EGALoss, pearson_graph
from ega_ray.losses.kd import KDLoss
from ega_ray.losses.ntxent import NTXentLoss
from ega_ray.registry import Registry

# A distiller compares teacher and student embeddings in the joint space: (B, d), (B, d) -> scalar.
DISTILLERS: Registry[nn.Module] = Registry("distiller")
DISTILLERS.register("ega")(EGALoss)

__all__ = ["DISTILLERS", "EGALoss", "KDLoss", "NTXentLoss", "pearson_graph"]
