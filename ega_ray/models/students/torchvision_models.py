"""Any torchvision classification model as a student (``torchvision:<name>``, e.g. ``torchvision:resnet18``).

Built with ``torchvision.models.get_model(name, weights=...)``; the final classifier Linear is replaced by
``nn.Identity`` so the model returns its pooled (B, feat_dim) feature. Handled layouts: ``.fc`` (ResNet,
RegNet, ShuffleNetV2, GoogLeNet, ...), ``.classifier`` (a Linear, or a Sequential ending in one: MobileNet,
EfficientNet, VGG, ConvNeXt, DenseNet, ...), ``.heads`` (ViT) and ``.head`` (Swin).

The torchvision module itself is returned (with a ``feat_dim`` attribute) rather than wrapped, so its
state-dict keys stay those of torchvision checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum


_HEAD_ATTRS = ("fc", "classifier", "heads", "head")


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the model's final classifier Linear with ``nn.Identity``; return its ``in_features``."""
    for attr in _HEAD_ATTRS:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Identity())
            return head.in_features
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            in_features = head[-1].in_features
            head[-1] = nn.Identity()
            return in_features
    raise ValueError(f"torchvision model {name!r}: no final Linear found in .{', .'.join(_HEAD_ATTRS)}")


def _drop_aux_heads(model: nn.Module) -> None:
    """GoogLeNet / Inception v3: drop the auxiliary classifiers so training-mode forward returns a tensor."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def torchvision_backbone(name: str, weights: WeightsEnum | str | None = None, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights, **kwargs)`` without its classifier."""
    import torchvision  # here: importing it takes seconds, and only a torchvision model needs it

    if name not in torchvision.models.list_models():
        raise KeyError(f"unknown torchvision model {name!r}; see torchvision.models.list_models()")
    model = torchvision.models.get_model(name, weights=weights, **kwargs)
    feat_dim = _strip_classifier(model, name)
    _drop_aux_heads(model)
    model.feat_dim = feat_dim
    return model
