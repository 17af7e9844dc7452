"""The report's figures, as PNG bytes, and the detectability study's plot as a file (matplotlib, the
``plot`` extra)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

from backdoorlab.files import write_bytes
from backdoorlab.plotting import pyplot
from backdoorlab.report.tables import Summary, method_label


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


def ca_vs_asr(summary: Summary) -> bytes | None:
    """CA against ASR, one point per seed group (error bars: std over seeds), one colour per
    defense, one marker per attack, one panel per dataset and model; a red ring marks a group with
    cells the health checks flagged (collapsed, chance-level, or a destructive repair)."""
    rows = [r for r in summary.rows if r.get("clean_accuracy") and r.get("attack_success_rate")]
    if not rows:
        return None
    plt = pyplot()
    panels = sorted({(r["config"]["dataset"], r["config"]["model"]) for r in rows})
    methods = sorted({method_label(r["config"]) for r in rows})
    attacks = sorted({r["config"]["attack"] for r in rows})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = {a: "osD^vP*Xh<>"[i % 11] for i, a in enumerate(attacks)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels, strict=True):
        for r in rows:
            c = r["config"]
            if (c["dataset"], c["model"]) != (dataset, model):
                continue
            (asr, asr_std), (ca, ca_std) = r["attack_success_rate"], r["clean_accuracy"]
            ax.errorbar(
                asr,
                ca,
                xerr=asr_std,
                yerr=ca_std,
                fmt=markers[c["attack"]],
                color=colours[method_label(c)],
                ms=7,
                capsize=2,
                alpha=0.85,
            )
            if r.get("warned"):
                ax.plot(asr, ca, marker="o", ms=15, mfc="none", mec="red", mew=1.5, ls="")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("attack success rate")
        ax.set_ylabel("clean accuracy")
        ax.set_title(f"{dataset} · {model}", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="grey", marker=markers[a], ls="", label=a) for a in attacks]
    if any(r.get("warned") for r in rows):
        handles.append(
            plt.Line2D([], [], marker="o", ms=10, mfc="none", mec="red", ls="", label="flagged (see warnings)")
        )
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    return _png(fig)


def persistence(summary: Summary) -> bytes | None:
    """ASR and CA at each checkpoint of each repair that records them (mean over seeds): one row
    of two panels per checkpoint unit (fine-tuning's epochs, Pivotal Tuning's steps)."""
    rows = [r for r in summary.rows if r["persistence"]]
    if not rows:
        return None
    plt = pyplot()
    units = sorted({r["persistence_unit"] for r in rows})
    fig, axes = plt.subplots(len(units), 2, figsize=(10, 3.8 * len(units)), squeeze=False)
    several = len({r["config"]["dataset"] for r in rows}) > 1
    for (ax_asr, ax_ca), unit in zip(axes, units, strict=True):
        for r in (r for r in rows if r["persistence_unit"] == unit):
            c = r["config"]
            label = f"{c['attack']} · {method_label(c)}" + (f" · {c['dataset']}" if several else "")
            curves = r["persistence"]
            length = min(len(curve) for curve in curves)
            steps = [curves[0][i]["checkpoint"] for i in range(length)]
            for ax, metric in ((ax_asr, "attack_success_rate"), (ax_ca, "clean_accuracy")):
                mean = [sum(curve[i][metric] for curve in curves) / len(curves) for i in range(length)]
                ax.plot(steps, mean, marker=".", label=label)
        for ax, title in ((ax_asr, "attack success rate"), (ax_ca, "clean accuracy")):
            ax.set_xlabel(f"checkpoint ({unit} of the repair)")
            ax.set_title(title, fontsize=10)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
        ax_asr.legend(fontsize=7)
    return _png(fig)


def robustness_detectability(rows: list[dict[str, Any]], title: str = "") -> bytes | None:
    """Detectability (detector ROC AUC against clean models, y) against robustness (ASR after the
    repair, or before where there is no repair, x): one line per attack and detector, one point per
    poison rate, labelled with the rate. ``rows`` hold ``attack``, ``detector``, ``poison_rate``,
    ``auroc``, ``asr`` and ``asr_repaired`` (``None`` without a repair); the grid report and the
    detectability study draw with it."""
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    series = sorted({(r["attack"], r["detector"]) for r in rows})
    for attack, detector in series:
        points = sorted(
            (r for r in rows if (r["attack"], r["detector"]) == (attack, detector)), key=lambda r: r["poison_rate"]
        )
        xs = [r["asr_repaired"] if r["asr_repaired"] is not None else r["asr"] for r in points]
        ys = [r["auroc"] for r in points]
        ax.plot(xs, ys, marker="o", label=" · ".join(part for part in (attack, detector) if part))
        for x, y, r in zip(xs, ys, points, strict=True):
            ax.annotate(f"{100 * r['poison_rate']:g}%", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    repaired = any(r["asr_repaired"] is not None for r in rows)
    ax.set_xlabel("robustness: ASR after repair" if repaired else "robustness: ASR")
    ax.set_ylabel("detectability: ROC AUC against clean models")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _png(fig)


def detectability_plot(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """The detectability study's figure (:func:`backdoorlab.report.tables.detectability`'s rows):
    :func:`robustness_detectability`, written to ``path``; a ``RuntimeError`` where matplotlib is
    missing, a ``ValueError`` for no rows."""
    png = robustness_detectability(rows, title)
    if png is None:
        raise ValueError("the study has no rows to plot")
    return write_bytes(path, png)


def trigger_gallery(dataset: str, attack: str, options: dict[str, Any], data_root: str | None) -> bytes:
    """The trigger on a few test samples of ``dataset`` (:func:`backdoorlab.gallery.trigger_grid`)."""
    from backdoorlab.gallery import trigger_grid

    with tempfile.TemporaryDirectory() as folder:
        path = trigger_grid(dataset, attack, options, count=6, output=Path(folder) / "trigger.png", data_root=data_root)
        return path.read_bytes()


def clip_tradeoff(rows: list[dict[str, Any]]) -> bytes | None:
    """The CLIP study's cleaning curves (:func:`backdoorlab.report.tables.clip_study`'s rows): CA
    against ASR along each cleaning run, one panel per attack, one colour per method (starting from
    the poisoned model, the black star); ``None`` where no row has a curve."""
    curves: dict[str, dict[str, list[dict[str, float]]]] = {}
    for row in rows:
        if row.get("curve"):
            curves.setdefault(row["attack"], {})[row["stage"]] = row["curve"]
    if not curves:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.6), squeeze=False, sharey=True)
    colours = {"fine_tuning": "tab:grey", "cleanclip": "tab:blue", "par": "tab:red"}
    for ax, (attack, methods) in zip(axes[0], curves.items(), strict=True):
        for method, records in methods.items():
            asr, ca = [r["asr"] for r in records], [r["ca"] for r in records]
            ax.plot(asr, ca, marker="o", ms=3, color=colours.get(method), label=method)
            ax.plot(asr[0], ca[0], marker="*", ms=12, color="black")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("attack success rate")
        ax.set_title(attack, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("zero-shot clean accuracy")
    axes[0][-1].legend(fontsize=8, loc="best")
    return _png(fig)
