"""Regenerate the trigger gallery in docs/attacks.md: for every registered attack, on CIFAR-10 and
MNIST, four test images clean, as poisoned training images, and the amplified difference. Attacks
that adapt to a model are fitted on a quick surrogate (one epoch on 5000 training images).

Usage: ``python scripts/attack_gallery.py [--data-root DIR]`` (default: ``$BACKDOORLAB_DATA``).
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, replace_block

from backdoorlab.attacks import ATTACKS, create_trigger
from backdoorlab.data import load_dataset
from backdoorlab.gallery import fitted_trigger, save_grid, trigger_rows



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    splits = {name: load_dataset(name, args.data_root) for name in ("cifar10", "mnist")}
    lines = ["| attack | options (defaults) | CIFAR-10 | MNIST |", "| --- | --- | --- | --- |"]
    for attack in ATTACKS.names():
        cells = []
        for name, data in splits.items():
            path = DOCS / "gallery" / f"{attack}-{name}.png"
            trigger = fitted_trigger(attack, {}, data)
            save_grid(trigger_rows(data.test, trigger, 4, seed=0, difference=True), 4, path, min_side=64)
            cells.append(f"![{attack} on {name}](gallery/{path.name})")
        options = create_trigger(attack, splits["cifar10"].train.input_shape).config()
        text = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        lines.append(f"| `{attack}` | {text} | {cells[0]} | {cells[1]} |")
    doc = DOCS / "attacks.md"
    replace_block(doc, "gallery", lines)
    print(f"wrote {doc} and {len(ATTACKS.names()) * 2} pictures")


if __name__ == "__main__":
    main()
