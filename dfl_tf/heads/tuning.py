"""Small-data model selection for heads: on the validation set, or grouped, stratified k-fold cross-validation.

When the training set is small (fewer than :data:`SMALL_N` labeled records, or fewer than
:data:`SMALL_PER_CLASS` in some class), ``dfl train`` picks the head's size and regularisation
(hidden units, weight decay and feature-noise std), or the linear probe, then trains on all of
the training set (:class:`SmallData`; the candidate fits run together,
:mod:`dfl_tf.heads.batched`). With a validation set (``--val``) each candidate is fitted on the
training set and scored on it (:func:`validate`), as one tunes a probe: training records that
are crops or augmented copies of a few source tiles carry no groups, and folds of them leak.
Without, by k-fold cross-validation on the training set (:func:`cross_validate`). The
linear-probe reference tunes its ``C`` the same way (:mod:`dfl_tf.heads.probe`). Folds are stratified by class and, when every record has a
``group`` (patient / slide), grouped: no group has records in two folds. They depend only on
the labels, the groups and the seed.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np

from dfl_tf.errors import DflError
from dfl_tf.options.train import SELECT_MODES  # noqa: F401  (public here too)
from dfl_tf.data.splits import DEFAULT_FOLDS, cv_folds  # noqa: F401  (the folds live in splits.py, public here too)

SMALL_N = 2000
SMALL_PER_CLASS = 50
#: the candidates of the selection (product of the lists); chosen by benchmarks/bench_heads_study.py
DEFAULT_GRID: dict[str, list[float]] = {"hidden": [256, 0], "weight_decay": [1e-4, 1.0], "noise": [0.1, 0.5, 1.0]}
#: the choice recorded when the linear-probe reference beats every head candidate
PROBE_CHOICE = "linear probe"
#: AdamW weight decay of the default head (when no selection runs); chosen by the study
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_HIDDEN = 256


def is_small(counts: Sequence[int]) -> bool:
    """True when a training set with these class counts is in the small-data regime."""
    counts = np.asarray(counts)
    present = counts[counts > 0]
    return int(counts.sum()) < SMALL_N or (len(present) > 0 and int(present.min()) < SMALL_PER_CLASS)


def grid_candidates(grid: dict[str, Sequence[float]] | None, fixed: dict[str, bool] | None = None
                    ) -> list[dict[str, float]]:
    """The product of a grid ``{"hidden": [...], "weight_decay": [...], "noise": [...]}`` as a list of settings.

    Keys marked True in ``fixed`` (values the user gave explicitly) are left out; [] when none
    is left.
    """
    import itertools

    grid = DEFAULT_GRID if grid is None else grid
    if not isinstance(grid, dict) or not grid:
        raise DflError(f"cv_grid must be a mapping like {DEFAULT_GRID}, got {grid!r}")
    unknown = set(grid) - set(DEFAULT_GRID)
    if unknown:
        raise DflError(f"cv_grid has unknown key(s) {sorted(unknown)} (known: {', '.join(DEFAULT_GRID)})")
    keys, values = [], []
    for key, vals in grid.items():
        vals = [vals] if isinstance(vals, (int, float)) else list(vals)
        try:
            vals = [float(v) for v in vals]
        except (TypeError, ValueError) as exc:
            raise DflError(f"cv_grid.{key} must be a list of numbers, got {grid[key]!r}") from exc
        if not vals or any(v < 0 for v in vals):
            raise DflError(f"cv_grid.{key} must be a non-empty list of numbers >= 0, got {grid[key]!r}")
        if key == "hidden":
            if any(v != int(v) for v in vals):
                raise DflError(f"cv_grid.hidden must be a list of integers >= 0, got {grid[key]!r}")
            vals = [int(v) for v in vals]
        if key == "noise" and any(v > 1 for v in vals):
            raise DflError(f"cv_grid.noise values must be in [0, 1] (std on standardised features), got {vals}")
        if (fixed or {}).get(key):
            continue
        keys.append(key)
        values.append(vals)
    if not keys:
        return []
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def select_settings(candidates: Sequence[dict[str, float]], fold_scores: np.ndarray,
                    progress: bool = False) -> dict[str, Any]:
    """The candidate with the best mean cross-validation score (ties: the earlier candidate).

    ``fold_scores[c, f]``: score (balanced accuracy) of candidate ``c`` on held-out fold ``f``.
    Returns ``{"choice", "scores": [{...candidate, "mean", "std", "folds"}]}``.
    """
    fold_scores = np.asarray(fold_scores, np.float64)
    scores = []
    for cand, per_fold in zip(candidates, fold_scores):
        scores.append({**cand, "mean": float(per_fold.mean()), "std": float(per_fold.std()),
                       "folds": [round(float(v), 6) for v in per_fold]})
        if progress:
            desc = ", ".join(f"{k} {v:g}" for k, v in cand.items())
            print(f"cv: {desc}: balanced accuracy {scores[-1]['mean']:.4f} ± {scores[-1]['std']:.4f}",
                  file=sys.stderr)
    best = int(np.argmax(fold_scores.mean(axis=1)))
    return {"choice": dict(candidates[best]), "scores": scores}


def make_optimizer(lr: float, weight_decay: float):
    """Adam, or AdamW with decoupled ``weight_decay`` on the kernels (biases are not decayed).

    The Adam step runs as TensorFlow's fused kernel (:func:`fused_adam`)."""
    import keras

    if not weight_decay:
        return fused_adam(keras.optimizers.Adam(learning_rate=float(lr)))
    opt = keras.optimizers.AdamW(learning_rate=float(lr), weight_decay=float(weight_decay))
    opt.exclude_from_weight_decay(var_names=["bias"])
    return fused_adam(opt)


