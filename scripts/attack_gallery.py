"""Regenerate the trigger galleries: in docs/attacks.md, for every image attack, on CIFAR-10 and
MNIST, four test images clean, as poisoned training images, and the amplified difference (attacks
that adapt to a model are fitted on a quick surrogate: one epoch on 5000 training images); in
docs/time_series.md, every series attack on four GunPoint test series (needs sktime).

Usage: ``python scripts/attack_gallery.py [--data-root DIR] [--attacks NAME ...]`` (default:
``$BACKDOORLAB_DATA``; ``--attacks`` redraws only those pictures and keeps the others' files).
"""

from __future__ import annotations

import argparse

from doc_blocks import DOCS, replace_block

from backdoorlab.attacks import attacks_for, create_trigger
from backdoorlab.data import load_dataset
from backdoorlab.gallery import fitted_trigger, save_grid, series_plot, trigger_rows

#: Options an attack needs on a dataset where its defaults do not apply (Low Frequency's stored
#: patterns are for 32x32 RGB sets; on MNIST it fits one on the surrogate).
DATASET_OPTIONS = {
    ("low_frequency", "mnist"): {"pattern": "generate"},
    # the mask generator's 25 epochs on 5,000 images take an hour on a 2-core CPU: one here
    ("input_aware", "mnist"): {"mask_epochs": 1},
    ("input_aware", "cifar10"): {"mask_epochs": 1},
    # the encoder's 1,500 steps take 25 minutes on a loaded 2-core CPU: 300 here
    ("ssba", "mnist"): {"steps": 300},
    ("ssba", "cifar10"): {"steps": 300},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--attacks", nargs="*", default=None, help="redraw only these attacks' pictures")
    args = parser.parse_args()
    splits = {name: load_dataset(name, args.data_root) for name in ("cifar10", "mnist")}
    lines = ["| attack | options (defaults) | CIFAR-10 | MNIST |", "| --- | --- | --- | --- |"]
    image_attacks, series_attacks = attacks_for("image"), attacks_for("series")
    for attack in image_attacks:
        cells = []
        for name, data in splits.items():
            path = DOCS / "gallery" / f"{attack}-{name}.png"
            if args.attacks is None or attack in args.attacks or not path.exists():
                trigger = fitted_trigger(attack, DATASET_OPTIONS.get((attack, name), {}), data)
                save_grid(trigger_rows(data.test, trigger, 4, seed=0, difference=True), 4, path, min_side=64)
            cells.append(f"![{attack} on {name}](gallery/{path.name})")
        options = create_trigger(attack, splits["cifar10"].train.input_shape).config()
        text = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        lines.append(f"| `{attack}` | {text} | {cells[0]} | {cells[1]} |")
    doc = DOCS / "attacks.md"
    replace_block(doc, "gallery", lines)
    print(f"wrote {doc} and {len(image_attacks) * 2} pictures")
    gunpoint = load_dataset("gunpoint").test
    lines = ["| attack | options (defaults) | four GunPoint test series, clean and triggered |", "| --- | --- | --- |"]
    for attack in series_attacks:
        trigger = create_trigger(attack, gunpoint.input_shape)
        path = series_plot(gunpoint, trigger, 4, 0, DOCS / "gallery" / f"{attack}-gunpoint.png")
        text = ", ".join(f"{k}={v}" for k, v in trigger.config().items())
        lines.append(f"| `{attack}` | {text} | ![{attack} on GunPoint](gallery/{path.name}) |")
    replace_block(DOCS / "time_series.md", "series-gallery", lines)
    print(f"wrote docs/time_series.md and {len(series_attacks)} plots")


if __name__ == "__main__":
    main()
