"""Read an attack made with BackdoorBench (``SCLBD/BackdoorBench``) so that its model can be
defended here: the ``attack_result.pt`` its attack scripts save (``utils/save_load_attack.py``,
``save_attack_result``).

That file is a pickled dict: ``model_name``, ``num_classes``, ``model`` (the state_dict),
``data_path``, ``img_size``, ``clean_data`` (the dataset's name), and ``bd_train`` / ``bd_test``,
the state of BackdoorBench's poisoned datasets (``utils/bd_dataset_v2.py``): the poison indicator
over the split and its original indices (numpy arrays), and per poisoned sample its poisoned label,
its original label and the path of its image. Every attack script writes those images as PNG files
beside the file (``bd_train_dataset/<label>/<index>.png``, ``bd_test_dataset/...``); the clean
images are not in the record (BackdoorBench reloads them from its data folder).

:func:`load_backdoorbench` reads the file with ``torch.load(weights_only=True)``, which builds
tensors, numbers, strings and containers and runs no code from the file; numpy arrays and scalars
(how BackdoorBench stores indices and labels) are allowed too. A file that holds any other pickled
object is refused, naming it, before anything is loaded, except pickled PIL images (the datasets
of a record written with ``save_folder_path=None``, kept in memory): those are read as placeholders,
never built, so the model loads and the result says which images could not be read.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from backdoorlab.attacks.poisoning import PoisonedDataset, TriggeredTestSet
from backdoorlab.data.dataset import DataError, TensorDataset
from backdoorlab.models.registry import create_model

#: BackdoorBench's per-dataset normalisation, which its transforms apply before the model
#: (``utils/aggregate_block/dataset_and_transform_generate.py``, ``get_dataset_normalization``).
#: backdoorlab's models normalise inside, so an imported model takes [0, 1] images.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.5,), (0.5,)),
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "gtsrb": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "celeba": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
#: The keys every ``attack_result.pt`` holds.
REQUIRED_KEYS = ("model_name", "num_classes", "model")


class BackdoorBenchFileError(ValueError):
    """An ``attack_result.pt`` that is missing, not a torch file, holds pickled code, or does not
    fit the model it names."""


def preact_resnet18_key(key: str) -> str:
    """BackdoorBench's ``PreActResNet18`` parameter name (``models/preact_resnet.py``) as backdoorlab's
    ``preact_resnet18`` names it: ``conv1`` is ``body.0``, ``layerS.B`` is ``body.S.B`` (its
    ``shortcut.0`` convolution is ``shortcut``), ``linear`` is ``fc``. A ``KeyError`` for any other."""
    if key.startswith("conv1."):
        return "body.0." + key.removeprefix("conv1.")
    if key.startswith("linear."):
        return "fc." + key.removeprefix("linear.")
    match = re.fullmatch(r"layer([1-4])\.(\d+)\.((?:bn|conv)[12]\.\w+|shortcut\.0\.weight)", key)
    if match is None:
        raise KeyError(key)
    stage, block, rest = match.groups()
    return f"body.{stage}.{block}.{rest.replace('shortcut.0.', 'shortcut.')}"


#: BackdoorBench's model names that a backdoorlab model takes the weights of: the backdoorlab
#: name and the key mapping.
MODEL_MAPS: dict[str, tuple[str, Callable[[str], str]]] = {
    "preactresnet18": ("preact_resnet18", preact_resnet18_key),
}


@dataclass(frozen=True)
class BackdoorBenchAttack:
    """What :func:`load_backdoorbench` read.

    Attributes:
        model: the attacked model in eval mode (backdoorlab's counterpart, or the module passed in),
            taking [0, 1] images: ``mean``/``std`` are BackdoorBench's normalisation for ``dataset``.
        model_name, dataset, num_classes, img_size: the file's own fields (``dataset`` is its
            ``clean_data``).
        train_poison_mask: which samples of BackdoorBench's training split (its order, torchvision's
            for CIFAR-10) were poisoned; ``None`` where the file has no ``bd_train``.
        poisoned_samples: the poisoned training samples, as the victim saw them, with their
            (poisoned) labels; ``poisoned_indices`` their places in the training split and
            ``poisoned_original_labels`` their true classes. ``None`` where the images cannot be read.
        triggered: the triggered test samples BackdoorBench measures the attack success rate on.
        unread: a sentence for each part of the file that could not be read, and why.
    """

    model: nn.Module
    model_name: str
    dataset: str
    num_classes: int
    img_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_poison_mask: Tensor | None
    poisoned_samples: TensorDataset | None
    poisoned_indices: Tensor | None
    poisoned_original_labels: Tensor | None
    triggered: TriggeredTestSet | None
    unread: tuple[str, ...] = ()

    def poisoned_training_set(self, clean_train: TensorDataset) -> PoisonedDataset:
        """The full poisoned training set: ``clean_train`` (BackdoorBench's training split, in its
        order) with the poisoned samples put in place, and the mask and true labels for the
        evaluation. Refuses a set whose size or labels show another order."""
        if self.poisoned_samples is None or self.train_poison_mask is None:
            raise DataError(
                "the BackdoorBench file's poisoned training images were not read: " + "; ".join(self.unread)
            )
        assert self.poisoned_indices is not None and self.poisoned_original_labels is not None
        if len(clean_train) != len(self.train_poison_mask):
            raise DataError(
                f"the clean training set has {len(clean_train)} samples, BackdoorBench's had {len(self.train_poison_mask)}"
            )
        index = self.poisoned_indices
        differ = int((clean_train.labels[index] != self.poisoned_original_labels).sum())
        if differ:
            raise DataError(
                f"{differ} of the {len(index)} poisoned samples' true labels differ from the clean training "
                "set's at their indices: it is not in BackdoorBench's order"
            )
        if clean_train.input_shape != self.poisoned_samples.input_shape:
            raise DataError(
                f"the clean training images are {clean_train.input_shape}, the poisoned ones "
                f"{self.poisoned_samples.input_shape}"
            )
        inputs, labels = clean_train.inputs.clone(), clean_train.labels.clone()
        inputs[index], labels[index] = self.poisoned_samples.inputs, self.poisoned_samples.labels
        data = clean_train.replace(inputs=inputs, labels=labels)
        return PoisonedDataset(data, self.train_poison_mask.clone(), clean_train.labels.clone())


def load_backdoorbench(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    data: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> BackdoorBenchAttack:
    """Read BackdoorBench's ``attack_result.pt`` at ``path`` safely (module docstring).

    Args:
        path: the file, in its record folder (the poisoned images are read from beside it).
        model: a module to load the weights into, as BackdoorBench names them (for an architecture
            that has no backdoorlab counterpart in :data:`MODEL_MAPS`; wrap it with
            ``models.as_classifier(..., mean=..., std=...)`` for the defenses). ``None``: build the
            counterpart of the file's ``model_name``.
        data: also read the poisoned training samples and the triggered test set.
        mean, std: the normalisation BackdoorBench applied before the model; by default its own
            for the file's dataset (:data:`NORMALIZATION`), required for another dataset.
    """
    path = Path(path)
    contents = read_attack_result(path)
    name, num_classes = str(contents["model_name"]), int(contents["num_classes"])
    dataset = str(contents.get("clean_data", ""))
    if (mean is None) != (std is None):
        raise ValueError("load_backdoorbench: give mean and std together, or neither")
    if mean is None:
        if dataset not in NORMALIZATION:
            raise BackdoorBenchFileError(
                f"{path}: dataset {dataset!r} has no known BackdoorBench normalisation "
                f"(known: {', '.join(NORMALIZATION)}): pass mean= and std="
            )
        mean, std = NORMALIZATION[dataset]
    assert std is not None
    state = _state_dict(contents["model"], path)
    if model is None:
        model = _counterpart(name, num_classes, state, mean, std, path)
    else:
        _load(model, state, path, type(model).__name__)
    unread: list[str] = []
    train = test = None
    if data:
        train = _poisoned_split(contents.get("bd_train"), "bd_train", path, num_classes, mean, std, unread)
        test = _poisoned_split(contents.get("bd_test"), "bd_test", path, num_classes, mean, std, unread)
    samples = train.samples if train is not None else None
    return BackdoorBenchAttack(
        model=model.eval(),
        model_name=name,
        dataset=dataset,
        num_classes=num_classes,
        img_size=tuple(int(v) for v in contents.get("img_size", ()) or ()),
        mean=tuple(mean),
        std=tuple(std),
        train_poison_mask=train.mask if train is not None else None,
        poisoned_samples=samples,
        poisoned_indices=train.indices if samples is not None else None,
        poisoned_original_labels=train.original if samples is not None else None,
        triggered=test.triggered() if test is not None and test.samples is not None else None,
        unread=tuple(unread),
    )


# ---------------------------------------------------------------------------------------------
# reading the file


class _Unread:
    """What a pickled PIL image becomes: a placeholder that keeps nothing and runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Unread:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _numpy_globals() -> tuple[list[Any], set[str]]:
    """What numpy arrays and scalars unpickle with (the objects, and their pickled names under
    numpy 1 and 2): building them runs no code of the file's."""
    core = getattr(np, "_core", None) or np.core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    dtypes = sorted({type(np.dtype(code)) for code in "?bhilqBHILQefdgFDOUS"}, key=str)
    objects: list[Any] = [np.ndarray, np.dtype, reconstruct, scalar, *dtypes]
    names = {f"{o.__module__}.{o.__qualname__}" for o in (np.ndarray, np.dtype, *dtypes)}
    for package in ("numpy.core", "numpy._core"):
        for function, fname in ((reconstruct, "_reconstruct"), (scalar, "scalar")):
            objects.append((function, f"{package}.multiarray.{fname}"))
            names.add(f"{package}.multiarray.{fname}")
    return objects, names


