"""orbax PyTree checkpoints: whole restores and the error handling that damaged ones need."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from subboost.errors import SubboostError
from subboost.tree import PyTree


def short_error(err: BaseException, limit: int = 300) -> str:
    """An exception's first line, without tensorstore's spec dump, at most ``limit`` characters."""
    text = str(err).split(" [tensorstore_spec=")[0].strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LOOP_NOISE = ("asyncio/base_events.py", "self._check_closed()", "raise RuntimeError('Event loop is closed')",
               "RuntimeError: Event loop is closed")


@contextlib.contextmanager
def quiet_event_loop_noise(grace: float = 0.5) -> Iterator[None]:
    """Drops the "Event loop is closed" tracebacks orbax's reader threads print after a failed restore.

    When tensorstore reports damaged data, orbax closes its event loop while other reads
    are still in flight; each then prints a traceback from its own thread. Output to
    stderr (the file descriptor and ``sys.stderr``) is collected while the block runs and,
    on an error, for ``grace`` seconds more; everything but those tracebacks is then
    written back, so a damaged checkpoint yields one clean error line.
    """
    import io
    import sys
    import tempfile

    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to keep clean
        yield
        return
    saved_stream = sys.stderr
    capture = tempfile.TemporaryFile(mode="w+b")
    buffer = io.StringIO()
    os.dup2(capture.fileno(), 2)
    sys.stderr = buffer
    try:
        yield
    except BaseException:
        time.sleep(grace)  # the in-flight reads finish and print now, into the capture
        raise
    finally:
        sys.stderr = saved_stream
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        capture.seek(0)
        text = capture.read().decode(errors="replace") + buffer.getvalue()
        capture.close()
        lines = text.splitlines(keepends=True)
        kept = []
        for i, line in enumerate(lines):
            if any(marker in line for marker in _LOOP_NOISE):
                continue
            if line.startswith("Traceback (most recent call last):") and i + 1 < len(lines) and \
                    _LOOP_NOISE[0] in lines[i + 1]:
                continue
            kept.append(line)
        if kept:
            saved_stream.write("".join(kept))
            saved_stream.flush()


def restore_orbax(path: Path) -> PyTree:
    """A whole orbax PyTree checkpoint as host numpy arrays; `SubboostError` naming the directory if damaged."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        with quiet_event_loop_noise():
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
