"""Train/validation splits shared by backbone selection and fine-tuning, and the k-fold
cross-validation folds of head selection and the linear probe (:func:`cv_folds`).

A ``split`` column of a CSV source wins (``train`` and ``val``/``valid``/``validation`` rows;
others, e.g. ``test``, are left out); else the split is stratified and grouped by ``group`` when
samples have groups (no patient or slide in both parts); else stratified. Seeded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dfl_tf.errors import DflError

VAL_NAMES = {"val", "valid", "validation"}
DEFAULT_FOLDS = 5


def split_samples(dataset: str | Path, samples, val_fraction: float = 0.25, seed: int = 0
                  ) -> tuple[list[str], list[str], dict[str, Any]]:
    """(train ids, validation ids, description) of the labeled samples of ``samples``."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

    if not 0.0 < float(val_fraction) < 1.0:
        raise DflError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labeled = [(i, s) for i, s in enumerate(samples.samples) if s.label >= 0]
    if len(labeled) < 4:
        raise DflError(f"{dataset}: {len(labeled)} labeled samples; selection needs at least 4")
    ids = [s.id for _, s in labeled]
    if len(set(ids)) != len(ids):
        raise DflError(f"{dataset}: sample ids are not unique (give the CSV an 'id' column)")
    y = np.array([s.label for _, s in labeled])
    if any(s.split for _, s in labeled):
        parts = [(s.split or "").strip().lower() for _, s in labeled]
        train = [i for i, p in zip(ids, parts) if p == "train"]
        val = [i for i, p in zip(ids, parts) if p in VAL_NAMES]
        if not train or not val:
            raise DflError(f"{dataset}: the 'split' column needs 'train' and 'val' rows (labeled); found "
                           f"{sorted(set(parts))}")
        how = {"method": "split column", "left_out": len(ids) - len(train) - len(val)}
    else:
        idx = np.arange(len(ids))
        groups = [s.group for _, s in labeled]
        if any(g for g in groups):
            g = np.array([gr or f"__sample__{sid}" for gr, sid in zip(groups, ids)])
            n_splits = max(2, int(round(1.0 / float(val_fraction))))
            try:
                cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                tr, va = next(cv.split(idx, y, g))
                how = {"method": "stratified group k-fold (first fold)", "n_splits": n_splits}
            except ValueError:
                cv = GroupShuffleSplit(n_splits=1, test_size=float(val_fraction), random_state=seed)
                tr, va = next(cv.split(idx, y, g))
                how = {"method": "group shuffle split"}
            how["groups"] = int(len(set(g)))
        else:
            try:
                tr, va = train_test_split(idx, test_size=float(val_fraction), stratify=y, random_state=seed)
                how = {"method": "stratified"}
            except ValueError:
                tr, va = train_test_split(idx, test_size=float(val_fraction), random_state=seed)
                how = {"method": "random (a class is too small to stratify)"}
        train, val = [ids[i] for i in sorted(tr)], [ids[i] for i in sorted(va)]
        if not train or not val:
            raise DflError(f"{dataset}: the split left an empty train or validation part")
    how.update({"val_fraction": float(val_fraction), "seed": int(seed), "train": len(train), "val": len(val)})
    return train, val, how


def cv_folds(y: np.ndarray, groups: Sequence[str | None] | None = None, k: int = DEFAULT_FOLDS,
             seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """``([(train_idx, val_idx)] * k', method)``: stratified k-fold, grouped when groups are known.

    ``k'`` is ``k`` reduced to what the data allows (the number of groups, the largest class
    count); with a single group, or when grouped folds would leave a class that a validation part
    holds out of its training part (class-pure groups: that fold could only score 0 on it), the
    folds are stratified only (``method`` says so); at least 2 folds are needed, else
    :class:`DflError`. Deterministic in ``seed``.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(y)
    counts = np.bincount(y)
    counts = counts[counts > 0]
    k_stratified = min(int(k), int(counts.max()))  # folds without groups
    use_groups = groups is not None and len(groups) == len(y) and all(g not in (None, "") for g in groups)
    if use_groups:
        codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
        k_eff = min(k_stratified, int(codes.max()) + 1)
        method = f"{k_eff}-fold stratified, grouped by group ({int(codes.max()) + 1} groups)"
        if k_eff < 2 and k_stratified >= 2:  # one group (e.g. every tile from one slide): folds cannot be grouped
            use_groups = False
            k_eff = k_stratified
            method = f"{k_eff}-fold stratified, not grouped (only {int(codes.max()) + 1} group)"
    else:
        k_eff = k_stratified
        method = f"{k_eff}-fold stratified"
    if k_eff < 2:
        raise DflError(f"cross-validation needs at least 2 folds; the data allow {k_eff} "
                       f"({'groups' if use_groups else 'records per class'} too few)")
    def split(n_splits: int, grouped: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits"
            if grouped:
                pairs = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed)).split(
                    np.zeros(len(y)), y, codes)
            else:
                pairs = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=int(seed)).split(
                    np.zeros(len(y)), y)
            return [(np.sort(a).astype(np.int64), np.sort(b).astype(np.int64)) for a, b in pairs if len(b)]

    folds = split(k_eff, use_groups)
    if use_groups and any(set(np.unique(y[b])) - set(np.unique(y[a])) for a, b in folds):
        # class-pure groups (e.g. one annotated region per class): a fold would score a class its
        # training part never saw, so every candidate scores ~0 and the choice is arbitrary
        k_eff = k_stratified
        folds = split(k_eff, grouped=False)
        method = (f"{k_eff}-fold stratified, not grouped (grouped folds would leave a class out of a "
                  f"training part: the {int(codes.max()) + 1} groups are too few or too class-pure)")
    return folds, method
