"""Models by name, all sharing the :class:`Classifier` interface
(``forward_features`` / ``forward_head``)."""

from backdoorlab.models import airbench, preact_resnet, pretrained, series, small_cnn, timm_models, torchvision_models  # noqa: F401
from backdoorlab.models.adapter import ModuleClassifier, as_classifier
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import MODELS, create_model, list_models
from backdoorlab.models.series import models_for

__all__ = ["MODELS", "Classifier", "ModuleClassifier", "as_classifier", "create_model", "list_models", "models_for"]