def fused_adam(opt):
    """Make this Keras ``Adam``/``AdamW`` (TensorFlow backend, no amsgrad) apply its moment and
    parameter updates with one fused kernel per variable (``ResourceApplyAdam``) instead of about
    ten elementwise ops (each a pass over the kernel; at batch 256 they cost as much as the head's
    matmuls). Same update rule as Keras (``alpha = lr sqrt(1 - b2^t) / (1 - b1^t)``, ``m += (g - m)
    (1 - b1)``, ``v += (g^2 - v)(1 - b2)``, ``var -= alpha m / (sqrt(v) + eps)``); AdamW's decoupled
    weight decay is still applied by Keras before it. Only this instance changes: it saves as the
    plain Keras optimizer. Returns ``opt``."""
    import keras

    if keras.backend.backend() != "tensorflow" or getattr(opt, "amsgrad", False):
        return opt

    from dfl_tf.heads.batched import apply_adam

    def update_step(gradient, variable, learning_rate):
        index = opt._get_variable_index(variable)
        apply_adam(variable, opt._momentums[index], opt._velocities[index], gradient,
                   opt.iterations + 1, learning_rate, opt.beta_1, opt.beta_2, opt.epsilon)

    opt.update_step = update_step
    return opt


def score_candidates(X: np.ndarray, y: np.ndarray, n_classes: int,
                     folds: Sequence[tuple[np.ndarray, np.ndarray]], candidates: Sequence[dict[str, float]],
                     specs: Sequence[dict[str, Any]], *, hidden: int, weight_decay: float, seed: int = 0,
                     **fit: Any) -> np.ndarray:
    """Balanced accuracy ``[candidate, fold]`` of every candidate fitted on ``folds[f][0]`` and scored
    on ``folds[f][1]`` (rows of ``X``; all fits at once, :func:`dfl_tf.heads.batched.fit_predict` with
    ``fit``: dropout, lr, epochs, batch_size, loss, gamma, alpha, class_weights); ``specs`` give the
    noise std / feature-dropout rate that a candidate does not set."""
    from sklearn.metrics import balanced_accuracy_score

    from dfl_tf.heads.batched import fit_predict
    from dfl_tf.heads.inputs import check_memory

    feature_dropout = next((sp["rate"] for sp in specs if sp["name"] == "feature-dropout"), 0.0)
    base_noise = next((sp["std"] for sp in specs if sp["name"] == "noise"), 0.0)
    sampler = next((sp.get("sampler", "table") for sp in specs if sp["name"] == "noise"), "table")
    scores = np.zeros((len(candidates), len(folds)))
    for h in sorted({int(c.get("hidden", hidden)) for c in candidates}):  # one batched run per architecture
        pairs = [(c, f) for c in range(len(candidates)) if int(candidates[c].get("hidden", hidden)) == h
                 for f in range(len(folds))]
        check_memory(X.shape[1], n_classes, h, int(fit.get("batch_size", 256)), models=len(pairs),
                     what=f"selection ({len(pairs)} heads of hidden {h} trained together)")
        probs = fit_predict(X, y, n_classes, [folds[f][0] for _, f in pairs], [folds[f][1] for _, f in pairs],
                            hidden=h, feature_dropout=feature_dropout, noise_sampler=sampler,
                            noise=[candidates[c].get("noise", base_noise) for c, _ in pairs],
                            weight_decay=[candidates[c].get("weight_decay", weight_decay) for c, _ in pairs],
                            seed=seed, **fit)
        for (c, f), p in zip(pairs, probs):
            scores[c, f] = balanced_accuracy_score(y[folds[f][1]], p.argmax(axis=1))
    return scores


