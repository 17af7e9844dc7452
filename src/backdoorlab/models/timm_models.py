"""Any ``timm`` architecture by name: ``--model timm -m arch=convnext_atto``.

``timm.create_model(arch, num_classes=..., in_chans=...)`` builds the network for the dataset's
classes and channels, and :func:`~backdoorlab.models.adapter.as_classifier` wraps it so that every
feature-reading defense works on it: the head is timm's own classifier (``get_classifier()``), the
features are the last stage's map that timm lists in ``feature_info`` (a ResNet's ``layer4``),
and the body's modules are the stages before it (its stem activation and ``layer1``..``layer3``),
where NAD, E2ABL, BEATRIX and NPD cut the network. Where the head does not read that map pooled
(a ConvNeXt's norm before its linear layer, a MobileNetV3's convolution after its pooling: checked
on random images when the model is built), the features are the head's own input instead (flat vectors)
and every stage is a body module. Models without ``feature_info`` get a one-module body.

timm's networks keep their ImageNet stems (a ResNet's stride-2 7x7 convolution and max pool), so on
32 px images they see 8 px maps after the stem; the registered ``resnet18`` adapts the stem to small
images, this one does not. ``pretrained=True`` downloads ImageNet weights from the Hugging Face hub
(internet needed; the network's own first convolution is adapted to ``in_channels`` by timm).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch

from backdoorlab.models.adapter import ModuleClassifier, as_classifier
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS

#: Side of the images the build checks the features on (any size the network takes).
PROBE_SIDE = 64


@MODELS.register("timm", "any timm architecture by name (-m arch=convnext_atto), wrapped by as_classifier")
def timm_model(
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    arch: str = "resnet18",
    pretrained: bool = False,
) -> Classifier:
    """timm's ``arch`` for the data's classes and channels, wrapped as a :class:`Classifier`.

    Args:
        arch: the architecture's timm name (``timm.list_models()`` names them all).
        pretrained: load timm's ImageNet weights (a download from the Hugging Face hub).
    """
    try:
        import timm
    except ImportError:
        raise ImportError("model 'timm' needs the timm package: pip install 'backdoorlab[timm]'") from None
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(f"timm has no architecture {arch!r}{hint} (timm.list_models() lists them all)")
    network = timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels)
    classifier = network.get_classifier()
    head = next((name for name, module in network.named_modules() if module is classifier), None)
    if head is None:
        raise ValueError(f"timm's {arch!r} has no classifier module to take as the head")
    stages = [info["module"] for info in getattr(network, "feature_info", [])]
    if stages:  # the last stage's map as the features, where the head reads it pooled (a ResNet)
        model = as_classifier(network, features=stages[-1], head=head, blocks=stages[:-1], mean=mean, std=std)
        if _head_reads_pooled(model, in_channels):
            return model
    return as_classifier(network, head=head, blocks=stages, mean=mean, std=std)


def _head_reads_pooled(model: ModuleClassifier, in_channels: int) -> bool:
    """Whether the wrapper's first-pass check accepts ``model``'s features (on two 64 px random images, eval
    mode): a head behind its own norm or convolution (ConvNeXt, MobileNetV3) does not read them."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.rand(2, in_channels, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0)))
    except ValueError:
        return False
    except RuntimeError:  # the network cannot take the probe's size (a ViT's fixed size): keep the stage
        return True
    finally:
        model.train(was_training)
    return True
