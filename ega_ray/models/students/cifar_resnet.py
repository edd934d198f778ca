"""CIFAR ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2),
in the variants used by CRD (Tian et al., "Contrastive Representation Distillation", ICLR 2020) and EGA.

Depth is ``6n + 2``: a 3x3 stem and three stages of ``n`` BasicBlocks at strides 1, 2, 2.
The plain nets use widths 16-32-64; the ``x4`` nets use a 32-wide stem and stages 64-128-256.
"""

from __future__ import annotations

from torch import Tensor, nn

from ega_ray.models.students.common import init_conv_bn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ``depth``-layer CIFAR ResNet; ``widths`` is (stem, stage1, stage2, stage3)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        stem, *stages = widths
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        in_planes = stem
        for i, planes in enumerate(stages):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = in_planes
        init_conv_bn(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def resnet8() -> CifarResNet:
    """ResNet-8 (n=1, widths 16-32-64)."""
    return CifarResNet(8)


def resnet14() -> CifarResNet:
    """ResNet-14 (n=2, widths 16-32-64)."""
    return CifarResNet(14)


def resnet20() -> CifarResNet:
    """ResNet-20 (n=3, widths 16-32-64)."""
    return CifarResNet(20)


def resnet32() -> CifarResNet:
    """ResNet-32 (n=5, widths 16-32-64)."""
    return CifarResNet(32)


def resnet44() -> CifarResNet:
    """ResNet-44 (n=7, widths 16-32-64)."""
    return CifarResNet(44)


def resnet56() -> CifarResNet:
    """ResNet-56 (n=9, widths 16-32-64)."""
    return CifarResNet(56)


def resnet110() -> CifarResNet:
    """ResNet-110 (n=18, widths 16-32-64)."""
    return CifarResNet(110)


def resnet8x4() -> CifarResNet:
    """ResNet-8 with 4x wider stages (32 stem, 64-128-256); ~1.2M parameters."""
    return CifarResNet(8, (32, 64, 128, 256))


def resnet32x4() -> CifarResNet:
    """ResNet-32 with 4x wider stages (32 stem, 64-128-256); ~7.4M parameters."""
    return CifarResNet(32, (32, 64, 128, 256))
