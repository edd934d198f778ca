"""ShuffleNet V1 for CIFAR (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", CVPR 2018), in the 32px variant used as a student by CRD (Tian et al., 2020).

A 1x1 stem to 24 channels, then three stages (out planes 240, 480, 960; 4, 8, 4 units; groups 3).
The first unit of each stage has stride 2 and concatenates an average-pooled shortcut.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ega_ray.models.students.common import init_conv_bn


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, with an add or concat shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_planes // 4
        # The first unit after the 24-channel stem uses an ungrouped 1x1 conv, as in the paper.
        self.groups = 1 if in_planes == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=self.groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(channel_shuffle(out, self.groups)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 for 32px inputs."""

    def __init__(
        self,
        out_planes: tuple[int, ...] = (240, 480, 960),
        repeats: tuple[int, ...] = (4, 8, 4),
        groups: int = 3,
    ) -> None:
        super().__init__()
        in_planes = 24
        self.stem = nn.Sequential(
            nn.Conv2d(3, in_planes, 1, bias=False), nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)
        )
        units: list[nn.Module] = []
        for planes, n in zip(out_planes, repeats, strict=True):
            # The first, stride-2 unit concatenates its input, so its branch only adds the difference.
            units.append(ShuffleUnit(in_planes, planes - in_planes, 2, groups))
            units += [ShuffleUnit(planes, planes, 1, groups) for _ in range(n - 1)]
            in_planes = planes
        self.units = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = in_planes
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.units(self.stem(x))).flatten(1)


def shufflenet_v1() -> ShuffleNetV1:
    """ShuffleNet V1, groups 3, out planes 240-480-960; feat_dim 960."""
    return ShuffleNetV1()
