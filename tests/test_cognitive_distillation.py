"""Cognitive Distillation (input detection): the learned mask on a model whose answer is known, the
objective's terms, and BadNets inputs on the shared MNIST victim and on digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses import INPUT_DETECTORS, DefenseContext
from backdoorlab.defenses.cognitive_distillation import CognitiveDistillation, distil, total_variation
from backdoorlab.experiments import RunConfig, run
from backdoorlab.experiments.run import post_training_context
from backdoorlab.metrics import scores_auroc
from backdoorlab.training.loop import TrainConfig

CPU = torch.device("cpu")
PIXEL = (5, 9)  # the one pixel the toy model reads


class OnePixel(nn.Module):
    """Two logits, +-10 times channel 0 of one pixel; its "feature map" is that pixel."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        r, c = PIXEL
        return 10 * x[:, :1, r : r + 1, c : c + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.forward_features(x).flatten(1)
        return torch.cat([f, -f], 1)


def images(count: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("target", ["logits", "features"])
def test_a_model_that_reads_one_pixel_gets_a_mask_on_that_pixel_alone(target):
    x = images(6)
    masks = distil(OnePixel(), x, torch.Generator().manual_seed(0), target=target)
    assert masks.shape == (6, 1, 16, 16) and 0 <= masks.min() and masks.max() <= 1
    r, c = PIXEL
    assert (masks[:, 0, r, c] > 0.9).all(), masks[:, 0, r, c]
    rest = masks.clone()
    rest[:, 0, r, c] = 0
    assert rest.amax() < 0.05, "every pixel the model does not read is masked out"
    # one mask per channel: only channel 0 of the pixel is read
    per_channel = distil(OnePixel(), x, torch.Generator().manual_seed(0), mask_channels=3, target=target)
    assert per_channel.shape == (6, 3, 16, 16)
    assert (per_channel[:, 0, r, c] > 0.9).all() and per_channel[:, 1:].amax() < 0.05


def test_without_the_output_term_the_mask_vanishes_and_without_the_penalties_it_stays():
    """The objective's balance: gamma and beta pull the mask to 0 wherever the output allows it."""
    x = images(2)
    blank = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    nn.init.zeros_(blank[1].weight)  # the output never changes: nothing to keep
    vanished = distil(blank, x, torch.Generator().manual_seed(0), steps=60)
    assert vanished.amax() < 0.05
    assert blank[1].weight.grad is None and blank.training is False, "the model gets no gradient, in eval mode"
    kept = distil(blank, x, torch.Generator().manual_seed(0), steps=60, gamma=0.0, beta=0.0)
    start = (torch.tanh(torch.tensor(1.0)) + 1) / 2  # the mask starts at (tanh(1) + 1) / 2, as the official
    torch.testing.assert_close(kept, torch.full_like(kept, float(start)))


def test_total_variation_is_the_official_squared_differences_over_the_mask_size():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1, 1] = 1.0  # four neighbours differ by 1
    mask[1, 0, :, 2:] = 0.5  # one vertical edge of four rows, 0.5 each
    torch.testing.assert_close(total_variation(mask), torch.tensor([4 / 16, 4 * 0.25 / 16]))


def test_the_score_is_the_negated_l1_norm_of_the_mask_and_options_are_checked():
    detector = CognitiveDistillation(steps=5, batch_size=4)
    trusted = TensorDataset(
        (images(8) * 255).to(torch.uint8), torch.zeros(8, dtype=torch.long), ("a", "b"), (0.5,) * 3, (0.25,) * 3, "toy"
    )
    with pytest.raises(RuntimeError, match="before fit"):
        detector.score(trusted.inputs)
    detector.fit(OnePixel(), trusted, DefenseContext(TrainConfig(), CPU, 0))
    scores = detector.score(trusted.inputs)  # two batches of 4
    assert scores.shape == (8,) and (scores < 0).all()
    detector.fit(OnePixel(), trusted, DefenseContext(TrainConfig(), CPU, 0))  # the same seed, the same noise
    torch.testing.assert_close(-detector.masks(trusted.inputs).flatten(1).sum(1), scores)
    with pytest.raises(ValueError, match="mask_channels must be 1 or the images' 3 channels, got 2"):
        CognitiveDistillation(mask_channels=2).fit(OnePixel(), trusted, DefenseContext(TrainConfig(), CPU, 0))
    with pytest.raises(ValueError, match="target.*logits.*features"):
        RunConfig(input_detector="cognitive_distillation", input_detector_options={"target": "pixels"}).resolved()
    with pytest.raises(ValueError, match="input detector 'cognitive_distillation' does not take series data"):
        INPUT_DETECTORS.check_modality("cognitive_distillation", "series", "gunpoint")


@pytest.mark.slow
def test_badnets_masks_sit_on_the_patch_on_an_mnist_airbench_yet_are_no_smaller(mnist_badnets_airbench):
    """The shared MNIST victim (airbench, BadNets 3x3 at 10%), the official defaults, 40 clean and 40
    triggered test inputs. Measured (1 thread, 8-25 s beside the fixture as the CPU's load varied):
    the triggered masks hold on average 77% of their mass on the patch and the pixel ring around it
    (its contrast with the black background is part of the trigger), clean masks 0.05%: the trigger
    is distilled. But the score does not separate them (AUROC 0.48; 0.52 on 1,000 + 1,000 in
    docs/detection.md): a clean digit's logits are kept by as few pixels (L1 norm 0-45, mean 16.7)
    as the trigger's (9-44, mean 17.1)."""
    prepared, model, suspect = mnist_badnets_airbench
    assert suspect["attack_success_rate"] > 0.9
    detector = CognitiveDistillation()
    detector.fit(model, prepared.trusted, post_training_context(prepared))
    count = 40
    masks = detector.masks(torch.cat([prepared.test_set.inputs[:count], prepared.triggered.inputs[:count]]))
    patch = prepared.trigger.apply(torch.zeros(1, *masks.shape[1:]), None)[0, 0] > 0
    ring = nn.functional.max_pool2d(patch[None, None].float(), 3, 1, 1)[0, 0] > 0
    mass = masks[:, 0, ring].sum(1) / masks.flatten(1).sum(1).clamp_min(1e-9)
    assert mass[count:].mean() > 0.6 and mass[:count].mean() < 0.01, mass
    scores = -masks.flatten(1).sum(1)
    auroc = scores_auroc(scores, torch.arange(2 * count) >= count)
    assert 0.25 < auroc < 0.7, auroc


@pytest.mark.slow
def test_cognitive_distillation_runs_as_an_input_detector_but_cannot_tell_badnets_digits_apart():
    """Digits, BadNets at 10%, a 30% trusted split (216 inputs set the threshold). Measured (1
    thread): at the default 100 steps AUROC 0.47, TPR 0.05 at FPR 0.06 (24 inputs a second, 59 s);
    at the test's 30 steps AUROC 0.46, TPR 0.04 at FPR 0.06 (4-17 s). On 8x8 digits the small CNN's
    clean decisions rest on as few pixels as the 2x2 patch."""
    metrics = run(
        RunConfig(
            dataset="digits",
            input_detector="cognitive_distillation",
            input_detector_options={"steps": 30},
            trusted_size=0.3,
            device="cpu",
        )
    ).metrics
    assert metrics["attack_success_rate"] > 0.9
    assert 0.3 < metrics["input_auroc"] < 0.7 and metrics["input_fpr"] < 0.15, metrics
    assert metrics["input_seconds_per_input"] > 0
