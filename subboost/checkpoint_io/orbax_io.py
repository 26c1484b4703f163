"""orbax PyTree checkpoints: whole restores and the error handling that damaged ones need."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from subboost.errors import SubboostError
from subboost.tree import PyTree


def short_error(err: BaseException, limit: int = 300) -> str:
    """An exception's first line, without tensorstore's spec dump, at most ``limit`` characters."""
    text = str(err).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOOP_CLOSED = "Event loop is closed"
_ORPHANED_READ_REPORTS = ("Task exception was never retrieved", "unhandled exception during asyncio.run() shutdown")
_damaged_checkpoints: set[str] = set()  # absolute paths whose restore failed in this process


def _is_loop_closed_noise(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == _LOOP_CLOSED


def _names_a_damaged_checkpoint(err: BaseException | None) -> bool:
    text = str(err) if err is not None else ""
    return any(path in text for path in _damaged_checkpoints)


class _OrphanedReadFilter(logging.Filter):
    """Drops asyncio's reports of sibling reads of a checkpoint whose failure was already raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_ORPHANED_READ_REPORTS):
            return True
        err = record.exc_info[1] if record.exc_info else None
        return not _names_a_damaged_checkpoint(err)


def _install_noise_filters() -> None:
    """Process-wide, once: drop the two kinds of noise a failed orbax restore leaves behind.

    When tensorstore reports damaged data, orbax stops its event loop while sibling reads
    are still in flight, in tensorstore's own threads. Each late read then
      * calls ``loop.call_soon_threadsafe`` on the closed loop; the ``RuntimeError("Event loop
        is closed")`` cannot be raised anywhere, so Python reports it through
        ``sys.unraisablehook``, as a traceback on stderr;
      * or leaves an asyncio task whose exception nobody retrieves; asyncio logs it (logger
        ``asyncio``) with a traceback when the task is collected.
    Both arrive at unpredictable times, possibly after the restore has returned, so a time
    window on stderr cannot catch them reliably. Hooks can: the first drops exactly that
    unraisable ``RuntimeError``, the second only reports whose exception names a checkpoint
    whose restore already failed (and was raised as a `SubboostError`). Everything else is
    passed on unchanged to the hooks and handlers that were there before.
    """
    if not getattr(sys.unraisablehook, "_subboost_drops_loop_closed", False):
        previous = sys.unraisablehook

        def unraisablehook(unraisable: Any) -> None:
            if not _is_loop_closed_noise(unraisable.exc_value):
                previous(unraisable)

        unraisablehook._subboost_drops_loop_closed = True  # type: ignore[attr-defined]
        sys.unraisablehook = unraisablehook
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedReadFilter) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_OrphanedReadFilter())


@contextlib.contextmanager
def quiet_event_loop_noise(path: str | os.PathLike) -> Iterator[None]:
    """Runs an orbax restore of ``path`` so that, if it fails, only the raised error is reported.

    Installs `_install_noise_filters` (see there for the why). On an error, ``path`` is
    recorded as damaged and orphaned asyncio tasks are collected now, so their reports are
    filtered while the caller handles the error rather than at some later collection.
    """
    _install_noise_filters()
    try:
        yield
    except BaseException:
        _damaged_checkpoints.update({str(Path(path).absolute()), str(Path(path).resolve())})
        gc.collect()
        raise


def restore_orbax(path: Path) -> PyTree:
    """A whole orbax PyTree checkpoint as host numpy arrays; `SubboostError` naming the directory if damaged."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with quiet_event_loop_noise(path):
            metadata = checkpointer.metadata(path.absolute())
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            # Restore as host numpy: works on any machine, whatever devices / sharding it was saved from.
            restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            return checkpointer.restore(path.absolute(), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as err:  # orbax / tensorstore raise many types for a damaged directory
        raise SubboostError(
            f"{path}: cannot restore the orbax checkpoint ({type(err).__name__}: {short_error(err)}); "
            "the checkpoint is damaged or incomplete."
        ) from err
    finally:
        if hasattr(checkpointer, "close"):
            checkpointer.close()


__all__ = ["quiet_event_loop_noise", "restore_orbax", "short_error"]