def read_attack_result(path: str | Path) -> dict[str, Any]:
    """The dict in ``attack_result.pt``, read weights-only; pickled PIL images become placeholders
    and any other pickled object refuses the file, naming it (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise BackdoorBenchFileError(f"BackdoorBench file {path} does not exist")
    allowed, numpy_names = _numpy_globals()
    try:  # lists the pickle's globals without running it
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError) as err:
        raise BackdoorBenchFileError(f"{path} is not a torch file written by torch.save: {err}") from None
    images = [name for name in found if name.startswith("PIL.")]
    code = [name for name in found if name not in numpy_names and name not in images]
    if code:
        raise BackdoorBenchFileError(_refusal(path, ", ".join(code)))
    try:
        with torch.serialization.safe_globals([*allowed, *((_Unread, name) for name in images)]):
            contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise BackdoorBenchFileError(_refusal(path, reason)) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        raise BackdoorBenchFileError(f"{path} is not a readable torch file: {err}") from None
    if not isinstance(contents, dict) or any(key not in contents for key in REQUIRED_KEYS):
        keys = sorted(map(str, contents)) if isinstance(contents, dict) else type(contents).__name__
        raise BackdoorBenchFileError(
            f"{path} is not a BackdoorBench attack_result.pt: it needs the keys {', '.join(REQUIRED_KEYS)}, has {keys}"
        )
    return contents


def _refusal(path: Path, what: str) -> str:
    return (
        f"{path}: refused: it holds pickled {what}, which loading would have to import and run as code; "
        "backdoorlab reads attack_result.pt weights-only (tensors, numbers, strings, containers, numpy "
        "arrays). If you trust the file, save its 'model' state_dict and data as plain tensors and read those"
    )


def _state_dict(state: Any, path: Path) -> dict[str, Tensor]:
    """The file's ``model`` as a state_dict, without DataParallel's ``module.`` prefix."""
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise BackdoorBenchFileError(f"{path}: its 'model' is not a state_dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _counterpart(
    name: str, num_classes: int, state: dict[str, Tensor], mean: Sequence[float], std: Sequence[float], path: Path
) -> nn.Module:
    """backdoorlab's model for BackdoorBench's ``name``, with the file's weights."""
    if name not in MODEL_MAPS:
        raise BackdoorBenchFileError(
            f"{path}: BackdoorBench model '{name}' has no backdoorlab counterpart (known: {', '.join(MODEL_MAPS)}); "
            "build it yourself and pass it as model=..."
        )
    ours, key = MODEL_MAPS[name]
    first = next((v for v in state.values() if v.dim() == 4), None)
    in_channels = int(first.shape[1]) if first is not None else len(mean)
    mean, std = _per_channel(mean, in_channels, path), _per_channel(std, in_channels, path)
    model = create_model(ours, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)
    try:
        mapped = {key(k): v for k, v in state.items()}
    except KeyError as err:
        raise BackdoorBenchFileError(f"{path}: '{err.args[0]}' is not a parameter of BackdoorBench's {name}") from None
    mapped.update(mean=model.mean, std=model.std)
    _load(model, mapped, path, ours)
    return model