def cross_validate(X: np.ndarray, y: np.ndarray, n_classes: int, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   candidates: Sequence[dict[str, float]], specs: Sequence[dict[str, Any]], *, hidden: int,
                   weight_decay: float, seed: int = 0, progress: bool = False, method: str = "", **fit: Any
                   ) -> dict[str, Any]:
    """Score every candidate on every fold (:func:`score_candidates`) and pick the best."""
    import time

    t0 = time.time()
    fold_scores = score_candidates(X, y, n_classes, folds, candidates, specs, hidden=hidden,
                                   weight_decay=weight_decay, seed=seed, **fit)
    result = select_settings(candidates, fold_scores, progress=progress)
    return {"performed": True, "method": method, "folds": len(folds), "records": int(len(y)),
            "metric": "balanced_accuracy", **result, "seconds": round(time.time() - t0, 2)}


def validate(X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, n_classes: int,
             candidates: Sequence[dict[str, float]], specs: Sequence[dict[str, Any]], *, hidden: int,
             weight_decay: float, seed: int = 0, progress: bool = False, **fit: Any) -> dict[str, Any]:
    """Fit every candidate on the training records ``X``/``y``, score it on the validation records
    ``X_val``/``y_val`` (balanced accuracy) and pick the best (ties: the earlier candidate)."""
    import time

    t0 = time.time()
    n, m = len(y), len(y_val)
    split = [(np.arange(n), np.arange(n, n + m))]
    per = score_candidates(np.concatenate([np.asarray(X, np.float32), np.asarray(X_val, np.float32)]),
                           np.concatenate([y, y_val]), n_classes, split, candidates, specs, hidden=hidden,
                           weight_decay=weight_decay, seed=seed, **fit)[:, 0]
    scores = [{**cand, "validation": round(float(v), 6)} for cand, v in zip(candidates, per)]
    if progress:
        for cand, v in zip(candidates, per):
            desc = ", ".join(f"{k} {val:g}" for k, val in cand.items())
            print(f"selection: {desc}: validation balanced accuracy {v:.4f}", file=sys.stderr)
    return {"performed": True, "method": "validation", "records": int(n), "validation_records": int(m),
            "metric": "balanced_accuracy", "choice": dict(candidates[int(np.argmax(per))]), "scores": scores,
            "seconds": round(time.time() - t0, 2)}


