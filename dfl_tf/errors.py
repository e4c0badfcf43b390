"""Errors that the CLI turns into a one-line message and a non-zero exit."""


class DflError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible artefact."""
