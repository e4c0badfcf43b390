"""The stain target of an extraction: fitted once (NumPy) from an image or read from a stored fit.

:func:`stain_record` gives what the read plan records under ``stain`` (and so the manifest's
geometry, head.json and export.json): ``{"normalize": <fitted dict>}``, the method and its fitted
parameters, from which extraction and the exported graph rebuild the same computation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dfl_tf.errors import DflError
from dfl_tf.stain.normalize import fit_target, load_params


def fit_or_load(target: str | Path, method: str) -> dict[str, Any]:
    """``method`` fitted on the image at ``target``, or a fit stored as JSON (``fit_target``'s dict)
    there; a stored fit of another method is refused naming the file."""
    path = Path(target)
    if not path.is_file():
        raise DflError(f"stain target {target}: no such file")
    if path.suffix.lower() == ".json":
        params = load_params(path)
        if params["method"] != method:
            raise DflError(f"stain target {target}: a stored {params['method']} fit, not {method} "
                           f"(--stain-norm {params['method']}, or fit the image again)")
        return params
    return fit_target(path, method)


def stain_record(method: str | None, target: str | Path | None) -> dict[str, Any] | None:
    """The read plan's ``stain`` field for ``--stain-norm METHOD --stain-target TARGET`` (None: raw pixels)."""
    if method is None:
        return None
    if target is None:
        raise DflError(f"--stain-norm {method} needs --stain-target (an H&E image, or a stored fit as JSON)")
    return {"normalize": fit_or_load(target, method)}
