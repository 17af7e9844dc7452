"""Training throughput on CIFAR-10: backdoorlab's loop against the hardware limit and a peer pipeline.

For each model, three numbers in images per second over the same number of steps:

- limit: forward + backward + SGD step on pre-made float tensors already in memory (what the model
  itself costs on this machine; no data work at all);
- loop: ``backdoorlab.training.train`` on uint8 tensors with the ``fast`` recipe's CIFAR-10 schedule
  (random crop and alternating flip on whole batches, the triangular schedule, BN-bias learning-rate
  groups, Lookahead averaging from the first step);
- peer: a torchvision ``Dataset`` with per-sample PIL transforms (RandomCrop(32, 4), flip, ToTensor,
  Normalize) through a ``DataLoader``, as BackdoorBench and BackdoorBox build it, then the same step.

Usage: ``python benchmarks/throughput.py [--data-root DIR] [--steps N] [--models airbench,preact_resnet18]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from backdoorlab.data import load_dataset, subsample
from backdoorlab.experiments.recipes import recipe_for
from backdoorlab.models import create_model
from backdoorlab.training import train

FAST = recipe_for("fast", "cifar10")
BATCH = {"airbench": FAST.train.batch_size, "preact_resnet18": 128, "small_cnn": 256}
OPTIONS = {"airbench": FAST.model_options, "preact_resnet18": {}}


def build(name, data):
    torch.manual_seed(0)
    model = create_model(name, data.num_classes, data.in_channels, data.mean, data.std, **OPTIONS.get(name, {}))
    return model.to(memory_format=torch.channels_last)


def optimiser(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)


def step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def limit(name, data, batch, steps):
    model, x = build(name, data), torch.rand(batch, *data.input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, data.num_classes, (batch,))
    opt = optimiser(model)
    model.train()
    step(model, opt, x, y)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step(model, opt, x, y)
    return batch * steps / (time.perf_counter() - start)


def loop(name, data, batch, steps):
    config = replace(
        FAST.train, epochs=1, batch_size=batch, lr=0.01, lookahead_epoch=0, flip=True, progress=False, data_init=False
    )
    model = build(name, data)
    train(model, subsample(data, batch, 0), config)  # warm-up, one step
    return train(model, subsample(data, batch * steps, 1), config).samples_per_second


class PilCifar(Dataset):
    def __init__(self, data):
        self.images = data.inputs.permute(0, 2, 3, 1).numpy()
        self.labels = data.labels.tolist()
        self.transform = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(data.mean, data.std)]
        )

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def peer(name, data, batch, steps, workers):
    model, opt = build(name, data), None
    model.normalize = lambda x: x  # the peer pipeline normalises per sample
    opt = optimiser(model)
    loader = DataLoader(
        PilCifar(subsample(data, batch * (steps + 1), 2)),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=False,
    )
    model.train()
    batches = iter(loader)
    x, y = next(batches)
    step(model, opt, x.contiguous(memory_format=torch.channels_last), y)  # warm-up
    start = time.perf_counter()
    for x, y in batches:
        step(model, opt, x.contiguous(memory_format=torch.channels_last), y)
    return batch * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--models", default="airbench,preact_resnet18")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the peer pipeline")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    data = load_dataset("cifar10", args.data_root).train
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(
        "| model | batch | limit (img/s) | backdoorlab loop (img/s) | loop / limit | peer PIL DataLoader (img/s) | loop / peer |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        batch = BATCH.get(name, 128)
        steps = args.steps
        lim = limit(name, data, batch, steps)
        ours = loop(name, data, batch, steps)
        theirs = peer(name, data, batch, steps, args.workers)
        rows.append({"model": name, "batch": batch, "steps": steps, "limit": lim, "loop": ours, "peer": theirs})
        print(
            f"| {name} | {batch} | {lim:.1f} | {ours:.1f} | {ours / lim:.1%} | {theirs:.1f} | {ours / theirs:.2f}x |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
