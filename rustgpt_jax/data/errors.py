"""The data layer's error type."""


class DataError(ValueError):
    """Bad data input: a missing path, an empty file, a malformed record, a bad option.

    A `ValueError` subclass (DESIGN.md: bad input raises ValueError naming the file,
    line or offset), so callers may catch either.
    """
