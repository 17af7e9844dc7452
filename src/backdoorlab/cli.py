"""The command line: a thin layer over the library (``backdoorlab --help``)."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from backdoorlab.files import write_bytes, write_json, write_text
from backdoorlab.progress import log_to_stderr
from backdoorlab.registry import UnknownNameError

if TYPE_CHECKING:
    from backdoorlab.experiments import RunConfig
    from backdoorlab.experiments.tracking import Tracker

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="backdoorlab: backdoor attacks and defenses, fast and tested.",
)
console = Console()
err_console = Console(stderr=True)


def parse_size(text: str | None) -> float | int | None:
    """``"0.1"`` -> 0.1 (a fraction), ``"500"`` -> 500 (a count)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is neither a fraction (0.1) nor a count (500)") from None


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["size=4", "position=random"]`` -> ``{"size": 4, "position": "random"}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{pair}' is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_selection(pairs: list[str] | None) -> dict[str, Any]:
    """``--only`` pairs as :func:`~backdoorlab.experiments.grid.select` takes them: a field given
    more than once matches any of its values (``attack=bpp attack=ctrl`` -> ``("bpp", "ctrl")``)."""
    selection: dict[str, Any] = {}
    for pair in pairs or []:
        for key, value in parse_options([pair]).items():
            if key not in selection:
                selection[key] = value
            elif isinstance(selection[key], tuple):
                selection[key] = (*selection[key], value)
            else:
                selection[key] = (selection[key], value)
    return selection


def check_output_dir(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be created or written
    (it is created, and a scratch file written and removed in it, to know)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ValueError(f"{option} {path} cannot be written: {err.strerror or err}") from None


def check_output_file(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file that is a folder or whose folder cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name")
    check_output_dir(path.parent, f"{option}'s folder")


def _fail(err: Exception) -> None:
    """Print ``err`` as is (no markup read in it, no hard line breaks inside paths) and exit 2."""
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
    raise typer.Exit(code=2)


DatasetOpt = Annotated[
    str,
    typer.Option(help="Dataset name (see `backdoorlab list`), or images by path: parquet:PATH, folder:PATH."),
]
AttackOpt = Annotated[
    Optional[str], typer.Option(help="Attack (trigger) name; default: badnets for images, ts_pattern for series.")
]
AttackOptionOpt = Annotated[
    Optional[list[str]],
    typer.Option("--attack-option", "-a", help="Trigger option KEY=VALUE, repeatable (size=4)."),
]
DefenseOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Training-time (abl, e2abl, pt ...), repair (fine_tuning, pivotal_tuning ...) or sample-filter "
        "(activation_clustering, spectral_signatures ...) defense (`backdoorlab list` shows every kind)."
    ),
]
DefenseOptionOpt = Annotated[
    Optional[list[str]], typer.Option("--defense-option", "-d", help="Defense option KEY=VALUE, repeatable.")
]
DetectorOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Detector scoring the suspect model (with a repair: the model it was given; neural_cleanse, cti)."
    ),
]
DetectorOptionOpt = Annotated[
    Optional[list[str]], typer.Option("--detector-option", "-x", help="Detector option KEY=VALUE, repeatable.")
]
InputDetectorOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Input detector shown the clean and triggered test inputs (strip; see `backdoorlab list input-detectors`)."
    ),
]
InputDetectorOptionOpt = Annotated[
    Optional[list[str]], typer.Option("--input-detector-option", "-y", help="Input detector option KEY=VALUE.")
]
OutputOpt = Annotated[Optional[Path], typer.Option(help="Write DIR/result.json.")]
SaveModelOpt = Annotated[Optional[Path], typer.Option(help="Write the final model to this safetensors file.")]
DataRootOpt = Annotated[
    Optional[str],
    typer.Option(help="Folder with <dataset>/{train,test}.parquet [env: BACKDOORLAB_DATA]."),
]
RecipeOpt = Annotated[
    str, typer.Option(help="Training recipe: fast, quick or backdoorbench (see `backdoorlab list recipes`).")
]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model name; default: the recipe's.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override any config field by its path, repeatable: train.lr=0.1, attack_options.size=4."
    ),
]
TrackOpt = Annotated[
    Optional[str],
    typer.Option(
        help="Also log each finished run to mlflow (its default store), mlflow:URI or tensorboard:DIR "
        "(pip install 'backdoorlab[tracking]')."
    ),
]
EpochsOpt = Annotated[
    Optional[int], typer.Option(help="Default: the recipe's (fast: more for a --train-size subset, its step budget).")
]
TrainSizeOpt = Annotated[
    Optional[str], typer.Option(help="Subsample the training split: a fraction (0.5) or a count (5000).")
]
TestSizeOpt = Annotated[
    Optional[str], typer.Option(help="Subsample the test split: a fraction (0.5) or a count (1000).")
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]


_SIZE_FIELDS = ("poison_rate", "train_size", "test_size", "trusted_size")


def _config_from_cli(
    overrides: Optional[list[str]], config_file: Path | None = None, given: set[str] | None = None, **fields: Any
) -> RunConfig:
    """The RunConfig a command line describes: ``*_options`` lists parsed as KEY=VALUE, sizes as a
    fraction or a count, then the ``--set`` overrides applied. With ``config_file`` (``--config``),
    the file's fields are the base and only the flags in ``given`` (those typed on the command line)
    replace them."""
    from backdoorlab.experiments import RunConfig

    for name, value in fields.items():
        if name.endswith("_options"):
            fields[name] = parse_options(value)
        elif name in _SIZE_FIELDS:
            fields[name] = parse_size(value)
    schedule: list[str] = []
    if config_file is not None:
        values, schedule = _read_config_file(config_file)
        typed = {k: v for k, v in fields.items() if k in (given or set())}
        try:
            config = replace(RunConfig.from_dict(values), **typed)
        except ValueError as err:
            raise ValueError(f"--config {config_file}: {err}") from None
    else:
        config = RunConfig(**fields)
    # the file's schedule fields given without the rest change the schedule of the config as the
    # command line makes it (its dataset, recipe, sizes), then --set
    overrides = [*schedule, *(overrides or [])]
    return config.with_overrides(overrides) if overrides else config


