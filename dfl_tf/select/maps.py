"""Embedding maps: 2-D projections coloured by class, and TensorBoard Embedding Projector exports.

* :func:`project_2d`: UMAP when ``umap-learn`` is importable (the optional extra ``umap``),
  else PCA; ``method="pca"`` / ``"tsne"`` (scikit-learn) / ``"umap"`` force one.
* :func:`plot_maps`: one panel per backbone in one figure (the paper's Fig. 2).
* :func:`export_projector`: ``tensors.tsv`` + ``metadata.tsv`` per embedding set and one
  ``projector_config.pbtxt`` listing them (``tensor_path``, so no checkpoint is needed). Point
  TensorBoard at the folder: ``tensorboard --logdir OUT/projector`` and open the Projector tab.
* :func:`embedding_maps`: both, for embedding directories written by ``dfl extract``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dfl_tf.runtime.files import atomic_write_bytes, atomic_write_text
from dfl_tf.errors import DflError

METHODS = ("auto", "umap", "pca", "tsne")
PROJECTOR_CONFIG = "projector_config.pbtxt"


def resolve_method(method: str = "auto") -> str:
    """``auto`` -> ``umap`` when umap-learn is importable, else ``pca``."""
    method = (method or "auto").lower()
    if method not in METHODS:
        raise DflError(f"unknown map method '{method}' (choose from {', '.join(METHODS)})")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "auto":
        return "umap" if has_umap else "pca"
    if method == "umap" and not has_umap:
        raise DflError("map method 'umap' needs umap-learn (pip install 'dfl_tf[umap]'); use pca or tsne")
    return method


def subsample(y: np.ndarray, max_points: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, stratified by ``y`` (all rows when fewer)."""
    n = len(y)
    if not max_points or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, int(round(max_points * len(idx) / n)))
        picked.append(rng.choice(idx, size=min(k, len(idx)), replace=False))
    out = np.sort(np.concatenate(picked))
    if len(out) > max_points:
        out = np.sort(rng.choice(out, size=max_points, replace=False))
    return out


