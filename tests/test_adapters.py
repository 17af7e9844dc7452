"""Adapters from other people's models and files: ``as_classifier`` wraps any module so that every
feature-reading defense takes it, and ``load_backdoorbench`` reads BackdoorBench's
``attack_result.pt`` weights-only."""

from __future__ import annotations

import copy
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn

from backdoorlab.data.dataset import DataError, TensorDataset
from backdoorlab.defenses import DefenseContext
from backdoorlab.defenses.base import DETECTORS, INPUT_DETECTORS, REPAIRS, SAMPLE_FILTERS
from backdoorlab.experiments import BackdoorBenchFileError, RunConfig, load_backdoorbench, run
from backdoorlab.experiments.backdoorbench_import import NORMALIZATION, preact_resnet18_key, read_attack_result
from backdoorlab.models import ModuleClassifier, as_classifier, create_model
from backdoorlab.training.loop import TrainConfig

from .test_contracts import FAST_METHODS

RESNET_BLOCKS = ["layer1", "layer2", "layer3", "layer4"]


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


def user_sequential() -> nn.Sequential:
    """A user's own network: three conv blocks, average pool, linear; no batch norm."""
    torch.manual_seed(0)
    return nn.Sequential(
        block(1, 8), block(8, 16), block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    )


def images(n: int, shape: tuple[int, ...], seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    return TensorDataset(
        x, torch.arange(n) % 10, tuple(map(str, range(10))), (0.5,) * shape[0], (0.25,) * shape[0], "synthetic"
    )


CTX = DefenseContext(TrainConfig(epochs=1, batch_size=16, lr=0.01, progress=False), torch.device("cpu"), 0)


# ---------------------------------------------------------------------------------------------
# as_classifier


def test_as_classifier_splits_a_torchvision_resnet18_by_module_names():
    net = resnet18().eval()
    model = as_classifier(net, features="avgpool", head="fc", blocks=RESNET_BLOCKS).eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (3, 512, 1, 1)
    assert model.forward_head(features, pre_logits=True).shape == (3, 512)
    assert torch.allclose(model.forward_head(features), net(x), atol=1e-5)
    assert torch.allclose(model(x), net(x), atol=1e-5)
    assert model.fc is net.fc and (model.num_features, model.num_classes) == (512, 10)
    assert len(model.body) == 5  # four blocks, then the features
    outputs = [model.forward_body(x, 0, 1)] + [None] * 3
    for k in range(1, 4):
        outputs[k] = model.forward_body(outputs[k - 1], k, k + 1)
    assert [tuple(o.shape[1:]) for o in outputs] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    # the unpooled map as features: the head average-pools it, as the network's avgpool does
    unpooled = as_classifier(net, features="layer4", blocks=RESNET_BLOCKS).eval()
    assert unpooled.forward_features(x).shape == (3, 512, 1, 1) and torch.allclose(unpooled(x), net(x), atol=1e-5)


def test_as_classifier_defaults_to_the_last_linear_and_its_input():
    net = user_sequential().eval()
    model = as_classifier(net).eval()
    x = torch.rand(5, 1, 8, 8)
    assert model.head_name == "5" and model.forward_features(x).shape == (5, 16)
    assert torch.allclose(model(x), net(x), atol=1e-6)
    normalised = as_classifier(user_sequential(), mean=[0.5], std=[0.25]).eval()
    assert torch.allclose(normalised(x), net((x - 0.5) / 0.25), atol=1e-5)


def test_a_wrapped_module_saves_loads_and_copies_under_its_own_names():
    model = as_classifier(resnet18(), features="avgpool", blocks=RESNET_BLOCKS).eval()
    x = torch.rand(2, 3, 32, 32)
    before = model(x)
    state = model.state_dict()
    assert set(state) == {"mean", "std"} | {f"module.{k}" for k in model.module.state_dict()}
    torch.manual_seed(1)
    fresh = as_classifier(torchvision.models.resnet18(num_classes=10), features="avgpool", blocks=RESNET_BLOCKS)
    fresh.load_state_dict(state)
    assert torch.allclose(fresh.eval()(x), before, atol=1e-6)
    twin = copy.deepcopy(model)  # after a pass: the pass's tensors are not copied
    assert twin.module is not model.module and twin.body[0].block is twin.module.layer1
    assert torch.allclose(twin(x), before, atol=1e-6)


def test_a_changed_body_changes_the_network_as_it_would_in_a_classifier():
    """A body module given another tensor than its predecessor's output (NPD puts a layer in the
    body) reruns the network with that tensor in place."""

    class Double(nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            return 2 * h

    net = resnet18().eval()
    model = as_classifier(net, features="avgpool", blocks=RESNET_BLOCKS).eval()
    x = torch.rand(2, 3, 32, 32)
    plain = model(x)
    model.body[2] = nn.Sequential(Double(), model.body[2])
    handle = net.layer3.register_forward_pre_hook(lambda _m, args: (2 * args[0],))
    expected = net(x)
    handle.remove()
    assert torch.allclose(model(x), expected, atol=1e-5) and not torch.allclose(model(x), plain, atol=1e-3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": "layer3"}, "is not what head='fc' reads"),
        ({"blocks": ["layer2", "layer1"]}, "'layer1' ran before 'layer2'"),
        ({"features": "nope"}, "features='nope' is not a module of ResNet"),
        ({"head": "layer1"}, "head='layer1' must be an nn.Linear"),
        ({"blocks": ["layer1", "layer1"]}, "name a module twice"),
        ({"blocks": ["layer1.0.relu"]}, "'layer1.0.relu' runs more than once"),
    ],
)
def test_as_classifier_refuses_names_that_do_not_fit(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_classifier(resnet18(), **options)(torch.rand(2, 3, 32, 32))


def test_as_classifier_refuses_a_head_that_is_not_the_last_step_and_an_output_changed_in_place():
    with pytest.raises(ValueError, match="the output of head='1' is not Sequential's output"):
        as_classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Softmax(1)))(torch.rand(2, 3, 2, 2))
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(256, 10))
    with pytest.raises(ValueError, match="changes the output of '0' in place"):
        as_classifier(net, blocks=["0"])(torch.rand(2, 1, 8, 8))
    assert as_classifier(net, blocks=["1"])(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.heavy  # kept out of CI's 30 minutes: pytest -m heavy
def test_feature_methods_run_on_a_wrapped_torchvision_resnet18():
    """Fine-Pruning, NAD, Neural Cleanse and Spectral Signatures on torchvision's ResNet-18 (random
    weights, 16 px synthetic images), wrapped by module names."""
    suspect = as_classifier(resnet18(), features="avgpool", head="fc", blocks=RESNET_BLOCKS)
    data = images(40, (3, 16, 16))
    head_before = suspect.fc.weight.detach().clone()

    pruned = REPAIRS.create("fine_pruning", epochs=1).repair(suspect, data, CTX)
    count = pruned.details["pruned_channels"]
    assert isinstance(pruned.model, ModuleClassifier) and 0 < count < 512
    # pruned columns of the network's own head stay zero through fine-tuning; the suspect is untouched
    assert int((pruned.model.module.fc.weight == 0).all(0).sum()) == count
    assert torch.equal(suspect.fc.weight, head_before)

    distilled = REPAIRS.create("nad", epochs=1, teacher_epochs=1).repair(suspect, data, CTX).model
    changed = [
        not torch.equal(a, b)
        for a, b in zip(distilled.module.layer4.parameters(), suspect.module.layer4.parameters(), strict=True)
    ]
    assert any(changed)

    detection = DETECTORS.create("neural_cleanse", steps=2, batch_size=16).detect(suspect, data, CTX)
    assert math.isfinite(detection.score) and len(detection.details["mask_norms"]) == 10

    filtering = SAMPLE_FILTERS.create("spectral_signatures").filter(suspect, data, CTX)
    assert filtering.scores.shape == (40,) and 0 < int(filtering.flagged.sum()) < 40


def post_training_methods() -> list[Any]:
    kinds = {
        "repairs": REPAIRS,
        "detectors": DETECTORS,
        "input-detectors": INPUT_DETECTORS,
        "sample-filters": SAMPLE_FILTERS,
    }
    return [
        pytest.param(kind, name, id=f"{kind}-{name}") for kind, registry in kinds.items() for name in registry.names()
    ]


def apply(kind: str, name: str, model: nn.Module, data: TensorDataset) -> None:
    registry = {
        "repairs": REPAIRS,
        "detectors": DETECTORS,
        "input-detectors": INPUT_DETECTORS,
        "sample-filters": SAMPLE_FILTERS,
    }
    method = registry[kind].create(name, **FAST_METHODS.get(kind, {}).get(name, {}))
    if kind == "repairs":
        assert isinstance(method.repair(model, data, CTX).model, nn.Module)
    elif kind == "detectors":
        assert math.isfinite(method.detect(model, data, CTX).score)
    elif kind == "input-detectors":
        method.fit(model, data, CTX)
        assert method.score(data.inputs[:4]).shape == (4,)
    else:
        extra = {"trusted": data} if method.uses_trusted else {}
        assert method.filter(model, data, CTX, **extra).scores.shape == (len(data),)


@pytest.mark.parametrize(("kind", "name"), post_training_methods())
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_method_that_needs_a_classifier_runs_on_the_wrapped_plain_module(kind, name, digits):
    """Every post-training method that refuses a user's plain nn.Sequential for want of a
    Classifier runs once the module is wrapped by name (the others need batch norm, which this
    network has not)."""
    data = digits.train.subset(torch.arange(60))
    try:
        apply(kind, name, user_sequential(), data)
        return  # it takes a plain module as it is
    except (TypeError, ValueError) as refused:
        if "Classifier" not in str(refused):
            pytest.skip(f"refused for another reason: {refused}")
    apply(kind, name, as_classifier(user_sequential(), features="2", blocks=["0", "1", "2"]), data)


# ---------------------------------------------------------------------------------------------
# BackdoorBench's attack_result.pt


class BBPreActBlock(nn.Module):
    """BackdoorBench's ``models/preact_resnet.py`` PreActBlock, as it names its parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class BBPreActResNet18(nn.Module):
    """BackdoorBench's ``PreActResNet18``: it takes normalised images."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        layers = []
        for s in (stride, 1):
            layers.append(BBPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(self.avgpool(out).view(out.size(0), -1))


def bb_model() -> BBPreActResNet18:
    """BackdoorBench's PreActResNet18 with random weights and batch-norm statistics."""
    torch.manual_seed(0)
    model = BBPreActResNet18()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def bb_split(record: Path, folder: str, size: int, poisoned: list[int], kept: list[int], seed: int) -> dict[str, Any]:
    """A ``prepro_cls_DatasetBD_v2.retrieve_state()`` in disk mode, its PNG files written under
    ``record/folder`` (stored paths relative to BackdoorBench's working folder, as it writes them)."""
    rng = np.random.default_rng(seed)
    stored = f"./record/badnet_test/{folder}"
    data_dict = {}
    for index in poisoned:
        label = index % 10
        path = record / folder / str(label) / f"{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        data_dict[np.int64(index)] = {"path": f"{stored}/{label}/{index}.png", "other_info": [0, np.int64(label)]}
    indicator = np.zeros(size)
    indicator[poisoned] = 1
    return {
        "bd_data_container": {"save_folder_path": stored, "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": np.array(kept),
        "poison_indicator": indicator,
        "save_folder_path": stored,
    }


def write_attack_result(record: Path, state: dict[str, Tensor], **extra: Any) -> Path:
    record.mkdir(parents=True, exist_ok=True)
    contents = {
        "model_name": "preactresnet18",
        "num_classes": 10,
        "model": state,
        "data_path": "./data",
        "img_size": [32, 32, 3],
        "clean_data": "cifar10",
        "bd_train": bb_split(record, "bd_train_dataset", 20, [3, 7, 12], list(range(20)), 0),
        "bd_test": bb_split(record, "bd_test_dataset", 10, [1, 2, 5, 8], [1, 2, 5, 8], 1),
        **extra,
    }
    path = record / "attack_result.pt"
    torch.save(contents, path)
    return path


def test_backdoorbench_keys_map_onto_preact_resnet18():
    ours = set(create_model("preact_resnet18", num_classes=10).state_dict()) - {"mean", "std"}
    assert {preact_resnet18_key(k) for k in BBPreActResNet18().state_dict()} == ours
    with pytest.raises(KeyError):
        preact_resnet18_key("layer5.0.conv1.weight")


@pytest.mark.parametrize("prefix", ["", "module."])
def test_a_backdoorbench_attack_result_imports_with_the_same_logits_and_its_data(tmp_path, prefix):
    bb = bb_model()
    state = {prefix + k: v for k, v in bb.state_dict().items()}
    path = write_attack_result(tmp_path / "record", state)
    imported = load_backdoorbench(path)

    x = torch.rand(4, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION["cifar10"])
    with torch.no_grad():
        assert torch.allclose(imported.model(x), bb((x - mean) / std), atol=1e-4)
    assert not imported.model.training and imported.unread == ()

    assert imported.train_poison_mask.nonzero().flatten().tolist() == [3, 7, 12]
    assert imported.poisoned_indices.tolist() == [3, 7, 12] and imported.poisoned_samples.labels.tolist() == [0, 0, 0]
    assert imported.poisoned_original_labels.tolist() == [3, 7, 2]
    png = np.array(Image.open(tmp_path / "record" / "bd_train_dataset" / "7" / "7.png"))
    assert torch.equal(imported.poisoned_samples.inputs[1], torch.from_numpy(png).permute(2, 0, 1))
    assert imported.triggered.inputs.shape == (4, 3, 32, 32)
    assert (
        imported.triggered.true_labels.tolist() == [1, 2, 5, 8] and imported.triggered.target_labels.tolist() == [0] * 4
    )

    clean = images(20, (3, 32, 32))
    full = imported.poisoned_training_set(clean)
    assert full.num_poisoned == 3 and torch.equal(full.data.inputs[7], imported.poisoned_samples.inputs[1])
    assert (
        torch.equal(full.data.inputs[0], clean.inputs[0]) and full.data.labels[7] == 0 and full.original_labels[7] == 7
    )
    with pytest.raises(DataError, match="not in BackdoorBench's order"):
        imported.poisoned_training_set(clean.replace(labels=(clean.labels + 1) % 10))


class Payload:
    """Any class of the user's: unpickling it imports this module."""


class RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("the file ran code",))


@pytest.mark.parametrize(
    ("payload", "named"), [(RunsCode(), "builtins.print"), (Payload(), "tests.test_adapters.Payload")]
)
def test_a_backdoorbench_file_with_pickled_code_is_refused_naming_it(tmp_path, capsys, payload, named):
    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": "preactresnet18", "num_classes": 10, "model": {}, "args": payload}, path)
    with pytest.raises(BackdoorBenchFileError, match="refused") as refused:
        load_backdoorbench(path)
    assert str(path) in str(refused.value) and named in str(refused.value) and "run as code" in str(refused.value)
    assert "the file ran code" not in capsys.readouterr().out


def test_in_memory_images_are_not_built_but_the_model_loads(tmp_path):
    """A record kept in memory (save_folder_path None) pickles PIL images: the model loads, the
    images are reported unread."""
    model = nn.Linear(4, 2)
    bd = bb_split(tmp_path, "unused", 4, [], [0, 1, 2, 3], 0)
    bd["bd_data_container"]["data_dict"] = {np.int64(1): (Image.new("RGB", (2, 2)), 0, 1)}
    bd["poison_indicator"][1] = 1
    state = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    path = tmp_path / "attack_result.pt"
    torch.save({"model_name": "mine", "num_classes": 2, "model": state, "clean_data": "cifar10", "bd_train": bd}, path)
    imported = load_backdoorbench(path, model=model)
    assert imported.model is model and torch.equal(model.weight, torch.ones(2, 4))
    assert imported.poisoned_samples is None and imported.train_poison_mask.tolist() == [False, True, False, False]
    assert any("pickled PIL images" in line for line in imported.unread), imported.unread


def test_numpy_arrays_pickled_by_numpy_1_are_read(tmp_path):
    """BackdoorBench's records made under numpy 1 name ``numpy.core.multiarray``, not ``numpy._core``."""
    record = {"model_name": "preactresnet18", "num_classes": 10, "model": {}, "a": np.arange(3), "k": {np.int64(3): 1}}
    torch.save(record, tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as new, zipfile.ZipFile(tmp_path / "old.pt", "w") as old:
        for info in new.infolist():
            data = new.read(info)
            old.writestr(info, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(
        tmp_path / "old.pt"
    )
    contents = read_attack_result(tmp_path / "old.pt")
    assert contents["a"].tolist() == [0, 1, 2] and contents["k"] == {3: 1}


def test_backdoorbench_import_says_what_is_wrong(tmp_path):
    with pytest.raises(BackdoorBenchFileError, match="does not exist"):
        load_backdoorbench(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(BackdoorBenchFileError, match="not a torch file"):
        load_backdoorbench(tmp_path / "text.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(BackdoorBenchFileError, match="needs the keys model_name, num_classes, model"):
        load_backdoorbench(tmp_path / "other.pt")
    torch.save({"model_name": "vgg19_bn", "num_classes": 10, "model": {}, "clean_data": "cifar10"}, tmp_path / "vgg.pt")
    with pytest.raises(BackdoorBenchFileError, match="'vgg19_bn' has no backdoorlab counterpart"):
        load_backdoorbench(tmp_path / "vgg.pt")
    state = {"conv1.weight": torch.zeros(64, 3, 3, 3), "linear.weight": torch.zeros(10, 512)}
    torch.save(
        {"model_name": "preactresnet18", "num_classes": 10, "model": state, "clean_data": "cifar10"}, tmp_path / "p.pt"
    )
    with pytest.raises(BackdoorBenchFileError, match="do not fit preact_resnet18"):
        load_backdoorbench(tmp_path / "p.pt", data=False)


# ---------------------------------------------------------------------------------------------
# timm by name


def test_timm_architectures_by_name_are_wrapped_at_their_stages():
    """A timm ResNet's head reads its last stage pooled: that map is the features and the earlier
    stages are the body; a ConvNeXt's head norms the pooled map first, so its features are the
    head's input."""
    resnet = create_model("timm", 10, 1, arch="resnet18").eval()
    x = torch.rand(3, 1, 32, 32)
    assert isinstance(resnet, ModuleClassifier) and resnet.fc is resnet.module.fc
    assert (resnet.features_name, resnet.block_names) == ("layer4", ("act1", "layer1", "layer2", "layer3"))
    assert resnet.forward_features(x).shape == (3, 512, 1, 1)
    assert torch.allclose(resnet(x), resnet.module(x), atol=1e-5)
    convnext = create_model("timm", 10, 3, arch="convnext_atto").eval()
    assert convnext.features_name is None and len(convnext.body) == 5
    assert convnext.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, 320)


def test_an_unknown_timm_architecture_names_close_ones():
    with pytest.raises(ValueError, match="no architecture 'resnet_18'; close names: .*resnet18"):
        create_model("timm", 10, 3, arch="resnet_18")


@pytest.mark.slow
def test_a_backdoor_takes_on_a_timm_network_trained_by_the_run():
    config = RunConfig(dataset="digits", model="timm", model_options={"arch": "resnet10t"}, attack="badnets", seed=0)
    metrics = run(config).metrics
    assert metrics["clean_accuracy"] > 0.9 and metrics["attack_success_rate"] > 0.9
