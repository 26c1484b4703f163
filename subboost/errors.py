"""The one exception type for bad input, in a module of its own so every other module can import it."""


class SubboostError(ValueError):
    """Bad input to a subboost function (a `ValueError`, so callers may catch either)."""
