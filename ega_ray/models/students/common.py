"""The weight initialisation shared by the student families."""

from __future__ import annotations

from torch import nn


def init_conv_bn(model: nn.Module) -> None:
    """Kaiming-normal init for every conv; BatchNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
