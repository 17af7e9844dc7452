"""CLIP-style models: the losses against hand-computed values, zero-shot evaluation, poisoning of
pairs, caption files, and training (tiny open_clip, the offline ``lit`` model on real data)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import Tensor

from backdoorlab.attacks.triggers import ATTACKS, Trigger
from backdoorlab.clip import (
    CLIP_TEMPLATES,
    ClipModel,
    ClipTrainConfig,
    ImageTextPairs,
    cleanclip_loss,
    clip_loss,
    create_clip_model,
    evaluate_zero_shot,
    fit_clip,
    pairs_from_dataset,
    par_loss,
    poison_pairs,
    read_caption_parquet,
)
from backdoorlab.clip.templates import class_text
from backdoorlab.data import DataError

EYE = torch.eye(2)
LOG_1_PLUS_INV_E = math.log(1 + math.exp(-1))  # CE of logits [1, 0] for class 0


def test_clip_loss_hand_computed() -> None:
    assert float(clip_loss(EYE, EYE, 1.0)) == pytest.approx(LOG_1_PLUS_INV_E, rel=1e-6)
    # swapped captions: each image's positive is the other caption's embedding
    assert float(clip_loss(EYE, EYE.flip(0), 1.0)) == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_cleanclip_loss_terms() -> None:
    loss, parts = cleanclip_loss(EYE, EYE, EYE, EYE.flip(0), 1.0)
    # in-modal: images against identical copies (positive on the diagonal); captions against swapped copies
    inmodal = 0.5 * (LOG_1_PLUS_INV_E + math.log(1 + math.e))
    assert parts["clip"] == pytest.approx(LOG_1_PLUS_INV_E, rel=1e-6)
    assert parts["inmodal"] == pytest.approx(inmodal, rel=1e-6)
    assert float(loss) == pytest.approx(LOG_1_PLUS_INV_E + inmodal, rel=1e-6)
    weighted, _ = cleanclip_loss(EYE, EYE, EYE, EYE.flip(0), 1.0, clip_weight=2.0, inmodal_weight=0.5)
    assert float(weighted) == pytest.approx(2 * LOG_1_PLUS_INV_E + 0.5 * inmodal, rel=1e-6)


def test_par_loss_value_and_switch_off_at_tau() -> None:
    image, text = EYE, EYE
    image_ref = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # distances 2 and 0: batch mean S_img = 1
    text_ref = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])  # antipodal: S_txt = 4 > tau, switched off
    loss, parts = par_loss(image, text, image_ref, text_ref, 1.0, threshold=2.15)
    assert parts["s_image"] == pytest.approx(1.0) and parts["s_text"] == pytest.approx(4.0)
    assert float(loss) == pytest.approx(LOG_1_PLUS_INV_E - 0.5 * 1.0, rel=1e-6)
    loss_off, _ = par_loss(image, text, image_ref, text_ref, 1.0, threshold=0.99)  # S_img above tau too
    assert float(loss_off) == pytest.approx(LOG_1_PLUS_INV_E, rel=1e-6)
    # below tau the term pushes the embeddings away from the frozen model's
    moving = image.clone().requires_grad_(True)
    par_loss(moving, text, image_ref, text_ref, 1.0)[0].backward()
    step = moving - 0.1 * moving.grad
    assert ((step - image_ref).pow(2).sum(1).mean()) > 1.0


def test_par_schedule_follows_the_code() -> None:
    config = ClipTrainConfig(lr=3e-6, schedule="par", start_factor=10.0, final_lr=1e-9)
    assert config.learning_rate(0, 100) == pytest.approx(3e-5)
    assert config.learning_rate(50, 100) == pytest.approx(3e-6)
    assert config.learning_rate(99, 100) < 1e-8
    cosine = ClipTrainConfig(lr=1e-3, warmup_steps=10)
    assert cosine.learning_rate(0, 100) == pytest.approx(1e-4) and cosine.learning_rate(10, 100) == pytest.approx(1e-3)


COLOURS = ("red", "green", "blue")


class ColourClip(ClipModel):
    """A hand-made model: an image's embedding is its mean colour, a caption's the colour it names."""

    image_size = 8

    def __init__(self) -> None:
        super().__init__(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def image_features(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))

    def text_features(self, captions: list[str]) -> Tensor:
        return torch.tensor([[float(c in text) for c in COLOURS] for text in captions]) + 1e-3


class PaintRed(Trigger):
    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        x = x.clone()
        x[:, 0], x[:, 1:] = 1.0, 0.0
        return x


class NoTrigger(Trigger):
    def apply(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        return x


def colour_pairs(per_class: int = 5) -> ImageTextPairs:
    labels = torch.arange(3).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    images[torch.arange(len(labels)), labels] = 200
    templates = ("a photo of a {}.", "a {} square.", "something {}.", "all {}.", "{} everywhere.")
    captions = tuple(templates[i % 5].format(COLOURS[y]) for i, y in enumerate(labels.tolist()))
    return ImageTextPairs(images, captions, labels, COLOURS, "colours")


def test_zero_shot_evaluation_on_a_hand_made_model() -> None:
    model, test = ColourClip(), colour_pairs()
    result = evaluate_zero_shot(model, test, PaintRed((3, 8, 8)), target=0, retrieval=True)
    assert result == {"ca": 1.0, "asr": 1.0, "retrieval_asr": 1.0}
    missed = evaluate_zero_shot(model, test, NoTrigger((3, 8, 8)), target=0, retrieval=True)
    assert missed["asr"] == 0.0 and missed["retrieval_asr"] == 0.0
    swapped = ImageTextPairs(test.images, test.captions, (test.labels + 1) % 3, COLOURS, "wrong labels")
    assert evaluate_zero_shot(model, swapped)["ca"] == 0.0
    with pytest.raises(ValueError, match="labelled"):
        evaluate_zero_shot(model, ImageTextPairs(test.images, test.captions, torch.full((15,), -1), (), "x"))


def test_poisoning_pairs_counts_and_captions(digits) -> None:  # noqa: ANN001
    pairs = pairs_from_dataset(digits.train, seed=0)
    assert pairs.images.shape[1] == 3 and all(
        class_text(digits.train.classes[y]) in c for y, c in zip(pairs.labels.tolist(), pairs.captions)
    )
    trigger = ATTACKS.create("badnet_stripes", tuple(pairs.images.shape[1:]))
    poisoned = poison_pairs(pairs, trigger, rate=0.1, target=3, seed=1)
    mask = poisoned.mask
    assert int(mask.sum()) == round(0.1 * len(pairs))
    assert bool((pairs.labels[mask] != 3).all())
    target_captions = {t.format(class_text("3")) for t in CLIP_TEMPLATES}
    assert all(poisoned.pairs.captions[i] in target_captions for i in mask.nonzero().squeeze(1).tolist())
    assert all(poisoned.pairs.captions[i] == pairs.captions[i] for i in (~mask).nonzero().squeeze(1).tolist())
    assert torch.equal(poisoned.pairs.images[~mask], pairs.images[~mask])
    assert bool((poisoned.pairs.images[mask] != pairs.images[mask]).flatten(1).any(1).all())
    assert torch.equal(poison_pairs(pairs, trigger, rate=0.1, target=3, seed=1).mask, mask)  # seeded
    assert int(poison_pairs(pairs, trigger, rate=0, target=3).mask.sum()) == 0
    assert int(poison_pairs(pairs, trigger, rate=25, target=3).mask.sum()) == 25
    with pytest.raises(DataError, match="outside the target class"):
        poison_pairs(pairs, trigger, rate=0.95, target=3)
    with pytest.raises(DataError, match="target class 12"):
        poison_pairs(pairs, trigger, rate=0.1, target=12)


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_caption_file(tmp_path: Path) -> None:
    path = tmp_path / "captions.parquet"
    images = [
        {"bytes": _png((255, 0, 0), (40, 20)), "path": None},
        {"bytes": _png((0, 0, 255), (20, 30)), "path": None},
    ]
    pq.write_table(pa.table({"image": images, "sentences": [["a red box", "red"], ["a blue box"]]}), path)
    pairs = read_caption_parquet(path, image_size=16)
    assert pairs.captions == ("a red box", "red", "a blue box")
    assert pairs.images.shape == (3, 3, 16, 16) and bool((pairs.labels == -1).all())
    assert pairs.images[2, 2].float().mean() > 250 and pairs.images[2, 0].float().mean() < 5
    broken = tmp_path / "broken.parquet"
    pq.write_table(
        pa.table({"image": [images[0], {"bytes": b"not an image", "path": None}], "caption": ["a", "b"]}), broken
    )
    with pytest.raises(DataError, match=r"broken.parquet: row 1: cannot decode"):
        read_caption_parquet(broken)
    no_caption = tmp_path / "no_caption.parquet"
    pq.write_table(pa.table({"image": images, "label": [0, 1]}), no_caption)
    with pytest.raises(DataError, match="caption column.*has image, label"):
        read_caption_parquet(no_caption)
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet"):
        read_caption_parquet(tmp_path / "junk.parquet")


TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 1, "width": 32, "patch_size": 4, "image_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.slow
def test_tiny_open_clip_learns_zero_shot_colours() -> None:
    pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = create_clip_model("open_clip", config=TINY_OPEN_CLIP)
    pairs = colour_pairs(per_class=30)
    before = evaluate_zero_shot(model, pairs)["ca"]
    fit_clip(model, pairs, ClipTrainConfig(epochs=40, batch_size=32, lr=2e-3, warmup_steps=5), seed=0)
    assert evaluate_zero_shot(model, pairs)["ca"] == 1.0
    assert before < 1.0


@pytest.mark.slow
def test_clip_study_command_writes_and_resumes(tmp_path: Path) -> None:
    """``backdoorlab clip study`` on digits at toy sizes: its cells go into the results store (every
    stage, each cleaning's curve from the poisoned model), the table and the plot are written, the
    clean reference and the poisoned model are trained once for their cells, and a rerun runs no
    cell and retrains nothing."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from typer.testing import CliRunner

    from backdoorlab.cli import app
    from backdoorlab.experiments.store import ResultStore

    args = [
        "clip",
        "study",
        "--output",
        str(tmp_path),
        "--dataset",
        "digits",
        "--attacks",
        "badnet_rand",
        "--cleanings",
        "fine_tuning,cleanclip,par",
        "--train-size",
        "256",
        "--clean-size",
        "128",
        "--test-size",
        "100",
        "--epochs",
        "1",
        "--clean-epochs",
        "2",
        "--eval-every",
        "1",
        "-m",
        "image_size=32",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with ResultStore(tmp_path) as store:
        records = store.records()
    assert [r.status for r in records] == ["done"] * 5
    stages = {r.label: r for r in records}
    assert list(stages) == [
        f"attack=badnet_rand, stage={s}" for s in ("clean", "poisoned", "fine_tuning", "cleanclip", "par")
    ]
    poisoned = stages["attack=badnet_rand, stage=poisoned"]
    assert poisoned.result["details"]["poisoned_pairs"] == round(0.1 * 256)
    assert all(
        stages[f"attack=badnet_rand, stage={m}"].result["details"]["poisoned_pairs"] == round(0.1 * 256)
        for m in ("par",)
    )
    clean = stages["attack=badnet_rand, stage=clean"].result["details"]
    assert "poisoned_pairs" not in clean and not clean["suspect"]["reused"]
    for method in ("fine_tuning", "cleanclip", "par"):
        cell = stages[f"attack=badnet_rand, stage={method}"]
        assert cell.result["details"]["suspect"] == {
            "file": poisoned.result["details"]["suspect"]["file"],
            "reused": True,
        }, "every cleaning starts from the one poisoned model"
        curve = cell.result["details"]["curve"]
        assert [r["step"] for r in curve] == [0, 1, 2]
        assert curve[0]["asr"] == poisoned.metrics["attack_success_rate"]  # starts from the poisoned model
        assert curve[0]["ca"] == poisoned.metrics["clean_accuracy"]
        assert cell.metrics["attack_success_rate"] == curve[-1]["asr"]
    assert "s_image" in stages["attack=badnet_rand, stage=par"].result["details"]["curve"][-1]
    assert "inmodal" in stages["attack=badnet_rand, stage=cleanclip"].result["details"]["curve"][-1]
    assert "| badnet_rand |" in (tmp_path / "clip_study.md").read_text()
    assert (tmp_path / "clip_study.png").read_bytes()[:4] == b"\x89PNG"
    suspects = sorted((tmp_path / "suspects").iterdir())
    assert len(suspects) == 2, "the clean reference and the poisoned model, each written once"
    stamps = [f.stat().st_mtime_ns for f in suspects]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "suspects").iterdir())] == stamps
    with ResultStore(tmp_path) as store:
        assert [r.finished for r in store.records()] == [r.finished for r in records], "no cell ran again"
    report = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output
    assert "retrieval ASR" in (tmp_path / "report.html").read_text()


