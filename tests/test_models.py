from __future__ import annotations

import pytest
import torch

from backdoorlab.models import Classifier, create_model, list_models
from backdoorlab.registry import UnknownNameError

EXPECTED = {
    "airbench",
    "efficientnet_lite0",
    "mobilenet_v2",
    "preact_resnet18",
    "resnet18",
    "resnet50",
    "small_cnn",
    "timm",
    "vgg16_bn",
}


SERIES = {"fcn", "resnet1d", "inception_time", "inception_time_small"}  # tests/test_time_series.py


def test_registry_lists_the_models():
    assert set(list_models()) == EXPECTED | SERIES


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid models: airbench, efficientnet_lite0, fcn, inception_time"):
        create_model("resnet19", num_classes=10)


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_shares_the_features_head_split(name, in_channels):
    torch.manual_seed(0)
    model = create_model(
        name, num_classes=7, in_channels=in_channels, mean=(0.5,) * in_channels, std=(0.25,) * in_channels
    )
    assert isinstance(model, Classifier)
    model.eval()
    x = torch.rand(2, in_channels, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.dim() == 4 and features.shape[1] == model.num_features
        embedding = model.forward_head(features, pre_logits=True)
        assert embedding.shape == (2, model.num_features)
        logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.allclose(logits, model.forward_head(features), atol=1e-5)


def test_normalisation_is_inside_the_model():
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1, mean=(0.25,), std=(0.5,)).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model.normalize(x), (x - 0.25) / 0.5)
    state = model.state_dict()
    assert torch.equal(state["mean"], torch.tensor([0.25])), "a saved model carries its normalisation"


def test_airbench_whitening_init_whitens_patches():
    torch.manual_seed(0)
    # std 0.05 scales the inputs up, so every patch direction's variance dwarfs the init's eps
    model = create_model("airbench", 10, 3, mean=(0.5,) * 3, std=(0.05,) * 3)
    # correlated images: smooth noise, so the raw patch covariance is far from identity
    x = torch.nn.functional.avg_pool2d(torch.rand(200, 3, 34, 34), 3, stride=1)
    model.init_from_data(x)
    whiten = model.body[0]
    out = torch.nn.functional.conv2d(model.normalize(x), whiten.weight)  # without bias
    half = out[:, : out.shape[1] // 2].permute(0, 2, 3, 1).reshape(-1, out.shape[1] // 2)
    cov = half.T @ half / len(half)
    assert torch.allclose(cov.diagonal(), torch.ones(len(cov)), atol=0.05)
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert off_diagonal.abs().max() < 0.05


def test_bad_normalisation_shape_is_refused():
    with pytest.raises(ValueError, match="one per input channel"):
        create_model("small_cnn", 10, in_channels=3, mean=(0.5,), std=(0.5,))


@pytest.mark.slow
def test_efficientnet_lite0_carries_its_imagenet_features(digits):
    """The pretrained weights load and normalise as they expect: a linear probe on the frozen
    pooled features of sklearn's digits (8 px, one channel; the model resizes them to 32) beats
    the same probe on a randomly initialised network by a wide margin (measured 0.86 against 0.09)."""
    from sklearn.linear_model import LogisticRegression

    from backdoorlab.training.loop import to_float

    torch.manual_seed(0)
    images = to_float(digits.train.inputs[:1000])
    labels = digits.train.labels[:1000].numpy()

    def probe_accuracy(pretrained: bool) -> float:
        model = create_model("efficientnet_lite0", 10, in_channels=1, pretrained=pretrained).eval()
        with torch.no_grad():
            features = model.forward_head(model.forward_features(images), pre_logits=True).numpy()
        probe = LogisticRegression(max_iter=3000).fit(features[:700], labels[:700])
        return probe.score(features[700:], labels[700:])

    pretrained, random = probe_accuracy(True), probe_accuracy(False)
    assert pretrained > 0.75, f"pretrained features: probe accuracy {pretrained:.2f}"  # measured 0.86
    assert pretrained > random + 0.3, f"pretrained {pretrained:.2f} against random {random:.2f}"


def test_efficientnet_lite0_refuses_what_it_cannot_take():
    with pytest.raises(ValueError, match="1 or 3 input channels"):
        create_model("efficientnet_lite0", 10, in_channels=2, pretrained=False)
    with pytest.raises(ValueError, match="image_size >= 32"):
        create_model("efficientnet_lite0", 10, in_channels=3, pretrained=False, image_size=28)