def _read_config_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A config file's flat fields and its schedule changes (``train.X=VALUE``, from a tree's schedule
    fields given without the rest): YAML, the tree form (``backdoorlab run --show-config`` writes
    one) or the flat one; errors name the file."""
    import yaml

    from backdoorlab.experiments.config_tree import from_tree, is_tree, schedule_assignments

    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"--config {path}: a config file is a mapping of sections or fields, got {type(values).__name__}"
        )
    if not is_tree(values):
        return values, []
    flat, schedule = from_tree(values, str(path))
    return flat, schedule_assignments(schedule)


def _typed(ctx: typer.Context, fields: list[str]) -> set[str]:
    """The config fields whose flags were typed on the command line (a field's flag is its name, or
    for ``*_options`` the singular ``*_option``)."""

    def param(name: str) -> str:
        return name[:-1] if name.endswith("_options") else name

    def typed(name: str) -> bool:  # by the source's name: typer may carry its own copy of click's enum
        source = ctx.get_parameter_source(param(name))
        return source is not None and source.name == "COMMANDLINE"

    return {f for f in fields if typed(f)}


def _tracker(spec: str | None) -> Tracker | None:
    """The ``--track`` tracker, made before any work so that a missing package fails first."""
    from backdoorlab.experiments.tracking import create_tracker

    return create_tracker(spec) if spec else None


@app.command("run")
def run_command(
    ctx: typer.Context,
    dataset: DatasetOpt = "digits",
    recipe: RecipeOpt = "fast",
    model: ModelOpt = None,
    model_option: Annotated[
        Optional[list[str]], typer.Option("--model-option", "-m", help="Model option KEY=VALUE.")
    ] = None,
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    poison_rate: Annotated[
        str,
        typer.Option(
            help="Fraction in (0, 1] of the training set (0.1; 1.0 = all), or a count (500, an integer >= 2); 0 = clean baseline."
        ),
    ] = "0.1",
    poison_rate_of: Annotated[
        str,
        typer.Option(
            help="What a fractional --poison-rate is of: train (the training set) or target (clean-label: the target class's samples; 1.0 = all of them)."
        ),
    ] = "train",
    target: Annotated[int, typer.Option(help="Target class (all-to-one).")] = 0,
    mode: Annotated[str, typer.Option(help="all-to-one or all-to-all.")] = "all-to-one",
    clean_label: Annotated[
        Optional[bool],
        typer.Option("--clean-label/--dirty-label", help="Default: the attack's (SIG: clean-label)."),
    ] = None,
    source: Annotated[Optional[int], typer.Option(help="Poison, and measure ASR on, only this class.")] = None,
    defense: DefenseOpt = None,
    defense_option: DefenseOptionOpt = None,
    detector: DetectorOpt = None,
    detector_option: DetectorOptionOpt = None,
    input_detector: InputDetectorOpt = None,
    input_detector_option: InputDetectorOptionOpt = None,
    regularizer: Annotated[
        Optional[str],
        typer.Option(
            help="Regularised training: logit_squeezing, manifold_mixup, soft_nearest_neighbour, contrastive."
        ),
    ] = None,
    regularizer_option: Annotated[
        Optional[list[str]],
        typer.Option("--regularizer-option", "-g", help="Regulariser option KEY=VALUE (weight=0.1)."),
    ] = None,
    epochs: EpochsOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: the recipe's.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds splits, poisoning, init and training.")] = 0,
    data_seed: Annotated[
        Optional[int], typer.Option(help="Seeds the subsamples and trusted split alone (default: --seed).")
    ] = None,
    device: DeviceOpt = "auto",
    threads: Annotated[
        Optional[int],
        typer.Option(help="torch CPU threads (default: torch's); stored with the result, as results can depend on it."),
    ] = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    trusted_size: Annotated[
        Optional[str],
        typer.Option(help="Trusted clean split kept out of training, for defenses (default: 0.01, or the preset's)."),
    ] = None,
    preset: Annotated[
        Optional[str],
        typer.Option(
            help="Attack and defense settings of another toolkit: backdoorbench (see `backdoorlab list presets`)."
        ),
    ] = None,
    data_root: DataRootOpt = None,
    output: OutputOpt = None,
    save_model: SaveModelOpt = None,
    set_: SetOpt = None,
    config_file: Annotated[
        Optional[Path],
        typer.Option(
            "--config",
            help="A config file (YAML: the tree of sections that --show-config prints, or flat fields); "
            "flags typed on the command line and --set override it.",
        ),
    ] = None,
    show_config: Annotated[
        bool, typer.Option(help="Print the resolved config as a config file (the tree) and exit without running.")
    ] = False,
    track: TrackOpt = None,
) -> None:
    """Poison a training set, train on it (with a defense where given), and report CA, ASR and RA."""
    from backdoorlab.data.dataset import DataError
    from backdoorlab.experiments import run

    try:
        fields = dict(
            dataset=dataset,
            recipe=recipe,
            model=model,
            model_options=model_option,
            attack=attack,
            attack_options=attack_option,
            poison_rate=poison_rate,
            poison_rate_of=poison_rate_of,
            target=target,
            mode=mode,
            clean_label=clean_label,
            source=source,
            defense=defense,
            defense_options=defense_option,
            detector=detector,
            detector_options=detector_option,
            input_detector=input_detector,
            input_detector_options=input_detector_option,
            regularizer=regularizer,
            regularizer_options=regularizer_option,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            data_seed=data_seed,
            device=device,
            threads=threads,
            train_size=train_size,
            test_size=test_size,
            trusted_size=trusted_size,
            preset=preset,
            data_root=data_root,
        )
        config = _config_from_cli(set_, config_file, _typed(ctx, list(fields)), **fields)
        if show_config:
            import yaml

            console.print(yaml.safe_dump(config.resolved().to_tree(), sort_keys=False), end="", markup=False)
            return
        check_output_dir(output, "--output")
        check_output_file(save_model, "--save-model")
        budget = config.step_budget()
        if budget is not None:
            console.print(budget.note(), soft_wrap=True)
        fallback = config.recipe_fallback()
        if fallback is not None:  # said before training too: the run may take long
            err_console.print(f"[bold yellow]warning:[/] {escape(fallback)}", soft_wrap=True)
        tracker = _tracker(track)
        result = run(config)
    except (UnknownNameError, DataError, ValueError, TypeError, ImportError) as err:
        _fail(err)
        return
    if tracker is not None:
        from backdoorlab.experiments.tracking import run_name

        tracker.log_result(run_name(result.config), result.to_dict())
    _report(result, output, save_model)


def _short(value: Any) -> str | None:
    """``value`` as a short text if it is a scalar or a tuple of at most four scalars, else ``None``."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= 40):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 4 and all(_short(v) is not None for v in value):
        return "(" + ", ".join(str(_short(v)) for v in value) + ")"
    return None


