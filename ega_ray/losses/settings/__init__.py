"""Each distiller's own settings: a pydantic model per method, in a module of its own that imports no torch.

The config's ``distill`` section keeps what every method shares and takes the chosen method's settings
under a key named by the method (``distill.ega.node_weight``, ``distill.crd.negatives``): the section's
model is assembled from ``ega_ray.losses.SETTINGS`` (see ``ega_ray.config_distill``). A loss's file holds
its math and imports torch; its settings live here, next to it by name (``losses/ega.py`` →
``losses/settings/ega.py``), so that checking a config stays torch-free. Adding a loss is its file, its
settings model and one line in ``ega_ray.losses.METHODS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from ega_ray.config import Config


class MethodSettings(BaseModel):
    """The settings of one distiller (fields with defaults, bounds and descriptions); none by default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def check_with(self, cfg: Config) -> None:
        """Rules that relate these settings to other sections (raise ValueError naming the fields)."""
