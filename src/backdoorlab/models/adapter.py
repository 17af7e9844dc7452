"""``as_classifier``: any ``nn.Module`` as a :class:`Classifier`, so that every defense that reads
features (fine-pruning, NAD, activation clustering, E2ABL, NPD...) works on it.

The wrapper needs no code per architecture: it names the network's own modules by their paths
(``module.get_submodule``) and reads their outputs with forward hooks while the network runs its
own ``forward``. Three names make the :class:`Classifier` split:

- ``head``: the final ``nn.Linear`` (default: the last ``nn.Linear`` the module registers);
- ``features``: the module whose output, average-pooled where it still has spatial axes and
  flattened, is exactly what the head reads (``"avgpool"`` of a torchvision ResNet, or its
  ``"layer4"``); default: the head's input itself, read by a pre-hook on the head;
- ``blocks``: modules the forward runs one after another (a ResNet's ``layer1``..``layer4``): each
  becomes one module of ``body``, so that NAD distils attention at the last three and E2ABL,
  BEATRIX and NPD cut the network there. Without blocks the body is one module.

The first call checks, once, on a few of its inputs in eval mode, that the head's output is the
module's output and that the head reads the pooled ``features``, and refuses names that do not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from backdoorlab.models.classifier import Classifier


def as_classifier(
    module: nn.Module,
    features: str | None = None,
    head: str | None = None,
    blocks: Sequence[str] = (),
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ModuleClassifier:
    """``module`` (inputs to logits) as a :class:`Classifier` that every feature-reading defense takes.

    Args:
        module: your network; it is wrapped, not copied (the wrapper trains and repairs it).
        features: path of the module whose output, average-pooled over any spatial axes and
            flattened, the head reads (``"avgpool"``); ``None``: the head's input.
        head: path of the final ``nn.Linear``, whose output is the module's output (``"fc"``);
            ``None``: the last ``nn.Linear`` in ``module.named_modules()``.
        blocks: paths of modules the forward runs in this order, each reading only the previous
            one's output (a ResNet's stages): the body's modules, where NAD, E2ABL, BEATRIX and NPD
            cut the network.
        mean, std: per-channel normalisation the wrapper applies to the [0, 1] inputs the toolkit
            gives models (the dataset's ``mean`` and ``std``); ``None``: inputs reach ``module`` as
            they come (a module that normalises itself, or takes raw [0, 1] inputs).
    """
    if (mean is None) != (std is None):
        raise ValueError("as_classifier: give mean and std together, or neither")
    head = head if head is not None else _last_linear(module)
    return ModuleClassifier(module, head, features, tuple(blocks), mean=mean, std=std)


def _last_linear(module: nn.Module) -> str:
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"as_classifier: {type(module).__name__} has no nn.Linear to take as the head; "
            "name the final linear layer with head=..."
        )
    return linears[-1]


def _submodule(module: nn.Module, path: str, option: str) -> nn.Module:
    """``module``'s submodule at ``path``, or a ``ValueError`` naming the option and the choices."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = ", ".join(repr(name) for name, _ in module.named_children())
        raise ValueError(
            f"as_classifier: {option}={path!r} is not a module of {type(module).__name__} "
            f"(its top-level modules: {names}; paths are dotted, as in named_modules())"
        ) from None


@dataclass
class _Trace:
    """One pass of the wrapped module: its input, the outputs at the cuts (blocks, then features)."""

    input: Tensor
    cuts: list[Any]
    output: Any


class _Segment(nn.Module):
    """Body module ``index``: the wrapped network from the previous cut to cut ``index`` (block
    ``index``'s output, or the features for the last one). It holds its block, so the block's
    parameters and convolutions are found in the body, but runs through its owner's hooks."""

    def __init__(self, owner: ModuleClassifier, index: int, block: nn.Module | None, name: str) -> None:
        super().__init__()
        self.index, self.name = index, name
        if block is not None:
            self.block = block
        self.__dict__["_owner"] = owner  # not a submodule: the owner holds this one

    def forward(self, h: Tensor) -> Tensor:
        return self._owner._segment(self.index, h)

    def extra_repr(self) -> str:
        return f"to {self.name}"


class ModuleClassifier(Classifier):
    """A network wrapped by :func:`as_classifier`: ``forward_features`` and ``body`` read the
    network's cuts with forward hooks, ``forward_head`` pools them and applies its own head (``fc``).

    The body's modules run as a chain: the first runs the whole network once, recording every cut,
    and each next one returns the next cut when it is given the previous one (so a full pass, and
    NAD's or E2ABL's, runs the network once). A body module given another tensor (a body that a
    method changed, as NPD puts a layer in) reruns the network from the pass's input with that
    tensor put in place of the previous cut: exact for blocks that form a chain, at the cost of a
    second pass (in train mode its batch norms see the batch twice).

    ``state_dict`` holds the network's own keys under ``module.`` (the body's references to the
    blocks are left out, and filled in again on loading), with ``mean`` and ``std``.
    """

    def __init__(
        self,
        module: nn.Module,
        head: str,
        features: str | None,
        blocks: tuple[str, ...],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # Classifier's own parts (body, fc) are the network's here
        linear = _submodule(module, head, "head")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"as_classifier: head={head!r} must be an nn.Linear, got {type(linear).__name__}")
        if features is not None:
            _submodule(module, features, "features")
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"as_classifier: blocks name a module twice: {list(blocks)}")
        self.register_buffer("mean", torch.tensor(list(mean) if mean is not None else [0.0], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std) if std is not None else [1.0], dtype=torch.float32))
        self.module = module
        self.head_name, self.features_name, self.block_names = head, features, blocks
        segments = [_Segment(self, i, _submodule(module, name, "blocks"), name) for i, name in enumerate(blocks)]
        segments.append(_Segment(self, len(blocks), None, features or f"the input of {head}"))
        self.body = nn.Sequential(*segments)
        self.pool = "avg"
        self.logit_scale = 1.0
        self.num_features, self.num_classes = linear.in_features, linear.out_features
        self.shallow_depth = 1  # E2ABL's shallow head: after the first block
        self._trace: _Trace | None = None
        self._checked = False
        self.register_state_dict_post_hook(_drop_aliases)
        self.register_load_state_dict_pre_hook(_fill_aliases)

    @property
    def fc(self) -> nn.Linear:
        """The network's head (fine-pruning zeroes its columns; the network sees the change)."""
        return self.module.get_submodule(self.head_name)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = features.flatten(2).mean(-1) if features.dim() > 2 else features
        return pooled if pre_logits else self.fc(pooled)

    def _cut_names(self) -> list[str]:
        return [*self.block_names, self.features_name or f"the input of {self.head_name}"]

    def _segment(self, index: int, h: Tensor) -> Tensor:
        """Body module ``index`` applied to ``h`` (see the class docstring)."""
        trace = self._trace
        if index == 0:
            if not self._checked:
                self._check(h)
            self._trace = self._run(h)
        elif trace is not None and trace.cuts[index - 1] is h:
            return trace.cuts[index]
        elif trace is None:
            raise RuntimeError(
                f"body module {index} of an as_classifier model continues a pass: run body module 0 "
                "on the normalised input first (forward_body(normalize(x), 0, k))"
            )
        else:
            self._trace = self._run(trace.input, replace=(index - 1, h))
        return self._trace.cuts[index]

    def _run(self, x: Tensor, replace: tuple[int, Tensor] | None = None) -> _Trace:
        """Run the network on ``x`` recording every cut (and putting ``replace[1]`` in place of cut
        ``replace[0]``); refuse cuts that do not run, run twice or run out of order."""
        names = self._cut_names()
        cuts: list[Any] = [None] * len(names)
        versions: list[int | None] = [None] * len(names)

        def record(index: int, value: Any) -> Any:
            if cuts[index] is not None:
                raise ValueError(
                    f"as_classifier: {names[index]!r} runs more than once per forward; name one that runs once"
                )
            earlier = [names[i] for i in range(index) if cuts[i] is None]
            if earlier:
                raise ValueError(
                    f"as_classifier: {names[index]!r} ran before {earlier[0]!r}: list blocks in the order the forward runs them"
                )
            cuts[index] = replace[1] if replace is not None and replace[0] == index else value
            versions[index] = _version(cuts[index])
            return cuts[index]

        hooks = [
            _submodule(self.module, name, "blocks").register_forward_hook(lambda _m, _args, out, i=i: record(i, out))
            for i, name in enumerate(self.block_names)
        ]
        last = len(names) - 1
        if self.features_name is not None:
            target = self.module.get_submodule(self.features_name)
            hooks.append(target.register_forward_hook(lambda _m, _args, out: record(last, out)))
        else:
            hooks.append(self.fc.register_forward_pre_hook(lambda _m, args: (record(last, args[0]), *args[1:])))
        try:
            output = self.module(x)
        finally:
            for hook in hooks:
                hook.remove()
        missing = [name for name, cut in zip(names, cuts, strict=True) if cut is None]
        if missing:
            raise ValueError(f"as_classifier: {missing[0]!r} did not run in {type(self.module).__name__}'s forward")
        changed = [name for name, cut, v in zip(names, cuts, versions, strict=True) if _version(cut) != v]
        if changed:
            raise ValueError(
                f"as_classifier: the forward changes the output of {changed[0]!r} in place (an in-place "
                "activation after it?): name the module after that change"
            )
        return _Trace(x, cuts, output)

    @torch.no_grad()
    def _check(self, x: Tensor) -> None:
        """Refuse, on the first pass, a ``head`` whose output is not the module's or ``features``
        that are not what the head reads (eval mode, float32, a few inputs; modes restored)."""
        modes = [(m, m.training) for m in self.module.modules()]
        seen: dict[str, tuple[Tensor, Tensor]] = {}

        def read_head(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            seen.setdefault("head", (args[0], out))

        hook = self.fc.register_forward_hook(read_head)
        self.module.eval()
        try:
            with torch.autocast(x.device.type, enabled=False):
                trace = self._run(x[:8].float())
        finally:
            hook.remove()
            for m, mode in modes:
                m.training = mode
        if "head" not in seen:
            raise ValueError(f"as_classifier: head={self.head_name!r} did not run in the forward")
        head_in, head_out = seen["head"]
        if not (isinstance(trace.output, Tensor) and _close(trace.output, head_out)):
            raise ValueError(
                f"as_classifier: the output of head={self.head_name!r} is not {type(self.module).__name__}'s "
                "output: name the final nn.Linear, whose output the forward returns"
            )
        if not _close(self.forward_head(trace.cuts[-1], pre_logits=True), head_in.flatten(1)):
            raise ValueError(
                f"as_classifier: features={self.features_name!r}, average-pooled and flattened, is not what "
                f"head={self.head_name!r} reads: name the module whose output the head takes (or leave features out)"
            )
        self._checked = True

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_trace"] = None  # a pass's tensors are not part of the model (nor deep-copyable)
        return state


def _version(value: Any) -> int | None:
    """A tensor's in-place modification counter (``None`` for anything else, and for inference
    tensors, which keep none)."""
    return value._version if isinstance(value, Tensor) and not value.is_inference() else None


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)


def _aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for every parameter or buffer ``model`` reaches by a second name."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _drop_aliases(model: nn.Module, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    for alias in _aliases(model):
        state.pop(prefix + alias, None)


def _fill_aliases(model: nn.Module, state: dict[str, Any], prefix: str, *_args: Any) -> None:
    for alias, name in _aliases(model).items():
        if prefix + name in state and prefix + alias not in state:
            state[prefix + alias] = state[prefix + name]
