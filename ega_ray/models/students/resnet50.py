"""ResNet-50 for 32px inputs (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016),
as the CRD (Tian et al., ICLR 2020) and EGA papers use it on CIFAR: Bottleneck stages [3, 4, 6, 3] of
widths 64, 128, 256, 512 (x4 expansion) after a 3x3 stride-1 stem without max-pool.
"""

from __future__ import annotations

from torch import Tensor, nn

from ega_ray.models.students.common import init_conv_bn


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand, with an identity or 1x1 conv-BN projection shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarBottleneckResNet(nn.Module):
    """A Bottleneck ResNet with a 3x3 stride-1 stem and no max-pool, for 32px inputs."""

    def __init__(self, repeats: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        in_planes = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(3, in_planes, 3, 1, 1, bias=False), nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        for i, (planes, n) in enumerate(zip(widths, repeats, strict=True)):
            for j in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = in_planes
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def resnet50() -> CifarBottleneckResNet:
    """ResNet-50 for CIFAR: Bottleneck [3, 4, 6, 3]; feat_dim 2048."""
    return CifarBottleneckResNet((3, 4, 6, 3))
