"""The selection's outputs: ``table.md`` and ``results.csv`` from the result of
:func:`dfl_tf.select.protocol.select_backbones`."""
from __future__ import annotations

import csv
from typing import Any, Sequence


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    if summary.get("std") is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Backbone selection: {result['dataset']}", "",
             f"Views {','.join(result['views'])}; {result['split']['train']} train / {result['split']['val']} "
             f"validation records ({result['split']['method']}); linear softmax head, focal loss, Adam, "
             f"feature noise {result['protocol']['noise']}, {result['protocol']['epochs']} epochs, "
             f"{result['protocol']['seeds']} seeds (mean ± std).", "",
             "| rank | backbone | bal. acc | probe bal. acc | kappa | weighted F1 | kNN acc | silhouette "
             "| extract s | train s |",
             "|---:|---|---|---:|---|---|---:|---:|---:|---:|"]
    for row in result["results"]:
        if row["cached"]:
            ext = "cached" + (f" ({row['extract_seconds_original']:.1f})"
                              if row.get("extract_seconds_original") is not None else "")
        else:
            ext = f"{row['extract_seconds']:.1f}"
        lines.append(f"| {row['rank']} | {row['backbone']} | {_fmt(row['balanced_accuracy'])} | "
                     f"{_num(row.get('probe_balanced_accuracy'))} | {_fmt(row['cohen_kappa'])} | {_fmt(row['f1_weighted'])} | {_num(row['knn_accuracy'])} | "
                     f"{_num(row['silhouette'])} | {ext} | {row['train_seconds']:.1f} |")
    lines += ["", f"Best: **{result['best']}**." if result.get("best") else ""]
    lines.append("probe bal. acc: scikit-learn LogisticRegression (C by 3-fold cross-validation on the train "
                 "part) on the same split, the reference for the linear heads; "
                 "kNN acc: cross-validated k-NN accuracy on all labeled records (training-free pre-screen); "
                 "extract s: seconds spent extracting in this run (cached: reused, with the original time).")
    for note in result.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["rank", "backbone", "weights", "control", "balanced_accuracy_mean", "balanced_accuracy_std",
              "probe_balanced_accuracy",
              "cohen_kappa_mean", "cohen_kappa_std", "f1_weighted_mean", "f1_weighted_std", "knn_accuracy",
              "knn_balanced_accuracy", "silhouette", "extract_seconds", "extract_seconds_original", "cached",
              "train_seconds", "dim", "input_size", "fingerprint", "cache"]


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k) for k in CSV_FIELDS}
        for metric in ("balanced_accuracy", "cohen_kappa", "f1_weighted"):
            flat[f"{metric}_mean"] = row[metric]["mean"]
            flat[f"{metric}_std"] = row[metric]["std"]
        writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
    return buf.getvalue()