class SmallData:
    """Cross-validated selection and the linear probe for one training set (used by train_head).

    ``data`` is the head's training data (:class:`dfl_tf.heads.train_data.TrainData`); records,
    labels and groups are read into memory here only when selecting or fitting the probe.
    """

    def __init__(self, emb_dir, data, select: str, k: int, seed: int, candidates: Sequence[dict[str, float]]):
        self.emb_dir, self.data, self.k, self.seed = emb_dir, data, int(k), int(seed)
        self.small = is_small(data.counts)
        self.selecting = bool(candidates) and (select == "always" or (select == "auto" and self.small))
        self.reason = (None if self.selecting else "select=never" if select == "never" else
                       "weight decay and noise std both given" if not candidates else
                       f"training set not small ({data.num} records, >= {SMALL_PER_CLASS} per class; "
                       f"selection runs below {SMALL_N} records or {SMALL_PER_CLASS} per class)")
        self.folds: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._arrays: tuple[np.ndarray, np.ndarray, list[str]] | None = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(X float32, y) of the labeled training records, in shard order."""
        if self._arrays is None and self.data.in_memory and self.data.X is not None:
            return np.asarray(self.data.X, np.float32), self.data.y
        return self._load()[:2]

    def _load(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._arrays is None:
            from dfl_tf.store.shards import load_embeddings

            emb = load_embeddings(self.emb_dir)
            keep = emb.y >= 0
            groups = [g for g, k in zip(emb.groups, keep) if k]
            self._arrays = (np.asarray(emb.X[keep], np.float32), emb.y[keep], groups)
        return self._arrays

    def select(self, candidates: Sequence[dict[str, float]], specs: Sequence[dict[str, Any]], *,
               mean: np.ndarray, std: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
               progress: bool = False, **fit: Any) -> dict[str, Any]:
        """Compare ``candidates`` and the linear probe; the record for head.json.

        With validation records (``X_val``/``y_val``, from ``--val``) every candidate is fitted on
        the training set and scored on them, and the probe's ``C`` is chosen on them too
        (``method: "validation"``); without, both are cross-validated on the training set's folds
        (grouped when every record has a group). When ``hidden`` is selected too (not given) and
        the probe's best score beats every head candidate's, the choice is
        ``{"model": "linear probe", "C": C}`` (the head then takes the probe's weights: a linear
        head that is exactly the probe).
        """
        X, y, groups = self._load()
        on_val = X_val is not None and y_val is not None and len(y_val) > 0
        names = ", ".join(candidates[0])
        if on_val:
            self.folds = None
            if progress:
                print(f"selection: choosing {names} among {len(candidates)} candidates and the linear probe: "
                      f"fitted on {len(y)} training records, scored on {len(y_val)} validation records",
                      file=sys.stderr, flush=True)
            result = validate(X, y, X_val, y_val, self.data.n_classes, candidates, specs, seed=self.seed,
                              progress=progress, **fit)
            self._probe = self.probe(mean, std, X_val, y_val)
            probe_key, head_best = "linear_probe_validation", max(s["validation"] for s in result["scores"])
        else:
            self.folds, method = cv_folds(y, groups, self.k, self.seed)
            if progress:
                print(f"cv: choosing {names} among {len(candidates)} candidates by "
                      f"{len(self.folds)}-fold cross-validation on {len(y)} records", file=sys.stderr, flush=True)
            result = cross_validate(X, y, self.data.n_classes, self.folds, candidates, specs, seed=self.seed,
                                    progress=progress, method=method, **fit)
            self._probe = self.probe(mean, std, None, None)
            probe_key, head_best = "linear_probe_cv", max(s["mean"] for s in result["scores"])
        best_probe = max((s["mean"] for s in self._probe[1].get("scores", [])), default=None)
        result[probe_key] = best_probe
        if (best_probe is not None and best_probe > head_best
                and all("hidden" in c for c in candidates)):  # only when hidden is not given
            result["choice"] = {"model": PROBE_CHOICE, "C": self._probe[1]["C"]}
            if progress:
                print(f"selection: linear probe {best_probe:.4f} beats every head candidate (best {head_best:.4f}): "
                      "the head takes the probe's weights", file=sys.stderr)
        return result

    def probe(self, mean: np.ndarray, std: np.ndarray, X_val: np.ndarray | None, y_val: np.ndarray | None):
        """(LinearProbe, head.json record) fitted on all training records; C tuned like the head
        (on the cross-validation folds when :meth:`select` used them, else on ``X_val``/``y_val``)."""
        from dfl_tf.heads.probe import fit_probe

        if getattr(self, "_probe", None) is not None:
            return self._probe
        if not self.data.in_memory:
            print("note: linear probe skipped: the training set is streamed (larger than cache_gb)",
                  file=sys.stderr)
            return None, {"skipped": "training set streamed (larger than cache_gb)"}
        X, y = self.arrays()
        return fit_probe(X, y, self.data.n_classes, mean, std, folds=self.folds, seed=self.seed,
                         X_val=X_val, y_val=y_val)
