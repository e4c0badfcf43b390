"""Evaluate a head on an embedding directory: metrics via scikit-learn, report.md, plots.

:func:`~dfl_tf.heads.metrics.compute_metrics` is the single metric function: ``dfl train`` uses it for
the validation ``metrics.json`` of a head directory and :func:`evaluate` for its report.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dfl_tf.runtime.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from dfl_tf.errors import DflError, whole_number
from dfl_tf.runtime.outputs import clear_out, prepare_out
from dfl_tf.heads.metrics import _f, best_f1_threshold, compute_metrics, predict_probs  # noqa: F401  (public here too)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any], title: str = "Evaluation", context: dict[str, Any] | None = None
                    ) -> str:
    classes = metrics["classes"]
    parts = [f"# {title}", ""]
    for key, value in (context or {}).items():
        parts.append(f"- {key}: {value}")
    parts += ["", "## Summary", "", _table(["metric", "value"], [
        [k, metrics[k]] for k in ("num_records", "accuracy", "balanced_accuracy", "cohen_kappa", "precision_macro",
                                  "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
                                  "f1_weighted", "roc_auc_macro_ovr", "pr_auc_macro", "log_loss")]), ""]
    parts += ["## Per class", "", _table(
        ["class", "precision", "recall", "f1", "support", "PR-AUC (AP)", "ROC-AUC"],
        [[c, v["precision"], v["recall"], v["f1"], v["support"], v["average_precision"], v["roc_auc"]]
         for c, v in metrics["per_class"].items()]), ""]
    parts += ["## Confusion matrix (rows: true, columns: predicted)", "", _table(
        ["true \\ pred"] + list(classes), [[c] + row for c, row in zip(classes, metrics["confusion_matrix"])]), ""]
    if "linear_probe" in metrics:
        probe = metrics["linear_probe"]
        keys = ("balanced_accuracy", "accuracy", "f1_macro", "cohen_kappa", "roc_auc_macro_ovr", "log_loss")
        parts += ["## Head vs linear probe", ""]
        if probe is None:
            parts += ["No linear probe in this head directory (trained before heads stored one).", ""]
        else:
            parts += [_table(["model"] + list(keys), [["head"] + [metrics[k] for k in keys],
                                                      ["linear probe" + (f" (C={probe['C']:g})" if probe.get("C") is not None else "")]
                                                      + [probe[k] for k in keys]]),
                      "", "Linear probe: scikit-learn LogisticRegression on the same standardised training "
                      "embeddings, stored with the head (probe.npz).", ""]
    if "at_threshold" in metrics:
        t = metrics["at_threshold"]
        pos = metrics.get("positive_class", {}).get("name", classes[1])
        parts += [f"## Positive class '{pos}' at threshold {t['threshold']:.4f}", "", _table(
            ["metric", "value"], [[k, t[k]] for k in ("precision", "recall", "f1", "accuracy",
                                                      "balanced_accuracy", "cohen_kappa")]), "",
            _table(["true \\ pred"] + list(classes), [[c] + row for c, row in zip(classes, t["confusion_matrix"])]),
            ""]
    return "\n".join(parts)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def write_plots(out: Path, y: np.ndarray, probs: np.ndarray, metrics: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    classes = metrics["classes"]
    cm = np.asarray(metrics["confusion_matrix"])
    side = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    atomic_write_bytes(out / "confusion_matrix.png", _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    positive = metrics.get("positive_class", {}).get("index")  # two-class tasks: the positive class only
    for c, name in enumerate(classes):
        binary = (y == c).astype(int)
        if binary.sum() == 0 or (positive is not None and c != positive):
            continue
        precision, recall, _ = precision_recall_curve(binary, probs[:, c])
        ap = metrics["per_class"][name]["average_precision"]
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall curves" if positive is None else
                 f"Precision-recall, positive class '{classes[positive]}'")
    ax.legend(loc="lower left", fontsize="small")
    atomic_write_bytes(out / "pr_curves.png", _png(fig))
    plt.close(fig)
    return ["confusion_matrix.png", "pr_curves.png"]


def check_head_embeddings(info: dict[str, Any], manifest: dict[str, Any], head_name: str, emb_name: str) -> None:
    """Refuse embeddings that a head was not trained for (backbone fingerprint, views, dim, read
    geometry: :func:`dfl_tf.provenance.check_compatible`; classes)."""
    from dfl_tf.provenance import check_compatible

    check_compatible(info, manifest, head_name, emb_name)
    if list(info["classes"]) != list(manifest["classes"]):
        raise DflError(f"{head_name} and {emb_name} disagree on classes: {list(info['classes'])} vs "
                       f"{list(manifest['classes'])}")


def positive_index(info: dict[str, Any]) -> int:
    """Index of a two-class head's positive class (``head.json`` ``positive_class``; else 1)."""
    classes, pos = list(info["classes"]), info.get("positive_class")
    return classes.index(pos) if len(classes) == 2 and pos in classes else 1


PROBE_KEYS = ("accuracy", "balanced_accuracy", "cohen_kappa", "f1_macro", "f1_weighted", "roc_auc_macro_ovr",
              "pr_auc_macro", "log_loss", "confusion_matrix")