def _per_channel(values: Sequence[float], channels: int, path: Path) -> tuple[float, ...]:
    """``values`` for ``channels`` channels: one value stands for all (as torchvision's
    ``Normalize([0.5], [0.5])`` on BackdoorBench's 3-channel MNIST)."""
    if len(values) == 1:
        return tuple(values) * channels
    if len(values) != channels:
        raise BackdoorBenchFileError(f"{path}: {channels} channels, but a normalisation of {len(values)} values")
    return tuple(values)


def _load(model: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        reason = " ".join(str(err).split())  # load_state_dict's message spans lines
        raise BackdoorBenchFileError(f"{path}: the weights do not fit {what}: {reason}") from None


# ---------------------------------------------------------------------------------------------
# the poisoned datasets


@dataclass(frozen=True)
class _Split:
    """One of the file's poisoned datasets: the mask over the split, and its poisoned samples."""

    mask: Tensor
    indices: Tensor
    original: Tensor
    samples: TensorDataset | None

    def triggered(self) -> TriggeredTestSet:
        assert self.samples is not None
        return TriggeredTestSet(self.samples.inputs, self.original, self.samples.labels)


def _poisoned_split(
    state: Any,
    key: str,
    path: Path,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    unread: list[str],
) -> _Split | None:
    """Read ``bd_train`` or ``bd_test`` (``prepro_cls_DatasetBD_v2.retrieve_state``): the poisoned
    samples among the split's ``original_index_array``; ``None`` (and a sentence in ``unread``)
    where the file holds none or in another form."""
    if state is None:
        unread.append(f"{key}: the file holds none")
        return None
    try:
        container = state["bd_data_container"]
        entries: dict[int, Any] = {int(k): v for k, v in container["data_dict"].items()}
        indicator = torch.as_tensor(np.asarray(state["poison_indicator"])).flatten() != 0
        kept = torch.as_tensor(np.asarray(state["original_index_array"], dtype=np.int64)).flatten()
    except (KeyError, TypeError, ValueError) as err:
        unread.append(f"{key}: not in BackdoorBench's bd_dataset_v2 form ({type(err).__name__}: {err})")
        return None
    indices = torch.tensor([i for i in kept[indicator[kept]].tolist() if i in entries], dtype=torch.long)
    poisoned = [entries[int(i)] for i in indices]
    labels = torch.tensor([int(_info(e)[0]) for e in poisoned], dtype=torch.long)
    original = torch.tensor([int(_info(e)[1]) for e in poisoned], dtype=torch.long)
    images = _read_images(poisoned, container, key, path, unread)
    samples = None
    if images is not None:
        classes = tuple(str(i) for i in range(num_classes))
        channels = images.shape[3] if images.ndim == 4 else 1
        try:
            samples = TensorDataset.from_arrays(
                images,
                labels,
                classes=classes,
                name=f"backdoorbench-{key}",
                channels_last=images.ndim == 4,
                mean=_per_channel(mean, channels, path),
                std=_per_channel(std, channels, path),
            )
        except (DataError, BackdoorBenchFileError) as err:
            unread.append(f"{key}: {err}")
    return _Split(indicator, indices, original, samples)


def _info(entry: Any) -> tuple[Any, Any]:
    """``(poisoned label, original label)`` of a stored sample: ``{"path", "other_info"}`` on disk,
    ``(image, poisoned label, original label)`` in memory."""
    if isinstance(entry, Mapping):
        bd_label, label = entry["other_info"][:2]
        return bd_label, label
    return entry[1], entry[2]


def _read_images(
    entries: list[Any], container: Mapping[str, Any], key: str, path: Path, unread: list[str]
) -> np.ndarray | None:
    """The images of ``entries`` as uint8 ``(N, H, W)`` or ``(N, H, W, C)``, or ``None`` with a reason."""
    if not entries:
        unread.append(f"{key}: no poisoned samples")
        return None
    if not all(isinstance(e, Mapping) for e in entries):
        unread.append(
            f"{key}: its {len(entries)} poisoned images are pickled PIL images inside the file, which a weights-only "
            "load does not build; rerun the attack with its default save_folder_path to have them as PNG files"
        )
        return None
    folder = Path(str(container.get("save_folder_path") or ""))
    arrays = []
    for entry in entries:
        file = _image_file(Path(str(entry["path"])), folder, path.parent)
        if file is None:
            unread.append(f"{key}: its poisoned images are PNG files beside the file; {entry['path']} is not found")
            return None
        with Image.open(file) as img:
            arrays.append(np.asarray(img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB")))
    try:
        return np.stack(arrays)
    except ValueError:
        unread.append(f"{key}: its poisoned images differ in size")
        return None


def _image_file(stored: Path, folder: Path, record: Path) -> Path | None:
    """Where a stored image path is now: as stored, else under the record folder (BackdoorBench
    stores ``<record>/bd_train_dataset/<label>/<index>.png``, the record relative to its cwd)."""
    candidates = [stored]
    if folder.name and stored.is_relative_to(folder):
        candidates.append(record / folder.name / stored.relative_to(folder))
    candidates.append(record.joinpath(*stored.parts[-3:]))
    return next((c for c in candidates if c.is_file()), None)
