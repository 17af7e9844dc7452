"""Regenerate the sample-filtering table of docs/defenses.md (grid examples/sample_filtering.yaml).

Per attack and poison rate, the undefended victim and each sample filter: its precision, recall and
AUROC against the poison mask, then CA / ASR of the model retrained on the samples it kept. The cells
are stored in ``OUTPUT/results.sqlite`` and reused. Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/sample_filtering_table.py --output benchmarks/results/sample-filtering-mnist
"""

from __future__ import annotations

from doc_blocks import table_script


def table(results: list[dict]) -> list[str]:
    lines = [
        "| dataset | attack | poisons | filter | flagged | precision | recall | AUROC | CA / ASR | filter + retrain s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c, m, t = r["config"], r["metrics"], r["timings"]
        if c["defense"] is None:
            found = "| - | - | - | - "
            seconds = "-"
        else:
            found = (
                f"| {m['isolated']} | {m['isolation_precision']:.3f} | {m['isolation_recall']:.3f} "
                f"| {m['isolation_auroc']:.3f} "
            )
            seconds = f"{t['defense']:.0f} + {t['retrain']:.0f}"
        lines.append(
            f"| {c['dataset']} | {c['attack']} | {r['data']['poisoned']} | {c['defense'] or 'none'} {found}"
            f"| {m['clean_accuracy']:.3f} / {m['attack_success_rate']:.3f} | {seconds} |"
        )
    return lines


def main() -> None:
    table_script(
        __doc__.split("\n")[0],
        "sample_filtering.yaml",
        "benchmarks/results/sample-filtering-mnist",
        "defenses.md",
        "sample-filtering",
        table,
    )


if __name__ == "__main__":
    main()
