"""NPD (Zhu et al. 2023): a neural polarizer, one learnable linear layer inserted into the frozen
suspect model and trained on the trusted split so that it lets benign features through and filters
the features that targeted adversarial examples (the trigger's stand-ins) rely on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import (
    REPAIRS,
    DefenseContext,
    DefenseOutcome,
    Repair,
    require_classifier,
    require_images,
)
from backdoorlab.defenses.post_training import shuffled_index_batches, suspect_copy
from backdoorlab.options import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import to_float

#: The official code's constants (``defense/npd.py``): the logit the true label gets when the attack
#: target is picked (-10, not -inf), the cap on each sample's cross-entropy in the perturbation's loss,
#: the share of samples reaching their target at which the perturbation stops early, and the
#: polarizer's warm-up learning rate; ``ADD`` and ``EPS`` of its ``log(1.0001 - p + 1e-12)``.
TRUE_LABEL_LOGIT = -10.0
LOSS_CAP = 80.0
EARLY_STOP = 0.6
WARM_LR = 1e-4
ADD, EPS = 1.0001, 1e-12


def neural_polarizer(channels: int) -> nn.Sequential:
    """The official ``convbn`` polarizer: a 1x1 convolution without bias, initialised to the
    identity, then batch normalisation (weight 1, bias 0, running mean 0, variance 1), so that in
    eval mode it passes features through unchanged (up to BN's ``1/sqrt(1 + eps)``) until trained."""
    conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


def polarizer_position(model: nn.Module) -> int:
    """The body index the polarizer goes before by default: the input of the body's last module
    that holds a convolution (the last stage of a ResNet, airbench's and small_cnn's last conv
    group, VGG's last convolution, MobileNetV2's and EfficientNet-Lite0's 1x1 head convolution)."""
    holding = [
        i
        for i, module in enumerate(model.body)
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    ]
    if not holding:
        raise ValueError("NPD needs a convolution in the model's body to place its polarizer before; this one has none")
    return holding[-1]


def insert_polarizer(model: nn.Module, position: int, probe: Tensor) -> nn.Sequential:
    """Put a fresh polarizer in ``model``'s body (in place) at the input of body module
    ``position`` (after the last one when ``position == len(body)``), sized by the feature map that
    ``probe`` (a few float images) gives there; the body keeps its length and type (the module at
    ``position`` becomes ``Sequential(polarizer, module)``). Returns the polarizer."""
    body = model.body
    with torch.no_grad():
        features = model.forward_body(model.normalize(probe), 0, position)
    if features.dim() != 4:
        raise ValueError(
            f"NPD's polarizer is a 1x1 convolution over a feature map (N, C, H, W); body position {position} "
            f"gives features of shape {tuple(features.shape)}: choose another position"
        )
    polarizer = neural_polarizer(features.shape[1]).to(probe.device).eval()
    if position < len(body):
        body[position] = nn.Sequential(polarizer, body[position])
    else:
        body[position - 1] = nn.Sequential(body[position - 1], polarizer)
    return polarizer


def attack_targets(logits: Tensor, labels: Tensor) -> Tensor:
    """The official target of each sample's perturbation: the most likely label but its own (its
    logit set to -10, as the code, rather than excluded)."""
    logits = logits.clone()
    logits[torch.arange(len(labels)), labels] = TRUE_LABEL_LOGIT
    return logits.argmax(1)


def project_l2(delta: Tensor, bound: float) -> Tensor:
    """Scale each sample's perturbation whose L2 norm exceeds ``bound`` back onto the ball."""
    norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    return torch.where(norms > bound, delta * bound / norms.clamp_min(1e-12), delta)


def targeted_perturbation(model: nn.Module, x: Tensor, targets: Tensor, o: dict[str, Any]) -> Tensor:
    """The official random-targeted adversarial example (L2, CIFAR-10's branch): from zero, up to
    ``steps`` signed-gradient steps of ``step_size`` down the cross-entropy (each sample's capped at
    80) of ``clamp(x + delta, 0, 1)`` towards ``targets``, each projected onto the L2 ball of
    ``bound``; it stops once more than 60% of the batch reaches its target."""
    delta = torch.zeros_like(x, requires_grad=True)
    for step in range(o["steps"]):
        losses = F.cross_entropy(model((x + delta).clamp(0, 1)), targets, reduction="none")
        (grad,) = torch.autograd.grad(losses.clamp(max=LOSS_CAP).mean(), delta)
        with torch.no_grad():
            delta = project_l2(delta - o["step_size"] * grad.sign(), o["bound"])
            if step == o["steps"] - 1:  # the official check after the last step changes nothing
                break
            reached = (model((x + delta).clamp(0, 1)).argmax(1) == targets).float().mean()
        if float(reached) > EARLY_STOP:
            break
        delta.requires_grad_(True)
    return delta.detach()


def polarizer_loss(
    clean: Tensor,
    adversarial: Tensor,
    labels: Tensor,
    predicted: Tensor,
    targets: Tensor,
    lambdas: tuple[float, float, float, float],
) -> Tensor:
    """The official outer loss, from the logits of the clean batch and of its perturbed copy:
    ``lambda_1`` x CE(clean, labels) + ``lambda_2`` x CE(adversarial, the model's own clean
    predictions) + ``lambda_3`` x the mean of ``-log(1.0001 - p)`` at the adversarial example's most
    likely wrong label (its top label, or the second where the top is the true one) + ``lambda_4`` x
    the same at the perturbation's target."""
    l1, l2, l3, l4 = lambdas
    p = F.softmax(adversarial, 1)
    top2 = p.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    push_off = -torch.log(ADD - p + EPS)
    loss = l1 * F.cross_entropy(clean, labels) + l2 * F.cross_entropy(adversarial, predicted)
    if l3:
        loss = loss + l3 * push_off.gather(1, wrong[:, None]).mean()
    if l4:
        loss = loss + l4 * push_off.gather(1, targets[:, None]).mean()
    return loss


@REPAIRS.register(
    "npd",
    "NPD (Zhu et al. 2023): a neural polarizer layer inserted into the frozen model, trained on clean data",
    modality="image",
)
class NeuralPolarizerDefense(Repair):
    """A 1x1 convolution plus batch normalisation (:func:`neural_polarizer`), identity at the start,
    is inserted into the suspect model's body at the input of its last module holding a convolution
    (reconstructed), the model's own weights frozen (eval mode throughout); only the polarizer
    learns, on the trusted split, unaugmented. First ``warm_epochs`` of clean cross-entropy (SGD lr
    1e-4, the polarizer in train mode, so its BN statistics adapt); then ``epochs`` with it in eval
    mode: per batch, a targeted adversarial example towards each sample's most likely wrong label
    (:func:`targeted_perturbation`) stands in for the trigger, and one SGD step on
    :func:`polarizer_loss` teaches the polarizer to keep clean predictions and to undo it. On a
    small trusted split lower ``batch_size`` or raise ``warm_epochs`` (docs/defenses.md, "NPD").

    Source: Zhu, Wei, Zha, Wu, "Neural Polarizer: A Lightweight and Effective Backdoor Defense via
    Purifying Poisoned Features" (NeurIPS 2023); the official code is BackdoorBench's
    ``defense/npd.py`` (``config/defense/npd/config.yaml``: the defaults). Reconstructed: the
    default position, the nearest point before the official ``layer4.1.conv1`` every model has.

    Args:
        epochs: training epochs after the warm-up (the checkpoints: 0 is the suspect, then each epoch).
        lr: the polarizer's SGD learning rate.
        batch_size: trusted samples per step.
        warm_epochs: warm-up epochs on clean cross-entropy.
        bound: the L2 bound of each sample's perturbation (in [0, 1] pixel units, over the whole image).
        step_size: the size of each of the perturbation's signed-gradient steps.
        steps: the most signed-gradient steps the perturbation takes.
        lambda_1: the weight of the clean cross-entropy.
        lambda_2: the weight of the adversarial example's cross-entropy to the clean prediction.
        lambda_3: the weight of the push off the adversarial example's top wrong label.
        lambda_4: the weight of the push off the perturbation's target.
        position: the body index the polarizer goes before (``len(body)``: after the last module);
            ``None``: :func:`polarizer_position`.
    """

    def __init__(
        self,
        epochs: NonNegativeInt = 50,
        lr: PositiveFloat = 0.01,
        batch_size: PositiveInt = 128,
        warm_epochs: NonNegativeInt = 5,
        bound: PositiveFloat = 3.0,
        step_size: PositiveFloat = 0.1,
        steps: PositiveInt = 2,
        lambda_1: NonNegativeFloat = 1.0,
        lambda_2: NonNegativeFloat = 0.4,
        lambda_3: NonNegativeFloat = 0.4,
        lambda_4: NonNegativeFloat = 0.4,
        position: NonNegativeInt | None = None,
    ) -> None:
        super().__init__()

    def _position(self, model: nn.Module) -> int:
        """The chosen body index, checked against this model's body."""
        require_classifier(model, "NPD", min_body=1)
        body = model.body
        position = self._options["position"]
        if position is None:
            return polarizer_position(model)
        if position > len(body):
            raise ValueError(f"position must be in 0..{len(body)} for this model (its body's length), got {position}")
        return position

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        require_images(trusted, "NPD", "perturbs inputs within the [0, 1] image range")
        o = self._options
        model = suspect_copy(model).to(ctx.device).eval()
        trainable = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)
        inputs, labels = trusted.inputs.to(ctx.device), trusted.labels.to(ctx.device)
        position = self._position(model)
        polarizer = insert_polarizer(model, position, to_float(inputs[:2]))
        generator = torch.Generator().manual_seed(ctx.seed)

        ctx.observe(model, 0)
        warm = torch.optim.SGD(polarizer.parameters(), lr=WARM_LR)
        polarizer.train()
        for _ in range(o["warm_epochs"]):
            for index in shuffled_index_batches(len(trusted), o["batch_size"], generator, ctx.device):
                if len(index) < 2:
                    continue
                loss = F.cross_entropy(model(to_float(inputs[index])), labels[index])
                warm.zero_grad()
                loss.backward()
                warm.step()
        polarizer.eval()

        lambdas = (o["lambda_1"], o["lambda_2"], o["lambda_3"], o["lambda_4"])
        optimizer = torch.optim.SGD(polarizer.parameters(), lr=o["lr"], momentum=0.9, weight_decay=5e-4)
        for epoch in progress_bar(range(o["epochs"]), "NPD epochs"):
            for index in shuffled_index_batches(len(trusted), o["batch_size"], generator, ctx.device):
                x, y = to_float(inputs[index]), labels[index]
                clean = model(x)  # the polarizer does not change before the step: its graph serves the loss
                targets = attack_targets(clean.detach(), y)
                delta = targeted_perturbation(model, x, targets, o)
                adversarial = model((x + delta).clamp(0, 1))
                loss = polarizer_loss(clean, adversarial, y, clean.detach().argmax(1), targets, lambdas)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            ctx.observe(model, epoch + 1)
        for p in trainable:
            p.requires_grad_(True)
        return DefenseOutcome(
            model, details={"polarizer_position": position, "polarizer_channels": polarizer[0].in_channels}
        )