def project_2d(X: np.ndarray, method: str = "auto", seed: int = 0) -> np.ndarray:
    """[N, dim] -> [N, 2] on standardised features."""
    X = np.asarray(X, np.float64)
    if len(X) == 0:
        return np.zeros((0, 2))
    std = X.std(axis=0)
    Xs = (X - X.mean(axis=0)) / np.where(std < 1e-6, 1.0, std)
    method = resolve_method(method)
    if not np.isfinite(Xs).all() or float(Xs.var(axis=0).sum()) < 1e-12:  # constant embeddings
        return np.zeros((len(X), 2))
    if len(X) < 3:
        return np.pad(Xs[:, :2], ((0, 0), (0, max(0, 2 - Xs.shape[1]))))
    if method == "umap":
        import umap  # optional extra

        reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, len(X) - 1))
        return np.asarray(reducer.fit_transform(Xs), np.float64)
    if method == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        if Xs.shape[1] > 50:  # the usual PCA-50 step before t-SNE
            Xs = PCA(n_components=min(50, len(Xs)), random_state=seed).fit_transform(Xs)
        perplexity = float(min(30.0, max(2.0, (len(Xs) - 1) / 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(Xs)
    from sklearn.decomposition import PCA

    k = min(2, Xs.shape[1], len(Xs))
    out = PCA(n_components=k, random_state=seed).fit_transform(Xs)
    return np.pad(out, ((0, 0), (0, 2 - k)))


def plot_maps(panels: Sequence[Mapping[str, Any]], path: str | Path, classes: Sequence[str],
              method: str = "") -> str:
    """One scatter panel per entry ``{"title", "points" [N,2], "y" [N]}``; PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not panels:
        raise DflError("no embedding sets to map")
    n = len(panels)
    ncols = min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, panel in zip(axes.flat, panels):
        pts, y = np.asarray(panel["points"]), np.asarray(panel["y"])
        for c, name in enumerate(classes):
            sel = y == c
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=8, alpha=0.75, color=cmap(c % cmap.N), label=name,
                           linewidths=0)
        ax.set_title(str(panel["title"]), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), frameon=False,
                   markerscale=2)
    if method:
        fig.suptitle(f"Embeddings ({method.upper() if method != 'tsne' else 't-SNE'}), coloured by class",
                     fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.95 if method else 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def _safe(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return keep.strip("._") or "embedding"


def _tsv_field(value: Any) -> str:
    return str(value).replace("\t", " ").replace("\n", " ").replace("\r", " ")


def export_projector(sets: Sequence[Mapping[str, Any]], out: str | Path) -> dict[str, Any]:
    """Write TensorBoard Embedding Projector files under ``out``.

    ``sets``: ``{"name", "X" [N, dim], "metadata": {column: [N values]}}`` each. Writes
    ``out/<name>/tensors.tsv`` (no header), ``out/<name>/metadata.tsv`` (header row, as the
    projector expects with more than one column) and ``out/projector_config.pbtxt``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, written, used = [], [], set()
    for item in sets:
        name = _safe(str(item["name"]))
        base, i = name, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        X = np.asarray(item["X"], np.float32)
        meta = {k: list(v) for k, v in item.get("metadata", {}).items()}
        for key, values in meta.items():
            if len(values) != len(X):
                raise DflError(f"projector metadata '{key}' has {len(values)} rows for {len(X)} vectors")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["\t".join(f"{v:.5g}" for v in row) for row in X]
        atomic_write_text(folder / "tensors.tsv", "\n".join(rows) + ("\n" if rows else ""))
        cols = list(meta)
        lines = []
        if len(cols) > 1:
            lines.append("\t".join(cols))
        for r in range(len(X)):
            lines.append("\t".join(_tsv_field(meta[c][r]) for c in cols))
        if cols:
            atomic_write_text(folder / "metadata.tsv", "\n".join(lines) + "\n")
        entry = [f'  tensor_name: "{name}"',
                 f'  tensor_path: "{name}/tensors.tsv"',
                 f"  tensor_shape: {X.shape[0]}",
                 f"  tensor_shape: {X.shape[1] if X.ndim == 2 else 0}"]
        if cols:
            entry.append(f'  metadata_path: "{name}/metadata.tsv"')
        entries.append("embeddings {\n" + "\n".join(entry) + "\n}\n")
        written.append({"name": name, "rows": int(X.shape[0]), "dim": int(X.shape[1]) if X.ndim == 2 else 0,
                        "tensors": str(folder / "tensors.tsv"),
                        "metadata": str(folder / "metadata.tsv") if cols else None})
    atomic_write_text(out / PROJECTOR_CONFIG, "".join(entries))
    return {"config": str(out / PROJECTOR_CONFIG), "embeddings": written}


def embedding_maps(emb_dirs: Mapping[str, str | os.PathLike], out: str | Path, method: str = "auto",
                   max_points: int = 2000, seed: int = 0, projector: bool = True,
                   titles: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``out/maps.png`` (one panel per embedding directory) and ``out/projector/``.

    ``emb_dirs``: {display name: embedding directory}. Only labeled records are mapped; at
    most ``max_points`` of them, stratified by class, the same ids for every directory.
    """
    from dfl_tf.store.shards import load_embeddings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method = resolve_method(method)
    loaded = {}
    for name, directory in emb_dirs.items():
        data = load_embeddings(directory)
        keep = np.flatnonzero(data.y >= 0)
        loaded[name] = (data, keep)
    classes = None
    panels, sets = [], []
    chosen_ids = None
    for name, (data, keep) in loaded.items():
        classes = classes or data.classes
        if chosen_ids is None:
            sub = keep[subsample(data.y[keep], max_points, seed)]
            chosen_ids = [data.ids[i] for i in sub]
        index = {i: k for k, i in enumerate(data.ids)}
        rows = np.array([index[i] for i in chosen_ids if i in index], np.int64)
        X, y = data.X[rows], data.y[rows]
        panels.append({"title": (titles or {}).get(name, name), "points": project_2d(X, method, seed), "y": y})
        sets.append({"name": name, "X": X,
                     "metadata": {"label": [data.classes[v] for v in y], "id": [data.ids[i] for i in rows]}})
    plot = plot_maps(panels, out / "maps.png", classes or [], method)
    result = {"maps": plot, "method": method, "points": len(chosen_ids or [])}
    if projector:
        result["projector"] = export_projector(sets, out / "projector")
    return result
