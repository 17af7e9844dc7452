"""BEATRIX (input detection): the Gram features and deviation against hand-worked values and the
official code, the per-class bounds, and BadNets inputs flagged on an MNIST airbench and on digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.attacks.poisoning import TriggeredTestSet
from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import INPUT_DETECTORS, DefenseContext, DefenseWarning
from backdoorlab.defenses.beatrix import (
    Beatrix,
    cross_validated_threshold,
    deviations,
    gram_bounds,
    gram_features,
)
from backdoorlab.defenses.post_training import holdout_split
from backdoorlab.evaluation import assess_input_detector
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.run import post_training_context
from backdoorlab.models import Classifier
from backdoorlab.training.loop import TrainConfig

CPU = torch.device("cpu")


def test_gram_features_are_the_signed_roots_of_the_powered_gram_matrix_worked_by_hand():
    """One input, two channels of two pixels: F = [[1, 2], [-2, -1]]. Upper triangles, row by row:
    p=1: F F^T = [[5, -4], [-4, 5]]; p=2: F^2 = [[1, 4], [4, 1]], Gram [[17, 8], [8, 17]], square
    root; p=3: F^3 = [[1, 8], [-8, -1]], Gram [[65, -16], [-16, 65]], signed cube root. Without the
    element-wise power (BackdoorBench's), p=2 roots F F^T: signed square roots of 5, -4, 5."""
    features = torch.tensor([[[1.0, 2.0], [-2.0, -1.0]]])
    assert gram_features(features, 1).tolist() == [[5.0, -4.0, 5.0]]
    torch.testing.assert_close(gram_features(features, 2), torch.tensor([[17, 8, 17]]).double().sqrt())
    cube = [65 ** (1 / 3), -(16 ** (1 / 3)), 65 ** (1 / 3)]
    torch.testing.assert_close(gram_features(features, 3), torch.tensor([cube], dtype=torch.float64))
    torch.testing.assert_close(
        gram_features(features, 2, powered=False), torch.tensor([[math.sqrt(5), -2.0, math.sqrt(5)]]).double()
    )
    assert gram_features(torch.zeros(4, 3, 5, 5), 2).shape == (4, 6), "C(C+1)/2 features, spatial dims flattened"


def test_bounds_and_deviation_worked_by_hand():
    """One channel, one pixel x: every order's Gram feature is x^2 (1, 4, 9, 16 for x = 1..4).
    torch's median takes the lower middle value: median 4, |g - 4| = 3, 0, 5, 12, MAD 3, so the
    bounds at 10 MADs are [-26, 34]. x = 6 (g = 36) exceeds the top by 2/34, x = 0 by nothing; the
    deviation divides by C^2 / 2 = 0.5 and averages over the orders. Without the power, order 2
    roots x^2 to |x| (1..4: median 2, MAD 1, bounds [-8, 12]) and 6 is inside."""
    clean = torch.arange(1.0, 5.0).view(4, 1, 1, 1)
    lows, highs = gram_bounds(clean, 2, 10.0)
    assert [low.item() for low in lows] == [-26.0, -26.0] and [high.item() for high in highs] == [34.0, 34.0]
    probe = torch.tensor([6.0, 0.0]).view(2, 1, 1, 1)
    expected = (2 / (34 + 1e-6)) / 0.5
    torch.testing.assert_close(deviations(probe, lows, highs), torch.tensor([expected, 0.0]).double())
    lows, highs = gram_bounds(clean, 2, 10.0, powered=False)
    assert [low.item() for low in lows] == [-26.0, -8.0] and [high.item() for high in highs] == [34.0, 12.0]
    torch.testing.assert_close(
        deviations(probe, lows, highs, powered=False), torch.tensor([expected / 2, 0.0]).double()
    )


class OfficialFeatureCorrelations:
    """``Feature_Correlations`` (mode ``mad``) and ``threshold_determine`` of ``wanlunsec/Beatrix``,
    ``defenses/Beatrix/Beatrix.py``, for one layer, as written there (numpy bookkeeping kept)."""

    def __init__(self, powers):  # noqa: ANN001
        self.power = powers

    def G_p(self, ob, p):  # noqa: ANN001, ANN201, N802
        temp = ob.detach() ** p
        temp = temp.reshape(temp.shape[0], temp.shape[1], -1)
        temp = torch.matmul(temp, temp.transpose(dim0=2, dim1=1)).triu()
        temp = temp.sign() * torch.abs(temp) ** (1 / p)
        temp = temp.reshape(temp.shape[0], -1)
        self.num_feature = temp.shape[-1] / 2
        return temp

    def train(self, feat):  # noqa: ANN001, ANN201
        self.mins, self.maxs = [], []
        for p in self.power:
            g_p = self.G_p(feat, p)
            median = g_p.median(dim=0, keepdim=True)[0]
            mad = torch.abs(g_p - median).median(dim=0, keepdim=True)[0]
            self.mins.append(median - mad * 10)
            self.maxs.append(median + mad * 10)

    def get_deviations_(self, feat):  # noqa: ANN001, ANN201
        dev = 0
        for i, p in enumerate(self.power):
            g_p = self.G_p(feat, p)
            dev += (F.relu(self.mins[i] - g_p) / torch.abs(self.mins[i] + 10**-6)).sum(dim=1, keepdim=True)
            dev += (F.relu(g_p - self.maxs[i]) / torch.abs(self.maxs[i] + 10**-6)).sum(dim=1, keepdim=True)
        return dev.numpy() / self.num_feature / len(self.power)

    def threshold_determine(self, clean):  # noqa: ANN001, ANN201
        held_out = []
        step = 5
        for i in range(step):
            index_mask = np.ones((len(clean),))
            index_mask[i * int(len(clean) // step) : (i + 1) * int(len(clean) // step)] = 0
            self.train(clean[np.where(index_mask == 1)])
            held_out.append(self.get_deviations_(clean[np.where(index_mask == 0)]))
        ranked = np.sort(np.concatenate(held_out, 0), 0)
        return ranked[int(len(ranked) * 0.95)][0]


def test_the_bounds_deviation_and_threshold_match_the_official_code():
    """On random feature maps (float64, 23 clean inputs: 5 folds of 4, 3 never held out; a shift
    so that some probes leave the bounds), orders 1-8."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(23, 4, 3, 3, generator=generator, dtype=torch.float64) + 0.5
    probes = torch.randn(6, 4, 3, 3, generator=generator, dtype=torch.float64) * 3
    official = OfficialFeatureCorrelations(list(range(1, 9)))
    expected_threshold = official.threshold_determine(clean)
    official.train(clean)
    expected = official.get_deviations_(probes)[:, 0]
    lows, highs = gram_bounds(clean, 8, 10.0)
    ours = deviations(probes, lows, highs).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
    assert (ours > 0).sum() >= 3, "some probes leave the bounds: the comparison is not of zeros"
    assert cross_validated_threshold(clean, 8, 10.0) == pytest.approx(expected_threshold, rel=1e-9)
    assert expected_threshold > 0


class Brightness(nn.Module):
    """Class 1 where the image's mean is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.flatten(1).mean(1)
        return torch.stack([0.5 - mean, mean - 0.5], 1)


def brightness_model() -> Classifier:
    """Body: identity then a 1x1 convolution, so BEATRIX reads the input (body position 1); the
    head's two classes split at a mean brightness of 0.5."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(1.0)
    model = Classifier(nn.Sequential(nn.Identity(), conv), 1, 2, (0.0,), (1.0,))
    model.fc.weight.data, model.fc.bias.data = torch.tensor([[-1.0], [1.0]]), torch.tensor([0.5, -0.5])
    return model.eval()


def images(values: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    base = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    return (base + torch.randint(-8, 9, (len(values), 1, 4, 4), generator=generator)).clamp(0, 255).to(torch.uint8)


def toy_trusted(values: list[int]) -> TensorDataset:
    return TensorDataset(
        images(values), torch.zeros(len(values), dtype=torch.long), ("dark", "bright"), (0.0,), (1.0,), "toy"
    )


def test_a_class_too_few_trusted_inputs_are_predicted_as_takes_the_bounds_of_all_with_a_warning():
    """20 dark trusted images and 3 bright ones: the bright class has fewer than the 5 the folds
    need, so its inputs are scored against all 23; a dark input far darker than the dark ones
    leaves its own class's bounds."""
    detector = Beatrix(score="deviation")
    ctx = DefenseContext(TrainConfig(progress=False), CPU, seed=0)
    with pytest.warns(DefenseWarning, match="classes 1 have fewer than 5 trusted inputs"):
        detector.fit(brightness_model(), toy_trusted([60] * 20 + [200] * 3), ctx)
    assert detector.position == 1 and set(detector.classes) == {0} and detector.pooled is not None
    probes = images([60, 60, 5, 200])
    scores = detector.score(probes)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores[:2].max() < scores[2], "the much darker input leaves the dark class's bounds"
    pooled_lows, pooled_highs, _ = detector.pooled
    features = detector.features(probes[3:])[0]
    assert scores[3].item() == pytest.approx(deviations(features, pooled_lows, pooled_highs).item(), rel=1e-6)
    margin = Beatrix(position=1)
    with pytest.warns(DefenseWarning):
        margin.fit(brightness_model(), toy_trusted([60] * 20 + [200] * 3), ctx)
    torch.testing.assert_close(
        margin.score(images([60, 5])), detector.score(images([60, 5])) - detector.classes[0][2], atol=1e-6, rtol=0
    )


def test_beatrix_refuses_series_bad_options_and_scoring_before_fit():
    with pytest.raises(ValueError, match="input detector 'beatrix' does not take series data"):
        INPUT_DETECTORS.check_modality("beatrix", "series", "gunpoint")
    with pytest.raises(ValueError, match="score.*margin.*deviation"):
        RunConfig(input_detector="beatrix", input_detector_options={"score": "ratio"}).resolved()
    with pytest.raises(ValueError, match="orders"):
        INPUT_DETECTORS.create("beatrix", orders=0)
    with pytest.raises(RuntimeError, match="before fit"):
        Beatrix().score(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    ctx = DefenseContext(TrainConfig(progress=False), CPU, seed=0)
    with pytest.raises(ValueError, match="position must be 0 to 2"):
        Beatrix(position=3).fit(brightness_model(), toy_trusted([60] * 10), ctx)


@pytest.mark.slow
def test_beatrix_flags_badnets_inputs_on_an_mnist_airbench(mnist_badnets_airbench):
    """The shared MNIST victim (airbench width 24, BadNets 3x3 at 10%; 125 trusted images to fit
    on, about 12 per class, 125 to set the threshold on), 200 clean and 200 triggered test inputs,
    the 96-channel 6x6 map before the last conv group. Measured with the default score (the
    deviation): AUROC 0.960 with the victim trained on one torch thread, 0.984 on two (TPR 1.00,
    FPR 0.05). The per-class margin (``score=margin``) gave 1.000 and 0.220: its thresholds rest on
    about a dozen trusted inputs a class. BackdoorBench's Gram without the power
    (``powered=False``): 0.352 and 0.951."""
    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] > 0.9
    fit_on, calibration = holdout_split(prepared.trusted, 0.5, prepared.config.seed)
    detector = Beatrix()
    detector.fit(model, fit_on, post_training_context(prepared))
    test = prepared.test_set.subset(torch.arange(200))
    t = prepared.triggered
    triggered = TriggeredTestSet(t.inputs[:200], t.true_labels[:200], t.target_labels[:200])
    metrics = assess_input_detector(detector, model, test, triggered, calibration)
    assert metrics["input_auroc"] >= 0.93 and metrics["input_tpr"] >= 0.9, metrics
    assert metrics["filtered_attack_success_rate"] < 0.1 and metrics["input_fpr"] < 0.15, metrics


@pytest.mark.slow
def test_beatrix_flags_badnets_digits_and_as_many_stamped_digits_of_a_clean_model():
    """Digits, BadNets at 10%, a 30% trusted split (215 to fit on, 216 to set the threshold on), the
    small CNN's 64-channel 2x2 map before its last conv. Measured (1 thread, 15 s a run): AUROC
    0.929, TPR 0.923 at FPR 0.072, filtered ASR 0.074 (the raw deviation: AUROC 0.995). This pins a
    limit: a clean model's stamped digits are flagged too (64% at FPR 0.075, AUROC 0.75; raw
    deviation 72%, 0.94). BEATRIX flags inputs whose activations leave the clean ones' statistics,
    and a 2x2 white patch on an 8x8 digit does that without any backdoor; on MNIST's 28x28 images
    the clean model's stamped inputs stay at the nominal rate (6%, docs/detection.md)."""
    base = dict(dataset="digits", input_detector="beatrix", trusted_size=0.3, device="cpu", threads=1)
    backdoored = run(RunConfig(**base)).metrics
    assert backdoored["attack_success_rate"] > 0.9
    assert backdoored["input_auroc"] >= 0.88 and backdoored["input_tpr"] >= 0.85, backdoored
    assert backdoored["filtered_attack_success_rate"] < 0.15 and backdoored["input_fpr"] <= 0.15, backdoored
    clean = run(RunConfig(**base, poison_rate=0.0)).metrics
    assert clean["input_tpr"] >= 0.4 and clean["input_fpr"] <= 0.15, clean