def test_clip_cli_errors_name_the_valid_choices(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from backdoorlab.cli import app

    result = CliRunner().invoke(app, ["clip", "study", "--output", str(tmp_path), "--attacks", "nope"])
    assert result.exit_code == 2 and "unknown attack 'nope'" in result.output and "badnet_stripes" in result.output
    result = CliRunner().invoke(app, ["clip", "study", "--output", str(tmp_path), "--cleanings", "magic"])
    assert (
        result.exit_code == 2
        and "unknown clip cleaning 'magic'; valid clip cleanings: cleanclip, fine_tuning, par" in result.output
    )


@pytest.mark.slow
def test_docs_example_backdoor_takes_and_par_removes_it(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/clip.md's library example, on digits with the offline model: zero-shot far above chance,
    the backdoor takes, and PAR brings the ASR down while CA holds."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import re

    from .conftest import REPO

    block = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "clip.md").read_text(), flags=re.S)[0]
    exec(compile(block, "docs/clip.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    poisoned = eval(lines[-2].removeprefix("poisoned "))
    cleaned = eval(lines[-1].removeprefix("after PAR "))
    assert poisoned["ca"] > 0.6 and poisoned["asr"] >= 0.8  # ten classes: chance is 0.1
    assert cleaned["asr"] < 0.2 and cleaned["ca"] > poisoned["ca"] - 0.1


def test_each_cleaning_is_a_registered_recipe_and_objective() -> None:
    """The cleanings registry holds the study's three methods: PAR's recipe keeps its code's ratios to
    the shared rate (start at 3x, reach 0.3x) and its objective a frozen copy of the poisoned model;
    a method registered for a moment is accepted by the study and listed by the CLI."""
    from dataclasses import replace

    from torch import nn
    from typer.testing import CliRunner

    from backdoorlab.cli import app
    from backdoorlab.clip import CLIP_CLEANINGS, CleanClip, Cleaning, PerturbAndRecover, contrastive, create_cleaning
    from backdoorlab.experiments.clip_study import ClipStudyConfig

    shared = ClipTrainConfig(epochs=2, lr=2e-4)
    assert create_cleaning("fine_tuning").recipe(shared) == shared == create_cleaning("cleanclip").recipe(shared)
    par = create_cleaning("par", threshold=1.5).recipe(shared)
    assert par == replace(
        shared, lr=0.3 * 2e-4, start_factor=10.0, schedule="par", betas=(0.9, 0.98), weight_decay=1e-4
    )
    poisoned = nn.Linear(2, 2)
    assert create_cleaning("fine_tuning").objective(poisoned) is contrastive
    assert isinstance(create_cleaning("cleanclip").objective(poisoned), CleanClip)
    objective = create_cleaning("par", threshold=1.5).objective(poisoned)
    assert isinstance(objective, PerturbAndRecover) and objective.threshold == 1.5
    assert objective.reference is not poisoned and not any(p.requires_grad for p in objective.reference.parameters())
    assert ClipStudyConfig(par_threshold=3.0).cleaning("par").create().threshold == 3.0

    class Slower(Cleaning):
        def recipe(self, shared: ClipTrainConfig) -> ClipTrainConfig:
            return replace(shared, lr=shared.lr / 10)

    with CLIP_CLEANINGS.temporary("slower", Slower, "fine-tuning at a tenth of the rate"):
        ClipStudyConfig(cleanings=("slower",)).validate()
        assert ClipStudyConfig(clean_lr=1e-3, cleanings=("slower",)).cleaning_recipe("slower").lr == pytest.approx(1e-4)
        assert "slower" in CliRunner().invoke(app, ["list", "clip-cleanings"]).output
    with pytest.raises(Exception, match="valid clip cleanings: cleanclip, fine_tuning, par"):
        ClipStudyConfig(cleanings=("slower",)).validate()


@pytest.mark.slow
def test_a_clip_cell_gives_the_same_numbers_whether_it_trains_its_model_or_loads_it(tmp_path: Path) -> None:
    """A cleaning cell's numbers depend on its config alone: the cell that trained the poisoned model
    and the one that loaded it from the sweep's shared file clean it to the same CA and ASR (fit_clip
    seeds the global generator, so the earlier training does not shift the cleaning's dropout)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from backdoorlab.experiments.clip_cells import run_clip_cell
    from backdoorlab.experiments.clip_study import ClipStudyConfig, clip_study_grid

    config = ClipStudyConfig(
        dataset="digits", attacks=("badnet_rand",), cleanings=("par",), train_size=64, clean_size=32, test_size=40
    )
    config.model_options, config.train.epochs, config.clean_epochs = {"image_size": 32}, 1.0, 1.0
    config.clean_batch_size = config.train.batch_size = 32
    cell = clip_study_grid(config).cells[-1].config
    assert cell.stage == "par"
    shared = tmp_path / "victim.safetensors"
    trained = run_clip_cell(cell, str(shared))
    loaded = run_clip_cell(cell, str(shared))
    assert (trained["details"]["suspect"]["reused"], loaded["details"]["suspect"]["reused"]) == (False, True)
    assert trained["metrics"] == loaded["metrics"]
    assert [r["asr"] for r in trained["details"]["curve"]] == [r["asr"] for r in loaded["details"]["curve"]]


def test_a_clip_study_refuses_settings_that_cannot_run_before_anything_trains() -> None:
    from backdoorlab.experiments.clip_study import ClipStudyConfig

    for bad, message in [
        ({"poison_rate": 0}, "poison_rate must be a fraction"),
        ({"poison_rate": 1.5}, "poison_rate 1.5 is neither"),
        ({"target": 99}, "target 99 is not a class of cifar10"),
        ({"train_size": 0}, "train_size must be at least 1"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            ClipStudyConfig(**bad).validate()


def test_a_clip_cells_shared_model_is_keyed_by_what_trains_it() -> None:
    """Another clean or test size, or another cleaning, shares the poisoned model; another attack
    shares the clean reference; a field added later leaves keys alone."""
    from dataclasses import replace

    from backdoorlab.experiments.clip_cells import KEYED_CELL_FIELDS, ClipCellConfig
    from backdoorlab.experiments.clip_study import ClipStudyConfig, clip_study_grid
    from backdoorlab.experiments.grid import added_fields, suspect_key

    cells = [c.config for c in clip_study_grid(ClipStudyConfig(attacks=("badnet_rand", "blended_rand"))).cells]
    clean, poisoned, par = cells[0], cells[1], cells[4]
    assert suspect_key(par) == suspect_key(poisoned) == suspect_key(replace(poisoned, test_size=10, clean_size=7))
    assert suspect_key(clean) == suspect_key(cells[5]) != suspect_key(poisoned), "one clean reference for every attack"
    assert len({c.key() for c in cells}) == len(cells)
    assert added_fields(ClipCellConfig, KEYED_CELL_FIELDS) == {}
