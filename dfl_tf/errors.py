"""Errors that the CLI turns into a one-line message and a non-zero exit."""


class DflError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible artefact."""


def whole_number(name: str, value: object, low: int = 1) -> int:
    """``value`` as an int of at least ``low``; a DflError naming ``name`` (e.g. ``--batch-size``) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DflError(f"{name} must be a whole number of at least {low} (got {value!r})")
    try:
        number = int(value)
    except ValueError:
        raise DflError(f"{name} must be a whole number of at least {low} (got {value!r})") from None
    if number < low or number != float(value):
        raise DflError(f"{name} must be a whole number of at least {low} (got {value})")
    return number
