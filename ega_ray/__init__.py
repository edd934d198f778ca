"""ega-ray: distill self-supervised teachers into any student with Embedding Graph Alignment, on Ray."""

__version__ = "0.1.0"
