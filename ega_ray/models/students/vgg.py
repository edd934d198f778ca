"""VGG-13 with BatchNorm for 32px inputs (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), laid out as in CRD (Tian et al., ICLR 2020).

Five groups of two 3x3 conv-BN-ReLU layers (64, 128, 256, 512, 512) with 2x2 max-pools between them
and a global average pool at the end. As in CRD, the pool after the fourth group is skipped when its
map is already 4x4 or smaller (32px input), so the last group still sees a 4x4 map.
"""

from __future__ import annotations

from torch import Tensor, nn

from ega_ray.models.students.common import init_conv_bn


def _group(in_planes: int, planes: int, convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(convs):
        layers += [nn.Conv2d(in_planes, planes, 3, padding=1), nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
        in_planes = planes
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG with BatchNorm; ``cfg`` lists (width, convs) per group."""

    def __init__(self, cfg: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        groups: list[nn.Module] = []
        in_planes = 3
        for planes, convs in cfg:
            groups.append(_group(in_planes, planes, convs))
            in_planes = planes
        self.groups = nn.ModuleList(groups)
        self.maxpool = nn.MaxPool2d(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = in_planes
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.groups) - 1
        for i, group in enumerate(self.groups):
            x = group(x)
            if i < last - 1 or (i == last - 1 and x.shape[-1] > 4):
                x = self.maxpool(x)
        return self.pool(x).flatten(1)


def vgg13() -> VGG:
    """VGG-13-BN: groups 64, 128, 256, 512, 512 of two convs each; feat_dim 512."""
    return VGG(((64, 2), (128, 2), (256, 2), (512, 2), (512, 2)))
