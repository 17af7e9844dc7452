"""Regenerate the input-detection table of docs/detection.md (grid examples/input_detection.yaml).

Per attack, a backdoored model and a clean one (poison rate 0, the same trigger stamped at test
time), each with the grid's input detector: AUROC of its scores on triggered against clean test
inputs, the share of each flagged at the threshold set on trusted clean data (5% false positives),
and CA and ASR behind the filter. The cells are stored in ``OUTPUT/results.sqlite`` and reused.
Usage::

    BACKDOORLAB_DATA=../shared/data python scripts/detection_table.py --output runs/input-detection
"""

from __future__ import annotations

from doc_blocks import table_script


def table(results: list[dict]) -> list[str]:
    lines = [
        "| dataset | attack | model | detector | CA / ASR | AUROC | TPR | FPR | filtered CA / ASR | ms per input |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        c, m = r["config"], r["metrics"]
        model = "backdoored" if c["poison_rate"] else "clean"
        lines.append(
            f"| {c['dataset']} | {c['attack']} | {model} | {c['input_detector']} "
            f"| {m['clean_accuracy']:.3f} / {m['attack_success_rate']:.3f} | {m['input_auroc']:.3f} "
            f"| {m['input_tpr']:.3f} | {m['input_fpr']:.3f} "
            f"| {m['filtered_clean_accuracy']:.3f} / {m['filtered_attack_success_rate']:.3f} "
            f"| {1000 * m['input_seconds_per_input']:.1f} |"
        )
    return lines


def main() -> None:
    table_script(
        __doc__.split("\n")[0], "input_detection.yaml", "runs/input-detection", "detection.md", "input-detection", table
    )


if __name__ == "__main__":
    main()
