"""The worker side of a run: what runs inside Ray Train's workers, one process per rank: the distillation
loop and its training step (``distill``), the teacher's SimCLR pretraining (``pretrain``), what both share
(``common``: seeding, the checkpoint state, reporting, failure injection, progress) and the non-finite loss
check (``divergence``). ``bench/`` runs the same step without Ray. Imports nothing of ``ega_ray.driver``."""