def probe_metrics(head: str | Path, X: np.ndarray, y: np.ndarray, info: dict[str, Any],
                  head_metrics: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Metrics of the linear-probe reference stored in head directory ``head`` on ``X``/``y``.

    None for head directories without a probe (written before heads stored one).
    """
    from dfl_tf.heads.probe import load_probe

    probe = load_probe(head)
    if probe is None:
        return None
    if probe.W.shape != (len(info["classes"]), X.shape[1]):
        raise DflError(f"{head}: linear probe of shape {probe.W.shape} does not match the head "
                       f"({len(info['classes'])} classes, dim {X.shape[1]})")
    m = compute_metrics(y, probe.predict_proba(X), info["classes"], positive=positive_index(info))
    out = {k: m[k] for k in PROBE_KEYS}
    ref = info.get("linear_probe") or {}
    out["C"] = ref.get("C")
    out["C_chosen_by"] = ref.get("C_chosen_by")
    if head_metrics is not None and out["balanced_accuracy"] is not None:
        out["head_minus_probe_balanced_accuracy"] = _f(head_metrics["balanced_accuracy"] - out["balanced_accuracy"])
    return out


def evaluate(head: str | Path, emb: str | Path, out: str | Path | None = None, batch_size: int = 1024,
             overwrite: bool = False, slide_labels: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the head directory ``head`` on the labeled records of embedding directory ``emb``.

    Returns the metrics dict; with ``out`` also writes ``metrics.json``, ``report.md``,
    ``confusion_matrix.png``, ``pr_curves.png`` and ``predictions.csv`` there (an earlier report
    there is replaced only with ``overwrite``; ``out`` must not be or lie inside ``head`` or ``emb``,
    see :func:`dfl_tf.runtime.outputs.prepare_out`). The head
    directory's linear-probe reference is scored on the same records (``"linear_probe"``;
    None for heads trained before probes were stored). A slide head (``head.json`` ``kind:
    slide``) needs ``slide_labels`` and is evaluated on bags
    (:func:`dfl_tf.heads.slide.evaluate.evaluate_slide_head`).
    """
    from dfl_tf.heads.model import load_head
    from dfl_tf.store.manifest import load_manifest
    from dfl_tf.store.shards import load_embeddings

    batch_size = whole_number("--batch-size", batch_size)
    replace = out is not None and prepare_out(out, "report", (head, emb), overwrite) == "replace"
    manifest = load_manifest(emb)
    info_path = Path(head) / "head.json"
    if not info_path.exists():
        raise DflError(f"{head}: not a head directory (no head.json)")
    import json

    head_json = json.loads(info_path.read_text())
    if head_json.get("kind") == "slide" or slide_labels is not None:
        if head_json.get("kind") != "slide":
            raise DflError(f"{head}: --slide-labels needs a slide head (trained with dfl train --slide-labels)")
        if slide_labels is None:
            raise DflError(f"{head}: a slide head is evaluated on bags: give --slide-labels CSV")
        from dfl_tf.heads.slide.evaluate import evaluate_slide_head

        return evaluate_slide_head(head, emb, head_json, slide_labels, out, replace)
    check_head_embeddings(json.loads(info_path.read_text()), manifest, f"head {head}", f"embeddings {emb}")
    model, info = load_head(head)
    data = load_embeddings(emb)
    probs = predict_probs(model, data.X, batch_size)
    labeled = data.y >= 0
    if not labeled.any():
        raise DflError(f"{emb}: no labeled records to evaluate")
    threshold = info.get("threshold") if len(info["classes"]) == 2 else None
    positive = positive_index(info)
    metrics = compute_metrics(data.y[labeled], probs[labeled], info["classes"], threshold, positive=positive)
    metrics["linear_probe"] = probe_metrics(head, data.X[labeled], data.y[labeled], info, metrics)
    metrics["unlabeled_records"] = int((~labeled).sum())
    metrics["head"] = str(head)
    metrics["embeddings"] = str(emb)
    if out is not None:
        out = Path(out)
        if replace:  # no file of the earlier report stays beside the new one
            clear_out(out, "report")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "metrics.json", metrics)
        context = {"head": head, "embeddings": emb, "backbone": info["backbone"].get("name"),
                   "views": ", ".join(info["views"]), "unlabeled records (not scored)": metrics["unlabeled_records"]}
        atomic_write_text(out / "report.md", report_markdown(metrics, "Evaluation", context))
        write_plots(out, data.y[labeled], probs[labeled], metrics)
        buf = io.StringIO()
        writer = csv.writer(buf)
        classes = info["classes"]
        writer.writerow(["id", "label", "predicted"] + [f"p_{c}" for c in classes])
        pred = probs.argmax(axis=1) if len(probs) else []
        for i in range(len(data)):
            label = classes[data.y[i]] if data.y[i] >= 0 else ""
            writer.writerow([data.ids[i], label, classes[int(pred[i])]] + [f"{p:.6g}" for p in probs[i]])
        atomic_write_text(out / "predictions.csv", buf.getvalue())
    return metrics
