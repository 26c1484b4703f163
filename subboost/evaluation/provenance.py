"""What code produced a result: package and library versions, and the git commit of a checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

__all__ = ["code_version"]


def code_version() -> dict[str, Any]:
    """What code produced a result: package version, git commit (if run from a checkout), library versions."""
    import flax
    import jax

    import subboost

    version: dict[str, Any] = {"subboost": subboost.__version__, "jax": jax.__version__, "flax": flax.__version__,
                               "git_sha": None, "git_dirty": None}
    repo = Path(subboost.__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        version.update(git_sha=sha or None, git_dirty=bool(status.strip()))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed package): the package version identifies it
    return version
