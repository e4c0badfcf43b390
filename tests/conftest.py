"""Shared fixtures: tiny generated image sets; TensorFlow kept quiet and on few threads.
Helpers that tests import live in ``tests/helpers/`` (a fixture module is not imported by tests)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers.tiny import write_images  # noqa: E402  (registers the tiny_test backbone)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("imgs") / "folder")
