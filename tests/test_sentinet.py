"""SentiNet (input detection): Grad-CAM through the model interface, the transplanted region, the
clean decision boundary, and BadNets inputs flagged on an MNIST airbench."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backdoorlab.attacks.poisoning import TriggeredTestSet
from backdoorlab.defenses import INPUT_DETECTORS
from backdoorlab.defenses.post_training import holdout_split
from backdoorlab.defenses.sentinet import SentiNet, distance_above, fit_boundary, grad_cam, transplant
from backdoorlab.evaluation import assess_input_detector
from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.run import post_training_context
from backdoorlab.models import Classifier


class Corner(nn.Module):
    """Zeroes all but the top-left ``size`` x ``size`` pixels: a body that only looks there."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = torch.zeros_like(x)
        kept[..., : self.size, : self.size] = x[..., : self.size, : self.size]
        return kept


def corner_model(size: int = 4) -> Classifier:
    """1x8x8 images -> a 4x4 map (pooled, so Grad-CAM is upsampled) that is zero outside the corner;
    class 0 rises with the corner's brightness, class 1 falls."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 6, 1, bias=False)
    conv.weight.data = conv.weight.data.abs()
    model = Classifier(nn.Sequential(Corner(size), conv, nn.MaxPool2d(2)), 6, 2, (0.0,), (1.0,))
    model.fc.weight.data = torch.stack([torch.rand(6) + 0.5, -torch.rand(6) - 0.5])
    return model.eval()


def test_the_grad_cam_of_a_model_that_looks_at_one_corner_lies_in_that_corner():
    model = corner_model()
    inputs = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cams, classes = grad_cam(model, inputs)
    assert cams.shape == (5, 8, 8) and classes.tolist() == [0] * 5
    masks = cams >= 0.85
    assert masks[:, :4, :4].flatten(1).any(1).all(), "every input's region is found"
    assert not masks[:, 4:].any() and not masks[:, :, 4:].any(), "nothing outside the corner the model sees"
    assert cams.flatten(1).amax(1).sub(1).abs().max() < 1e-5 and cams.min() >= 0, "scaled to [0, 1] per input"
    # with an average-pooled linear head, Grad-CAM is the class activation map: fc weights times features
    features = model.forward_features(inputs)
    expected = torch.einsum("c,nchw->nhw", model.fc.weight[0], features).clamp(min=0)
    expected = torch.nn.functional.interpolate(expected[:, None], size=(8, 8), mode="bilinear")[:, 0]
    expected = (expected - expected.flatten(1).amin(1)[:, None, None]) / expected.flatten(1).amax(1)[:, None, None]
    torch.testing.assert_close(cams, expected, atol=1e-5, rtol=1e-4)


def test_the_region_is_pasted_where_the_mask_says_and_nowhere_else():
    inputs = torch.full((2, 3, 4, 4), 0.5)
    inputs[1] = 0.9
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 2:, 3] = True
    backgrounds = torch.zeros(5, 3, 4, 4)
    pasted = transplant(inputs, masks, backgrounds)
    assert pasted.shape == (2, 5, 3, 4, 4)
    assert (pasted[0, :, :, 0, 0] == 0.5).all() and (pasted[1, :, :, 2:, 3] == 0.9).all(), "every channel"
    assert int((pasted != 0).sum()) == 5 * 3 * (1 + 2), "the background elsewhere"
    noise = torch.rand(2, 5, 3, 4, 4)  # one set of backgrounds per input (the inert pattern)
    inert = transplant(inputs, masks, noise)
    assert torch.equal(inert[1, :, :, 0, 0], noise[1, :, :, 0, 0]) and (inert[1, :, :, 3, 3] == 0.9).all()


def test_the_boundary_follows_the_most_fooled_clean_inputs_and_scores_the_distance_above_it():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 400)
    ceiling = 0.1 + 0.5 * confidence**2
    fooled = ceiling - rng.uniform(0.05, 0.3, 400) * (rng.uniform(size=400) > 0.3)  # 30% of them on the ceiling
    grid = np.linspace(0.1, 1.0, 10)
    boundary = np.polyval(fit_boundary(confidence, fooled), grid)
    np.testing.assert_allclose(boundary, 0.1 + 0.5 * grid**2, atol=0.01)
    assert (boundary - np.polyval(np.polyfit(confidence, fooled, 2), grid)).min() > 0.05, "not through the middle"
    # flat boundary at 0.3: the distance is vertical, signed
    flat = fit_boundary(np.linspace(0.05, 0.95, 60), np.full(60, 0.3))
    scores = distance_above(flat, np.array([0.5, 0.5, 0.5]), np.array([0.8, 0.3, 0.1]))
    np.testing.assert_allclose(scores, [0.5, 0.0, -0.2], atol=1e-3)
    assert fit_boundary(np.array([0.5, 0.5]), np.array([0.2, 0.4])).tolist() == [0.4], "one confidence: a flat line"


def test_sentinet_refuses_series_and_bad_options_with_the_valid_ones():
    with pytest.raises(ValueError, match="input detector 'sentinet' does not take series data.*only image"):
        INPUT_DETECTORS.check_modality("sentinet", "series", "gunpoint")
    with pytest.raises(ValueError, match="score.*boundary.*confidence"):
        RunConfig(input_detector="sentinet", input_detector_options={"score": "fooled"}).resolved()
    with pytest.raises(RuntimeError, match="before fit"):
        SentiNet().score(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.slow
def test_sentinet_flags_badnets_inputs_on_an_mnist_airbench(mnist_badnets_airbench):
    """The shared MNIST victim (airbench, BadNets 3x3 at 10%; 125 trusted images to fit on, 125 to
    set the threshold on), 100 clean and 100 triggered test inputs, and to fit CI 10 clean images
    per region instead of 100. Measured (1 thread, 6 s beside the fixture): AUROC 1.000, TPR 1.000
    at FPR 0.06, filtered ASR 0.000; with 100 clean images and 200 + 200 inputs the same AUROC, TPR
    and FPR 0.045. A triggered input's region fools every clean image (1.00), a clean one's 11%."""
    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] > 0.9
    fit_on, calibration = holdout_split(prepared.trusted, 0.5, prepared.config.seed)
    detector = SentiNet(clean_images=10)
    detector.fit(model, fit_on, post_training_context(prepared))
    test = prepared.test_set.subset(torch.arange(100))
    t = prepared.triggered
    triggered = TriggeredTestSet(t.inputs[:100], t.true_labels[:100], t.target_labels[:100])
    metrics = assess_input_detector(detector, model, test, triggered, calibration)
    assert metrics["input_auroc"] >= 0.9 and metrics["input_tpr"] >= 0.9, metrics
    assert metrics["filtered_attack_success_rate"] < 0.1 and metrics["input_fpr"] < 0.15, metrics