def _flagged_rows(labels: list[str], warnings: list[str]) -> set[str]:
    """The table rows (``suspect``, ``repaired`` or ``retrained``, ``model``) a run's warnings are about: each warning
    starts with its subject (``suspect model:``...); one naming no row marks the last row."""
    subjects = {label: "model" if label == "model" else f"{label} model" for label in labels}
    flagged = {label for label, subject in subjects.items() for w in warnings if w.startswith(f"{subject}:")}
    if any(not any(w.startswith(f"{subject}:") for subject in subjects.values()) for w in warnings):
        flagged.add(labels[-1])
    return flagged


def _report(result: Any, output: Path | None, save_model: Path | None) -> None:
    """Print a run's table (suspect and repaired rows for a repair), write result.json and the model.
    A row the health checks flagged says WARNING in a ``check`` column, and each warning follows the
    table as a ``warning:`` line, so that a broken model's numbers never read as a plain result."""
    from backdoorlab.experiments import RunConfig
    from backdoorlab.experiments import save_model as write_model

    config = RunConfig.from_dict(result.config)
    against = f" against {config.defense}" if config.defense else ""
    seeds = f"seed {config.seed}" + ("" if config.data_seed is None else f", data seed {config.data_seed}")
    table = Table(title=f"{config.attack} on {config.dataset}{against} ({config.model}, {seeds})")
    m, rows = result.metrics, []
    if "suspect_clean_accuracy" in m:
        rows.append(
            ("suspect", {k: m[f"suspect_{k}"] for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")})
        )
    rows.append(("model" if not rows else "retrained" if "isolation_auroc" in m else "repaired", m))
    warned = list(getattr(result, "warnings", []) or [])
    flagged = _flagged_rows([label for label, _ in rows], warned)
    columns = ["", "check", "CA", "ASR", "RA"] if warned else ["", "CA", "ASR", "RA"]
    extra: dict[str, str] = {"poisoned": f"{result.data['poisoned']}/{result.data['train']}"}
    if "isolation_precision" in m:
        extra["isolated (precision/recall)"] = (
            f"{m['isolated']} ({m['isolation_precision']:.2f}/{m['isolation_recall']:.2f})"
        )
    if "isolation_auroc" in m:
        extra["isolation AUROC"] = f"{m['isolation_auroc']:.3f}"
    if "detection_score" in m:
        flagged = result.details.get("detection", {}).get("flagged")
        extra["detection score"] = f"{m['detection_score']:.3f}" + {True: " (flagged)", False: "", None: ""}[flagged]
    if "input_auroc" in m:
        extra["inputs: AUROC / TPR / FPR"] = f"{m['input_auroc']:.3f} / {m['input_tpr']:.3f} / {m['input_fpr']:.3f}"
        extra["filtered CA / ASR"] = f"{m['filtered_clean_accuracy']:.3f} / {m['filtered_attack_success_rate']:.3f}"
    seconds = result.timings.get("defense", result.timings.get("train"))
    if seconds is not None:
        extra["defense s" if config.defense else "train s"] = f"{seconds:.1f}"
    for column in columns + list(extra):
        table.add_column(column, justify="right")
    for i, (label, values) in enumerate(rows):
        cells = [f"{values[k]:.4f}" for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")]
        if warned:
            cells.insert(0, "[bold yellow]WARNING[/]" if label in flagged else "ok")
        table.add_row(label, *cells, *(extra.values() if i == len(rows) - 1 else [""] * len(extra)))
    console.print(table)
    for warning in warned:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    notes = {key: value for key, value in result.details.items() if _short(value) is not None}
    if notes:  # the defense's own scalars (E2ABL's head_switched_at...); the rest is in result.json
        console.print("details: " + ", ".join(f"{key}={_short(value)}" for key, value in notes.items()), soft_wrap=True)
    if output is not None:
        console.print(f"wrote {result.write(output)}")
    if save_model is not None:
        console.print(f"wrote {write_model(save_model, result.model, config)}")


#: The config fields a rerun of a saved model sets (each with its ``_options``); the others stay stored.
RERUN_METHODS = ("defense", "detector", "input_detector")


def _rerun_saved(
    model_file: Path,
    data_root: str | None,
    device: str | None,
    output: Path | None,
    save_model: Path | None = None,
    **methods: tuple[str | None, list[str] | None],
) -> None:
    """Run a saved model's config again on the model, with the methods given as ``field=(name,
    KEY=VALUE options)`` (those of :data:`RERUN_METHODS` not given are off)."""
    from backdoorlab.data.dataset import DataError
    from backdoorlab.experiments import ModelFileError, load_model, run

    try:
        check_output_dir(output, "--output")
        check_output_file(save_model, "--save-model")
        model, config = load_model(model_file)
        chosen = {field: methods.get(field, (None, None)) for field in RERUN_METHODS}
        config = replace(
            config,
            **{field: name for field, (name, _) in chosen.items()},
            **{f"{field}_options": parse_options(options) for field, (_, options) in chosen.items()},
            data_root=data_root or config.data_root,
            device=device or config.device,
        )
        result = run(config, suspect=model)
    except (UnknownNameError, DataError, ModelFileError, ValueError, TypeError) as err:
        _fail(err)
        return
    _report(result, output, save_model)


@app.command("export")
def export_command(
    output: Annotated[Path, typer.Option(help="Folder to write train, test, triggered and trusted .parquet to.")],
    dataset: DatasetOpt = "digits",
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    poison_rate: Annotated[
        str, typer.Option(help="Fraction in (0, 1] of the training set (0.1), or a count (500); 0 = none.")
    ] = "0.1",
    poison_rate_of: Annotated[str, typer.Option(help="train, or target (clean-label: of the target class).")] = "train",
    target: Annotated[int, typer.Option(help="Target class (all-to-one).")] = 0,
    mode: Annotated[str, typer.Option(help="all-to-one or all-to-all.")] = "all-to-one",
    clean_label: Annotated[
        Optional[bool],
        typer.Option("--clean-label/--dirty-label", help="Default: the attack's (SIG: clean-label)."),
    ] = None,
    source: Annotated[Optional[int], typer.Option(help="Poison only this class.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the splits, the poison choice and the trigger.")] = 0,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    trusted_size: Annotated[
        Optional[str], typer.Option(help="Trusted clean split kept out of the poisoned set (default: 0.01).")
    ] = None,
    preset: Annotated[Optional[str], typer.Option(help="Another toolkit's attack settings: backdoorbench.")] = None,
    recipe: RecipeOpt = "fast",
    model: Annotated[
        Optional[str], typer.Option(help="Surrogate model of an adaptive attack; default: the recipe's.")
    ] = None,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a poisoned training set (with its mask), the clean and triggered test sets and the trusted
    split as Hugging Face parquet files, the config in their metadata; `--dataset parquet:OUTPUT` reads
    them back."""
    from backdoorlab.data.dataset import DataError
    from backdoorlab.experiments import export_poisoned

    try:
        config = _config_from_cli(
            set_,
            dataset=dataset,
            recipe=recipe,
            model=model,
            attack=attack,
            attack_options=attack_option,
            poison_rate=poison_rate,
            poison_rate_of=poison_rate_of,
            target=target,
            mode=mode,
            clean_label=clean_label,
            source=source,
            seed=seed,
            device=device,
            train_size=train_size,
            test_size=test_size,
            trusted_size=trusted_size,
            preset=preset,
            data_root=data_root,
        )
        check_output_dir(output, "--output")
        written = export_poisoned(config, output)
    except (UnknownNameError, DataError, ValueError, TypeError) as err:
        _fail(err)
        return
    for path in written.values():
        console.print(f"wrote {path}")


ModelFileArg = Annotated[Path, typer.Argument(help="A model file written by `run --save-model`.")]
DeviceOverrideOpt = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda ...; default: the stored run's.")]


@app.command("repair")
def repair_command(
    model_file: ModelFileArg,
    defense: Annotated[str, typer.Option(help="Repair defense (see `backdoorlab list repairs`).")] = "fine_tuning",
    defense_option: DefenseOptionOpt = None,
    detector: DetectorOpt = None,
    detector_option: DetectorOptionOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOverrideOpt = None,
    output: OutputOpt = None,
    save_model: SaveModelOpt = None,
) -> None:
    """Repair a saved model with its run's trusted clean split; report CA, ASR, RA before and after.

    The stored config rebuilds the same data, trusted split and trigger (for the evaluation only:
    the repair sees the model and the trusted split)."""
    _rerun_saved(
        model_file,
        data_root,
        device,
        output,
        save_model,
        defense=(defense, defense_option),
        detector=(detector, detector_option),
    )


@app.command("detect")
def detect_command(
    model_file: ModelFileArg,
    detector: Annotated[str, typer.Option(help="Detector (see `backdoorlab list detectors`).")] = "cti",
    detector_option: DetectorOptionOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOverrideOpt = None,
    output: OutputOpt = None,
) -> None:
    """Score a saved model with a detector that sees only its run's trusted clean split."""
    _rerun_saved(model_file, data_root, device, output, detector=(detector, detector_option))


@app.command("detect-inputs")
def detect_inputs_command(
    model_file: ModelFileArg,
    input_detector: Annotated[
        str, typer.Option(help="Input detector (see `backdoorlab list input-detectors`).")
    ] = "strip",
    input_detector_option: InputDetectorOptionOpt = None,
    data_root: DataRootOpt = None,
    device: DeviceOverrideOpt = None,
    output: OutputOpt = None,
) -> None:
    """Fit an input detector on a saved model and its run's trusted clean split, then score the clean
    and triggered test inputs (AUROC, TPR / FPR at 5%, CA / ASR behind the filter; docs/detection.md)."""
    _rerun_saved(model_file, data_root, device, output, input_detector=(input_detector, input_detector_option))


def _cell_printer(name: str, tracker: Any = None) -> Callable[[Any, dict[str, Any]], None]:
    """A sweep's ``on_cell``: one line per finished cell (CA, ASR, time, its warnings) or its
    error's last line, and the result to ``tracker`` where there is one."""

    def show(cell: Any, outcome: dict[str, Any]) -> None:
        if "error" in outcome:
            last = outcome["error"].strip().splitlines()[-1]
            err_console.print(f"[red]failed[/] {cell.label}: {escape(last)}", soft_wrap=True)
            return
        m, t = outcome["result"]["metrics"], outcome["result"]["timings"]
        score = f" score {m['detection_score']:.3f}" if m.get("detection_score") is not None else ""
        err_console.print(
            f"[green]done[/] {cell.label or name}: CA {m['clean_accuracy']:.3f} ASR {m['attack_success_rate']:.3f}"
            f"{score} ({t['total']:.0f} s)" + (" [bold yellow]WARNING[/]" if outcome["result"].get("warnings") else "")
        )
        for warning in outcome["result"].get("warnings", []):
            err_console.print(f"  [bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)
        if tracker is not None:
            tracker.log_result(cell.label or name, outcome["result"])

    return show


@app.command("sweep")
def sweep_command(
    grid_file: Annotated[Path, typer.Argument(help="A grid (or one experiment) as YAML; see docs/experiments.md.")],
    output: Annotated[Path, typer.Option(help="Folder of the results store (results.sqlite) and models.")] = Path(
        "runs/sweep"
    ),
    workers: Annotated[int, typer.Option(help="Cells at once (local processes; with Ray, default: what fits).")] = 1,
    executor: Annotated[str, typer.Option(help="local (worker processes), ray, or inline (this process).")] = "local",
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster address (ray://host:10001, auto); default: start a local one.")
    ] = None,
    cpus_per_cell: Annotated[float, typer.Option(help="Ray: CPUs each cell asks for.")] = 1.0,
    gpus_per_cell: Annotated[
        float, typer.Option(help="Ray: GPUs each cell asks for (0.5 shares one GPU by two).")
    ] = 0.0,
    retry_failed: Annotated[bool, typer.Option(help="Run failed cells again.")] = False,
    save_models: Annotated[
        bool, typer.Option(help="Save each cell's model as OUTPUT/models/<key>.safetensors.")
    ] = False,
    device: Annotated[
        Optional[str], typer.Option(help="Run every cell on this device (not part of a cell's key).")
    ] = None,
    data_root: DataRootOpt = None,
    only: Annotated[
        Optional[list[str]],
        typer.Option(
            help="Run only the cells with FIELD=VALUE, repeatable (attack=badnets, seed=0); a field given "
            "twice matches either value."
        ),
    ] = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Validate the grid and list its cells; run nothing.")] = False,
    report: Annotated[bool, typer.Option(help="Write OUTPUT/report.html when the sweep ends.")] = True,
    track: TrackOpt = None,
) -> None:
    """Run a grid of experiments into a results store; a rerun skips finished cells (resumes)."""
    from backdoorlab.experiments.executors import create_executor
    from backdoorlab.experiments.grid import GridError, load_grid, select
    from backdoorlab.experiments.store import StoreError
    from backdoorlab.experiments.sweep import SweepError, sweep

    try:
        check_output_dir(output, "--output")
        if device is not None and executor != "ray":  # a Ray cluster's devices are its workers'
            from backdoorlab.training.loop import resolve_device

            resolve_device(device)
        grid = load_grid(grid_file, data_root=data_root, overrides=set_ or ())
        if only:
            grid = select(grid, parse_selection(only))
            if not grid.cells:
                raise GridError(f"no cell of {grid_file} has {' and '.join(only)}")
    except (GridError, typer.BadParameter, ValueError) as err:
        _fail(err)
        return
    if dry_run:
        table = Table(title=f"{grid.name}: {len(grid.cells)} cells", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("key")
        table.add_column("cell")
        for i, cell in enumerate(grid.cells):
            table.add_row(str(i), cell.key, cell.label or "(one experiment)")
        console.print(table)
        return

    try:
        tracker = _tracker(track)
    except (ValueError, ImportError) as err:
        _fail(err)
        return

    show = _cell_printer(grid.name, tracker)

    try:
        pool = create_executor(
            executor,
            workers=workers if executor != "ray" or workers > 1 else None,
            address=address,
            cpus_per_cell=cpus_per_cell,
            gpus_per_cell=gpus_per_cell,
        )
        summary = sweep(
            grid,
            output,
            executor=pool,
            retry_failed=retry_failed,
            save_models=save_models,
            device=device,
            data_root=data_root,
            on_cell=show,
        )
    except (SweepError, StoreError, ValueError, RuntimeError) as err:
        _fail(err)
        return
    console.print(
        f"{grid.name}: {summary.done} done, {summary.failed} failed, {summary.skipped} already in the store, "
        f"{summary.left} left ({summary.seconds:.0f} s); store: {output / 'results.sqlite'}"
        + (f"; {summary.warned} done cell(s) with warnings (marked in the report)" if summary.warned else "")
    )
    if summary.interrupted:
        err_console.print("interrupted: finished cells are stored; run the same command again to resume")
        raise typer.Exit(code=130)
    if report:
        from backdoorlab.report import write_report

        console.print(f"wrote {write_report(output, data_root=data_root)}")
    if summary.failed:
        err_console.print(f"{summary.failed} cell(s) failed: see the report, or rerun with --retry-failed")
        raise typer.Exit(code=1)


@app.command("report")
def report_command(
    output: Annotated[Path, typer.Argument(help="A sweep's output folder (with results.sqlite).")],
    path: Annotated[Optional[Path], typer.Option(help="HTML file to write; default OUTPUT/report.html.")] = None,
    gallery: Annotated[bool, typer.Option(help="Draw each attack's trigger on test samples (needs the data).")] = True,
    data_root: DataRootOpt = None,
) -> None:
    """Write a self-contained HTML report (tables, plots, trigger gallery) and CSV/Parquet exports."""
    from backdoorlab.experiments.store import StoreError
    from backdoorlab.report import write_report

    try:
        check_output_file(path, "--path")
        written = write_report(output, path, gallery=gallery, data_root=data_root)
    except (FileNotFoundError, StoreError, RuntimeError, ValueError) as err:
        _fail(err)
        return
    console.print(f"wrote {written} and {output / 'results.csv'}, {output / 'results.parquet'}")


def comma_list(text: str, kind: type = str, name: str = "") -> list[Any]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]`` with ``kind=float`` (empty items skipped); an item that is
    not a ``kind`` is a ``ValueError`` that names the option ``--name``."""
    try:
        return [kind(item) for item in text.split(",") if item]
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated {kind.__name__}s, got '{text}'") from None


def _per_detector(pairs: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["cti.batch_size=32"]`` -> ``{"cti": {"batch_size": 32}}``."""
    options: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(pairs).items():
        detector, dot, option = key.partition(".")
        if not dot or not detector or not option:
            raise ValueError(f"'{key}' names no detector: write DETECTOR.KEY=VALUE (cti.batch_size=32)")
        options.setdefault(detector, {})[option] = value
    return options


@app.command("detectability")
def detectability_command(
    output: Annotated[
        Path, typer.Option(help="Folder of the study's results store (results.sqlite; resumes) and its summary.")
    ] = Path("runs/detectability"),
    dataset: DatasetOpt = "digits",
    recipe: RecipeOpt = "fast",
    model: ModelOpt = None,
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    rates: Annotated[
        str, typer.Option(help="Comma-separated poison rates of the backdoored models.")
    ] = "0.005,0.01,0.05,0.1",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds of the backdoored models (each rate).")] = "0,1",
    clean_seeds: Annotated[str, typer.Option(help="Comma-separated seeds of the clean models.")] = "100,101,102,103",
    data_seed: Annotated[int, typer.Option(help="The one training subset and trusted split of every model.")] = 0,
    own_splits: Annotated[bool, typer.Option(help="Each model draws the split of its own seed instead.")] = False,
    repair: Annotated[str, typer.Option(help="The repair (robustness) and CTI's calibration.")] = "pivotal_tuning",
    repair_option: Annotated[
        Optional[list[str]], typer.Option("--repair-option", "-d", help="Repair option KEY=VALUE, repeatable.")
    ] = None,
    detectors: Annotated[str, typer.Option(help="Comma-separated detectors.")] = "cti,neural_cleanse",
    detector_option: Annotated[
        Optional[list[str]],
        typer.Option(
            "--detector-option", "-x", help="Detector option DETECTOR.KEY=VALUE, repeatable (cti.batch_size=32)."
        ),
    ] = None,
    epochs: EpochsOpt = None,
    train_size: TrainSizeOpt = None,
    test_size: TestSizeOpt = None,
    trusted_size: Annotated[str, typer.Option(help="Trusted clean split given to the repair and detectors.")] = "0.05",
    workers: Annotated[int, typer.Option(help="Cells at once (local processes).")] = 1,
    retry_failed: Annotated[bool, typer.Option(help="Run failed cells again.")] = False,
    device: DeviceOpt = "auto",
    data_root: DataRootOpt = None,
) -> None:
    """The robustness-detectability study of "Pick your Poison": backdoored models over poison rates
    and seeds against clean models, each repaired (ASR before and after) and scored by detectors
    (ROC AUC against the clean models, with its p-value). The cells go into a results store, like a
    sweep's (``backdoorlab report OUTPUT`` reports it); a rerun resumes."""
    from backdoorlab.data.dataset import DataError
    from backdoorlab.experiments import RunConfig
    from backdoorlab.experiments.detectability import detectability_study
    from backdoorlab.experiments.store import StoreError
    from backdoorlab.experiments.sweep import SweepError
    from backdoorlab.report.plots import detectability_plot
    from backdoorlab.report.tables import detectability, detectability_table

    try:
        check_output_dir(output, "--output")
        if any(output.glob("rate-*/seed-*/result.json")) and not (output / "results.sqlite").exists():
            raise ValueError(
                f"{output} holds a study written by an earlier version (rate-*/seed-*/result.json, read as JSON); "
                "the study now writes a results store: choose another --output"
            )
        names = tuple(comma_list(detectors))
        detector_options = _per_detector(detector_option)
        if set(detector_options) - set(names):
            unused = ", ".join(sorted(set(detector_options) - set(names)))
            raise ValueError(f"options for {unused}, which --detectors ({', '.join(names)}) does not run")
        base = RunConfig(
            dataset=dataset,
            recipe=recipe,
            model=model,
            attack=attack,
            attack_options=parse_options(attack_option),
            epochs=epochs,
            train_size=parse_size(train_size),
            test_size=parse_size(test_size),
            trusted_size=parse_size(trusted_size),
            device=device,
            data_root=data_root,
        )
        summary, records = detectability_study(
            base,
            comma_list(rates, float, "rates"),
            comma_list(seeds, int, "seeds"),
            comma_list(clean_seeds, int, "clean-seeds"),
            output,
            workers=workers,
            retry_failed=retry_failed,
            on_cell=_cell_printer("detectability"),
            data_seed=None if own_splits else data_seed,
            repair=repair,
            repair_options=parse_options(repair_option),
            detectors=names,
            detector_options=detector_options,
        )
    except (UnknownNameError, DataError, SweepError, StoreError, ValueError, TypeError) as err:
        _fail(err)
        return
    if summary.interrupted:
        err_console.print("interrupted: finished cells are stored; run the same command again to resume")
        raise typer.Exit(code=130)
    rows = detectability(records)
    if rows:
        table = detectability_table(rows)
        write_text(output / "detectability.md", table + "\n")
        write_json(output / "detectability.json", rows)
        written = ["detectability.md", "detectability.json"]
        try:
            title = f"{records[0].config['attack']} on {dataset}, {repair}"
            detectability_plot(rows, output / "detectability.png", title)
            written.append("detectability.png")
        except RuntimeError as err:  # no matplotlib
            err_console.print(f"no plot: {err}")
        console.print(table)
        console.print(f"wrote {', '.join(str(output / name) for name in written)}", soft_wrap=True)
    _end_study(records, None if rows else "no backdoored and clean model was scored")


def _end_study(records: list[Any], missing: str | None = None) -> None:
    """The end of a study command: each failed cell named with its error's last line, and exit 1
    where a cell failed or ``missing`` says why there is no table."""
    failed = [r for r in records if r.status == "failed"]
    for record in failed:
        last = (record.error or "").strip().splitlines()[-1:] or ["(no error text)"]
        err_console.print(f"[red]failed[/] {record.label}: {escape(last[0])}", soft_wrap=True)
    if failed or missing:
        reason = f"{len(failed)} cell(s) failed" if failed else missing
        err_console.print(f"{reason}: no complete table; rerun to resume (with --retry-failed for failed cells)")
        raise typer.Exit(code=1)


clip_app = typer.Typer(
    no_args_is_help=True, help="Image-text (CLIP-style) models: poisoning, zero-shot evaluation, cleaning."
)
app.add_typer(clip_app, name="clip")


@clip_app.command("study")
def clip_study_command(
    output: Annotated[
        Path, typer.Option(help="Folder for the results store (results.sqlite, resumes) and clip_study.md/.png.")
    ],
    dataset: DatasetOpt = "cifar10",
    attacks: Annotated[str, typer.Option(help="Comma-separated attacks.")] = ",".join(
        ("badnet_stripes", "blended_triangles", "blended_text", "badnet_rand", "blended_rand")
    ),
    cleanings: Annotated[
        str, typer.Option(help="Comma-separated: fine_tuning, cleanclip, par.")
    ] = "fine_tuning,cleanclip,par",
    model: Annotated[str, typer.Option(help="Image-text model: lit (offline) or open_clip.")] = "lit",
    model_option: Annotated[
        Optional[list[str]], typer.Option("--model-option", "-m", help="Model option KEY=VALUE.")
    ] = None,
    poison_rate: Annotated[str, typer.Option(help="Fraction or count of the training pairs to poison.")] = "0.1",
    target: Annotated[int, typer.Option(help="Target class.")] = 0,
    train_size: Annotated[int, typer.Option(help="Training pairs (poisoned at --poison-rate).")] = 10000,
    epochs: Annotated[float, typer.Option(help="Epochs of the (poisoned) training.")] = 5.0,
    clean_size: Annotated[int, typer.Option(help="Trusted clean pairs for cleaning.")] = 2500,
    test_size: Annotated[int, typer.Option(help="Test images for CA and ASR.")] = 1000,
    clean_epochs: Annotated[float, typer.Option(help="Cleaning epochs (same for every method).")] = 2.0,
    clean_lr: Annotated[
        float, typer.Option(help="Peak lr of fine-tuning and CleanCLIP (PAR keeps its ratios).")
    ] = 2e-4,
    eval_every: Annotated[int, typer.Option(help="Record CA/ASR every N cleaning steps.")] = 10,
    par_threshold: Annotated[float, typer.Option(help="PAR's tau.")] = 2.15,
    seed: Annotated[int, typer.Option(help="Seeds splits, poisoning and training.")] = 0,
    workers: Annotated[int, typer.Option(help="Cells at once (local processes).")] = 1,
    retry_failed: Annotated[bool, typer.Option(help="Run failed cells again.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda...")] = "auto",
    data_root: DataRootOpt = None,
) -> None:
    """Poison an image-text model with each attack and clean it with fine-tuning, CleanCLIP and PAR.
    The cells go into a results store, like a sweep's (``backdoorlab report OUTPUT`` reports it); a
    rerun resumes."""
    from backdoorlab.data import DataError
    from backdoorlab.experiments.clip_study import ClipStudyConfig, clip_study
    from backdoorlab.experiments.store import StoreError
    from backdoorlab.experiments.sweep import SweepError
    from backdoorlab.report.plots import clip_tradeoff
    from backdoorlab.report.tables import clip_study as clip_study_rows
    from backdoorlab.report.tables import clip_study_table

    config = ClipStudyConfig(
        dataset=dataset,
        data_root=data_root,
        model=model,
        model_options=parse_options(model_option),
        attacks=tuple(comma_list(attacks)),
        cleanings=tuple(comma_list(cleanings)),
        poison_rate=parse_size(poison_rate),
        target=target,
        train_size=train_size,
        clean_size=clean_size,
        test_size=test_size,
        clean_epochs=clean_epochs,
        clean_lr=clean_lr,
        eval_every=eval_every,
        par_threshold=par_threshold,
        seed=seed,
        device=device,
    )
    config.train.epochs = epochs
    try:
        check_output_dir(output, "--output")
        if (output / "clean.json").exists() and not (output / "results.sqlite").exists():
            raise ValueError(
                f"{output} holds a study written by an earlier version (clean.pt, attacks/*.json, clip_study.json); "
                "the study now writes a results store: choose another --output"
            )
        summary, records = clip_study(
            config, output, workers=workers, retry_failed=retry_failed, on_cell=_cell_printer("clip-study")
        )
    except (UnknownNameError, DataError, SweepError, StoreError, ValueError, ImportError) as err:
        _fail(err)
        return
    if summary.interrupted:
        err_console.print("interrupted: finished cells are stored; run the same command again to resume")
        raise typer.Exit(code=130)
    rows = clip_study_rows(records)
    written = []
    if rows:
        table = clip_study_table(rows)
        write_text(output / "clip_study.md", table + "\n")
        written.append("clip_study.md")
        try:
            image = clip_tradeoff(rows)
        except RuntimeError:  # no matplotlib
            image = None
        if image:
            write_bytes(output / "clip_study.png", image)
            written.append("clip_study.png")
        console.print(table)
        console.print(f"wrote {', '.join(str(output / name) for name in written)}", soft_wrap=True)
    _end_study(records, None if rows else "no cell finished")


@app.command("list")
def list_command(
    kind: Annotated[
        Optional[str],
        typer.Argument(
            help="datasets, models, recipes, presets, attacks, defenses, repairs, sample-filters, detectors, input-detectors, regularizers, clip-models or clip-cleanings (default: all)."
        ),
    ] = None,
    options: Annotated[bool, typer.Option("--options", help="Each method's options: type, range and default.")] = False,
) -> None:
    """List the registered datasets, models, recipes, attacks, defenses, repairs, sample filters, detectors, input detectors, regularisers, CLIP-style models and their cleanings."""
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.clip.cleanings import CLIP_CLEANINGS
    from backdoorlab.clip.models import CLIP_MODELS
    from backdoorlab.data import DATASETS
    from backdoorlab.defenses import DETECTORS, INPUT_DETECTORS, REPAIRS, SAMPLE_FILTERS, TRAINING_DEFENSES
    from backdoorlab.experiments.presets import PRESETS
    from backdoorlab.experiments.recipes import RECIPES
    from backdoorlab.models import MODELS
    from backdoorlab.training.regularizers import REGULARIZERS

    registries = {
        "datasets": DATASETS,
        "models": MODELS,
        "recipes": RECIPES,
        "presets": PRESETS,
        "attacks": ATTACKS,
        "defenses": TRAINING_DEFENSES,
        "repairs": REPAIRS,
        "sample-filters": SAMPLE_FILTERS,
        "detectors": DETECTORS,
        "input-detectors": INPUT_DETECTORS,
        "regularizers": REGULARIZERS,
        "clip-models": CLIP_MODELS,
        "clip-cleanings": CLIP_CLEANINGS,
    }
    with_options = {
        "models",
        "attacks",
        "defenses",
        "repairs",
        "sample-filters",
        "detectors",
        "input-detectors",
        "regularizers",
        "clip-cleanings",
    }
    if kind is not None and kind not in registries:
        _fail(ValueError(f"unknown kind '{kind}'; valid: {', '.join(registries)}"))
    for name, registry in registries.items():
        if kind not in (None, name) or (options and name not in with_options):
            continue
        table = Table(title=name, show_header=options, title_justify="left")
        table.add_column("name", style="bold")
        table.add_column("description" if not options else "option")
        if options:
            table.add_column("takes")
            table.add_column("default")
            for item in registry.names():
                rows = registry.describe_options(item) or [("(none)", "", "")]
                for i, row in enumerate(rows):
                    table.add_row(item if i == 0 else "", *row)
            console.print(table)
            continue
        # the data each takes (registry metadata), for the kinds registered with a modality
        modal = any("modality" in registry.metadata(item) for item in registry.names())
        if modal:
            table.add_column("data")
        # where a plugin (an installed package's entry point) added some: the distribution of each
        origins = {item: registry.origin(item) or "" for item in registry.names()}
        plugged = any(origins.values())
        if plugged:
            table.add_column("plugin")
        for item, text in registry.describe().items():
            modality = [registry.metadata(item).get("modality", "any")] if modal else []
            table.add_row(item, text, *modality, *([origins[item]] if plugged else []))
        if name == "datasets":
            table.add_row(
                "ucr:<Name>",
                "time series: a UCR archive folder <data root>/ucr/<Name>/<Name>_{TRAIN,TEST}.tsv",
                "series",
            )
            table.add_row(
                "sktime:<Name>",
                "time series: any UCR/UEA set through sktime (downloads what it does not bundle)",
                "series",
            )
            table.add_row(
                "parquet:<PATH>",
                "images: Hugging Face parquet files, PATH/{train,test}.parquet (or shards, data/...)",
                "image",
            )
            table.add_row("folder:<PATH>", "images: an image folder, PATH/{train,test}/<class>/<image>", "image")
        console.print(table)


@app.command("show-trigger")
def show_trigger_command(
    dataset: DatasetOpt = "digits",
    attack: AttackOpt = None,
    attack_option: AttackOptionOpt = None,
    count: Annotated[int, typer.Option(help="Images to show.")] = 8,
    output: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("trigger.png"),
    seed: Annotated[int, typer.Option(help="Picks the images and the trigger's randomness.")] = 0,
    difference: Annotated[bool, typer.Option(help="Add a row with the amplified difference.")] = False,
    data_root: DataRootOpt = None,
) -> None:
    """Write a PNG grid: clean test images (top row) and the same images triggered (below)."""
    from backdoorlab.data import DataError
    from backdoorlab.gallery import trigger_grid

    try:
        check_output_file(output, "--output")
        path = trigger_grid(dataset, attack, parse_options(attack_option), count, output, seed, data_root, difference)
    except (UnknownNameError, DataError, ValueError, TypeError, RuntimeError) as err:
        _fail(err)
        return
    console.print(f"wrote {path}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Warnings on stderr as one ``warning:`` line, like errors (no source line or path)."""
    err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", soft_wrap=True)


def main() -> None:
    from backdoorlab.training.loop import flush_denormals

    warnings.showwarning = _show_warning
    log_to_stderr()
    flush_denormals()
    app()
