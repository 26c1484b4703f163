"""The one exception type for bad input, in a module of its own so every other module can import it."""


class SubboostError(ValueError):
    """Bad input to a subboost function (a `ValueError`, so callers may catch either)."""


def format_names(names, *, limit: int = 5) -> str:
    """``['a', 'b', ...]`` cut to the first ``limit`` names plus ``"... and N more"``: error lines stay short."""
    names = [str(n) for n in names]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return f"[{shown}]" if more <= 0 else f"[{shown}, ... and {more} more]"
