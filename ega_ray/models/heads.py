"""Projection + classifier heads, as in the EGA paper: feature → Linear → joint space (d=256) → Linear."""

from __future__ import annotations

from torch import Tensor, nn


class EmbeddingHead(nn.Module):
    """Projects a feature into the joint embedding space and classifies from there.

    ``standardize`` puts a parameter-free BatchNorm before the projection. For the teacher's head this
    matters: post-ReLU features share a large mean, so a fresh projection makes every pair of teacher
    embeddings correlate (~0.9 on the embedded default), and the graph carries almost no structure.
    """

    def __init__(self, in_dim: int, embed_dim: int, num_classes: int, standardize: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False) if standardize else nn.Identity()
        self.proj = nn.Linear(in_dim, embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.proj(self.norm(feature))
        return emb, self.classifier(emb)


class StudentClassifier(nn.Module):
    """Backbone + head as one module: images in, (embedding, logits) out. What a run exports."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.backbone(x))
