"""A disk cache of decoded tensors, so 50k images are decoded once per source file.

The cache lives in ``$BACKDOORLAB_CACHE`` (default ``~/.cache/backdoorlab``). An entry's key is the
source file's absolute path, size and modification time, plus a format version; a changed file gets
a new entry. Entries are written atomically (temporary file, then rename), so an interrupted
decode never leaves a broken entry behind. :func:`cached_by_key` keeps anything else that is costly
to build under a key of the caller's (a fitted attack's networks, keyed by their data and options).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

FORMAT_VERSION = 1


def cache_dir() -> Path:
    """The toolkit's cache folder (created on demand)."""
    root = os.environ.get("BACKDOORLAB_CACHE") or Path.home() / ".cache" / "backdoorlab"
    return Path(root)


def cached(source: Path, tag: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Return ``build()``'s dict of tensors and strings, cached on disk against ``source``."""
    stat = source.stat()
    return cached_by_key(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}", tag, build)


def cached_by_key(key: str, tag: str, build: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Return ``build()``'s dict of tensors and strings, cached on disk under ``key`` (any string
    that names everything the value depends on; it is hashed with the format version)."""
    digest = hashlib.sha256(f"{key}|{FORMAT_VERSION}".encode()).hexdigest()[:16]
    entry = cache_dir() / f"{tag}-{digest}.pt"
    if entry.exists():
        try:
            return torch.load(entry, weights_only=True)
        except Exception:  # a truncated or foreign file: rebuild it
            entry.unlink(missing_ok=True)
    value = build()
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, tmp)
    os.replace(tmp, entry)
    return value


def images_key(tag: str, version: int, config: dict[str, object], images: torch.Tensor) -> str:
    """A :func:`cached_by_key` key for something fitted on ``images`` with the options ``config``
    (a fitted attack's networks): the tag, a version the caller bumps when its networks or trainer
    change, the options, the images' shape and bytes, and the device and torch version (a network
    trained on CUDA is not bit-identical to one trained on a CPU)."""
    digest = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()
    shape = "x".join(map(str, images.shape))
    where = f"{images.device.type}|{torch.__version__}"
    return f"{tag}|{version}|{json.dumps(config, sort_keys=True)}|{shape}|{digest}|{where}"


def fitted_on_images(
    tag: str,
    version: int,
    config: dict[str, object],
    images: torch.Tensor | None,
    count: int,
    seed: int,
    train: Callable[[torch.Tensor], Sequence[nn.Module]],
    networks: Callable[[], Sequence[nn.Module]],
    parts: Sequence[str],
    *,
    input_shape: tuple[int, ...],
    what: str,
) -> tuple[torch.Tensor, tuple[nn.Module, ...], bool]:
    """The networks an attack fits on the attacker's clean images (SSBA's encoder and decoder,
    Poison Ink's hiding and reveal networks): ``train(chosen)`` on at most ``count`` of ``images``
    chosen by ``seed``, their weights cached under :func:`images_key` by ``parts`` (their names, in
    order). Returns the chosen images, fresh ``networks()`` holding those weights, in eval mode and
    frozen, and whether they were trained now (else loaded). No images, or images of another shape
    than ``input_shape``, are refused, naming ``what`` the attack ``tag`` trains."""
    if images is None or len(images) == 0:
        raise ValueError(f"{tag} trains {what} on the attacker's clean images: fit(None, images=...)")
    if tuple(images.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{tag} was built for {tuple(input_shape)} images, got {tuple(images.shape[1:])}")
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    chosen = images[chosen.to(images.device)]
    trained = False

    def build() -> dict[str, object]:
        nonlocal trained
        trained = True
        return {part: net.state_dict() for part, net in zip(parts, train(chosen), strict=True)}

    state = cached_by_key(images_key(tag, version, config, chosen), tag, build)
    fresh = tuple(networks())
    for part, net in zip(parts, fresh, strict=True):
        net.load_state_dict(state[part])  # type: ignore[arg-type]
        net.eval().requires_grad_(False)
    return chosen, fresh, trained
