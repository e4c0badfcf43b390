"""Shared test helpers, one importable package (``from tests.helpers.emb_utils import ...``).

Modules: :mod:`.tiny` (generated image folders, the tiny backbone settings), :mod:`.emb_utils`
(synthetic embedding stores), :mod:`.slide_utils` (synthetic slides), :mod:`.hostile_utils` (CLI runs
that check one-line errors and untouched files), :mod:`.torch_resnet` and :mod:`.vit_refs` (PyTorch
references). Paths: :data:`REPO` (the repository root) and :data:`FIXTURES` (files the suite carries).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

#: The repository root (tests/helpers/ is two folders below it).
REPO = Path(__file__).resolve().parents[2]
#: Real files the suite carries (a small SVS, its DICOM copy, an old head directory): see its README.md.
FIXTURES = REPO / "tests" / "fixtures"


def import_script(folder: str, name: str) -> ModuleType:
    """Import ``REPO/folder/name.py``, a script that imports its neighbours by bare name
    (``benchmarks/``, ``tools/``): the folder is on ``sys.path`` while it and they are imported."""
    path = str(REPO / folder)
    sys.path.insert(0, path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(path)
