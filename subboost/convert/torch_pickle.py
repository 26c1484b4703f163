"""Reading PyTorch ``.pt`` files without executing their pickled code.

``torch.save`` files are pickles: unpickling may import and call *any* Python global the
file names (``os.system`` included). Task-vector codebases save whole modules
(``torch.save(image_encoder)``), whose classes (``src.modeling.ImageEncoder``,
``open_clip.model.CLIP``, ...) we neither have nor want to import. `load_torch_file` reads
such files with a restricted unpickler:

* a short allow-list of globals is real: torch's tensor / storage rebuild functions (through
  wrappers that accept only storages), ``collections.OrderedDict``, builtin containers, torch
  dtypes, ``torch.Size``, numpy array reconstruction;
* globals from modules that can reach the operating system or the interpreter (``os``,
  ``subprocess``, ``builtins`` beyond containers, ``importlib``, ``torch.jit``, ...) are
  refused on sight, naming the global;
* every other class becomes an inert stand-in: an object that only records the state the
  pickle gives it (an ``nn.Module``'s ``_parameters``, ``_buffers``, ``_modules``, ...);
* every other function becomes an inert reference that refuses to be *called* (naming the
  global): a transform referenced as an attribute loads, a pickle that calls it does not.

Nothing outside the allow-list is imported, so no code from the file runs. `state_dict`
then walks the loaded object like ``nn.Module.state_dict()`` and keeps only tensors.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from subboost.errors import SubboostError


class UnsafePickleError(SubboostError):
    """A pickle asked for a global that loading a checkpoint never needs."""


# Top-level modules whose globals are never needed by a checkpoint.
_DENIED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "builtins", "__builtin__", "shutil",
    "importlib", "runpy", "socket", "ctypes", "pickle", "_pickle", "marshal", "code", "codeop", "pty",
    "webbrowser", "multiprocessing", "signal", "types", "io", "_io", "pathlib", "tempfile", "operator",
    "inspect", "pdb", "timeit", "threading", "_thread", "asyncio", "platform", "glob", "zipimport",
    "pkgutil", "ssl", "urllib", "http", "requests", "ftplib", "smtplib", "telnetlib", "commands",
    "posixpath", "ntpath", "gc", "weakref", "ctypes", "cffi", "dill", "cloudpickle", "yaml", "sqlite3",
    "select", "fcntl", "resource", "atexit", "site", "sysconfig", "distutils", "setuptools", "pip",
    "venv", "ensurepip", "zipfile", "tarfile", "bz2", "gzip", "lzma", "pydoc", "trace", "traceback",
    "logging", "getpass", "pwd", "grp", "mmap", "readline", "rlcompleter", "xmlrpc", "concurrent", "eval",
})
_DENIED_PREFIXES = ("torch.jit", "torch._C", "torch.hub", "torch.package", "torch.ops", "torch.classes",
                    "torch.serialization", "torch.distributed", "torch.multiprocessing", "torch.utils.cpp_extension",
                    "torch._dynamo", "torch.fx", "torch.compiler", "numpy.ctypeslib", "numpy.lib.npyio")
# Builtins that are plain data constructors.
_BUILTIN_CONTAINERS = {name: getattr(__import__("builtins"), name) for name in (
    "set", "frozenset", "dict", "list", "tuple", "complex", "slice", "object")}
# Lower-case names that are classes (stand-ins instead of refused references).
_LOWERCASE_CLASSES = frozenset({"functools.partial", "collections.defaultdict", "collections.deque"})


def _module_denied(module: str) -> bool:
    return module.split(".")[0] in _DENIED_MODULES or any(
        module == p or module.startswith(p + ".") for p in _DENIED_PREFIXES
    )


# ----------------------------------------------------------------------------
# Stand-ins
# ----------------------------------------------------------------------------
class _StandInMeta(type):
    def __call__(cls, *args, **kwargs):
        # A pickle calling a class (REDUCE), e.g. an Enum member lookup: record, run nothing.
        obj = cls.__new__(cls)
        obj._subboost_args = args
        return obj

    def __repr__(cls):
        return f"<stand-in for {cls._subboost_global}>"


class StandIn(metaclass=_StandInMeta):
    """An instance of a class the checkpoint names but we do not import: state only."""

    _subboost_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_subboost_state", {})
        object.__setattr__(obj, "_subboost_items", [])
        return obj

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict state, slot state)
        object.__setattr__(self, "_subboost_state", state if isinstance(state, dict) else {"__state__": state})

    # dict / list subclasses are filled through SETITEMS / APPENDS
    def __setitem__(self, key, value):
        self._subboost_items.append((key, value))

    def append(self, value):
        self._subboost_items.append((len(self._subboost_items), value))

    def extend(self, values):
        for value in values:
            self.append(value)

    @property
    def class_name(self) -> str:
        return type(self)._subboost_global

    def __repr__(self):
        return f"<stand-in {self.class_name}>"


class RefusedCallable:
    """A function the checkpoint references: inert as data, refused when the pickle calls it."""

    def __init__(self, name: str, source: str):
        self.name, self.source = name, source

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(
            f"{self.source}: the pickle calls {self.name}, which is not a tensor or container constructor; "
            "refusing to load it (a checkpoint never needs to run code)."
        )

    def __repr__(self):
        return f"<reference to {self.name}>"


def _stand_in_class(qualified: str) -> type:
    return _StandInMeta(qualified.rsplit(".", 1)[-1], (StandIn,), {"_subboost_global": qualified})


# ----------------------------------------------------------------------------
# Allowed torch / numpy globals (wrappers that check their inputs)
# ----------------------------------------------------------------------------
def _torch_allowed() -> dict[str, Any]:
    import torch
    import torch._utils as tu

    def check_storage(storage):
        if not isinstance(storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)):
            raise UnsafePickleError(f"tensor rebuild got a {type(storage).__name__} instead of a storage.")

    def rebuild_tensor(storage, storage_offset, size, stride, *_):
        check_storage(storage)
        return tu._rebuild_tensor(storage, storage_offset, size, stride)

    def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *_):
        check_storage(storage)
        return tu._rebuild_tensor_v3(storage, storage_offset, size, stride, False, collections.OrderedDict(), dtype)

    def rebuild_parameter(data, *_):
        if not isinstance(data, torch.Tensor):
            raise UnsafePickleError(f"parameter rebuild got a {type(data).__name__} instead of a tensor.")
        return data.detach()

    def rebuild_from_type_v2(func, new_type, args, state):
        if func not in allowed.values():
            raise UnsafePickleError(f"tensor-subclass rebuild asks to call {func!r}.")
        return func(*args)

    allowed = {
        "torch._utils._rebuild_tensor": rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
    }
    return allowed


def _numpy_allowed() -> dict[str, Any]:
    def reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray:
            raise UnsafePickleError(f"numpy array reconstruction asks for subtype {subtype!r}.")
        # numpy pickles pass shape (0,) and fill the array in BUILD (``__setstate__``); never allocate
        # a shape the file chooses here.
        return np.ndarray.__new__(np.ndarray, (0,), dtype)

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or (data is not None and not isinstance(data, bytes)):
            raise UnsafePickleError("numpy scalar reconstruction got unexpected arguments.")
        return np.frombuffer(data, dtype)[0] if data is not None else dtype.type()

    allowed = {"ndarray": np.ndarray, "dtype": np.dtype, "_reconstruct": reconstruct, "scalar": scalar}
    return {f"{mod}.{name}": obj for mod in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy")
            for name, obj in allowed.items()}


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` for protocol 0/1 pickles, limited to stand-ins."""
    if isinstance(cls, type) and issubclass(cls, StandIn):
        obj = cls.__new__(cls)
        if state is not None:
            obj._subboost_args = (state,)
        return obj
    raise UnsafePickleError(f"copyreg._reconstructor asked to build {cls!r}.")


def _encode(text, encoding="latin1"):
    """``_codecs.encode``: how protocol-2 pickles store ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode called with unexpected arguments.")
    return text.encode("latin1")


def make_pickle_module(source: str) -> types.ModuleType:
    """A ``pickle``-like module (``Unpickler``, ``load``) for ``torch.load(pickle_module=...)``."""
    import torch

    allowed = {
        **_torch_allowed(),
        **_numpy_allowed(),
        "collections.OrderedDict": collections.OrderedDict,
        "copyreg._reconstructor": _reconstructor,
        "_codecs.encode": _encode,
        **{f"builtins.{k}": v for k, v in _BUILTIN_CONTAINERS.items()},
        **{f"__builtin__.{k}": v for k, v in _BUILTIN_CONTAINERS.items()},
    }
    stand_ins: dict[str, Any] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            qualified = f"{module}.{name}"
            if qualified in allowed:
                return allowed[qualified]
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            if module in ("torch", "torch.storage") and name.endswith("Storage") and name.isidentifier():
                storage = getattr(torch, name, None)
                if isinstance(storage, type) and issubclass(
                    storage, (torch.storage.TypedStorage, torch.storage.UntypedStorage)
                ):
                    return storage
            if _module_denied(module):
                raise UnsafePickleError(
                    f"{source}: the pickle asks for the global {qualified}; refusing to load it "
                    "(only tensors, containers and inert stand-ins for model classes are allowed)."
                )
            if qualified not in stand_ins:
                leaf = name.rsplit(".", 1)[-1].lstrip("_")
                is_class = qualified in _LOWERCASE_CLASSES or (leaf[:1].isupper())
                stand_ins[qualified] = _stand_in_class(qualified) if is_class else RefusedCallable(qualified, source)
            return stand_ins[qualified]

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("subboost_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = load
    module.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return module


def _refuse_torchscript(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return  # torch.load reports the damage
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        raise SubboostError(
            f"{path}: a TorchScript archive (torch.jit.save); these contain code and are not loaded. "
            "Save the model's state_dict() (or the module with torch.save) instead."
        )


def load_torch_file(path: str | os.PathLike) -> Any:
    """Loads a ``torch.save`` file with the restricted unpickler (see the module docstring).

    Raises:
      FileNotFoundError: no such file.
      UnsafePickleError: the pickle names a refused global (the message names it).
      SubboostError: the file is not a readable PyTorch checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist.")
    if not path.is_file():
        raise SubboostError(f"{path}: not a regular file (a directory, FIFO, socket or device?).")
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the install
        raise SubboostError(
            "reading PyTorch checkpoints needs torch: pip install 'subboost[convert]' (or any torch>=2.1 CPU build)."
        ) from err
    _refuse_torchscript(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=make_pickle_module(str(path)))
    except UnsafePickleError:
        raise
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError ... for damaged files
        raise SubboostError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
        ) from err


# ----------------------------------------------------------------------------
# From a loaded object to a flat {name: tensor} dict
# ----------------------------------------------------------------------------
def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _module_like(obj: Any) -> bool:
    return isinstance(obj, StandIn) and isinstance(obj._subboost_state.get("_modules"), dict)


def _module_tensors(obj: StandIn, prefix: str, parents: tuple[int, ...] = ()) -> Iterator[tuple[str, Any]]:
    if id(obj) in parents:
        raise SubboostError(f"submodule {prefix.rstrip('.')!r} contains itself (a cyclic module graph).")
    parents = (*parents, id(obj))
    state = obj._subboost_state
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            yield prefix + name, value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            yield prefix + name, value
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not _module_like(child):
            raise SubboostError(f"submodule {prefix + name!r} is a {type(child).__name__}, not a module.")
        yield from _module_tensors(child, prefix + name + ".", parents)


def _container_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if _is_tensor(obj):
        yield prefix.rstrip("."), obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _container_tensors(value, f"{prefix}{key}.")
    elif _module_like(obj):
        yield from _module_tensors(obj, prefix)


def state_dict(obj: Any, *, source: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """``({name: tensor}, what)`` from a loaded object, with ``nn.Module.state_dict()`` names.

    ``obj`` is a state dict, a dict wrapping one (``{"state_dict": ..., "epoch": 3}``: the
    names get the wrapper's prefix) or a stand-in ``nn.Module``. ``what`` describes ``obj``
    for messages (``"state_dict"`` or ``"pickled module src.modeling.ImageEncoder"``).
    """
    if _module_like(obj):
        what = f"pickled module {obj.class_name}"
        try:
            tensors = list(_module_tensors(obj, ""))
        except SubboostError as err:
            raise SubboostError(f"{source}: {err}") from err
        except RecursionError as err:
            raise SubboostError(f"{source}: the {what} nests too deeply (or contains itself).") from err
    elif isinstance(obj, dict):
        what = "state_dict"
        try:
            tensors = list(_container_tensors(obj, ""))
        except RecursionError as err:
            raise SubboostError(f"{source}: the state_dict nests too deeply (or contains itself).") from err
    else:
        kind = obj.class_name if isinstance(obj, StandIn) else type(obj).__name__
        raise SubboostError(f"{source}: holds a {kind}, neither a state_dict nor a pickled torch.nn.Module.")
    if not tensors:
        raise SubboostError(f"{source}: the {what} holds no tensors.")
    out: dict[str, Any] = {}
    for name, tensor in tensors:
        if not _is_tensor(tensor):
            raise SubboostError(f"{source}: {name!r} should be a tensor but is a {type(tensor).__name__}.")
        if name in out:
            raise SubboostError(f"{source}: tensor name {name!r} occurs twice.")
        out[name] = tensor
    return out, what


def find_modules(obj: Any, class_suffix: str, _seen: set[int] | None = None) -> list[StandIn]:
    """Stand-in modules under ``obj`` whose class name ends with ``class_suffix`` (depth first, each once)."""
    seen = set() if _seen is None else _seen
    found = []
    if _module_like(obj) and id(obj) not in seen:
        seen.add(id(obj))
        if obj.class_name.rsplit(".", 1)[-1] == class_suffix:
            found.append(obj)
        for child in obj._subboost_state["_modules"].values():
            found.extend(find_modules(child, class_suffix, seen))
    return found


def module_attribute(obj: StandIn, name: str, default: Any = None) -> Any:
    """A plain attribute of a stand-in module (``num_heads``, ``normalize``, ...)."""
    return obj._subboost_state.get(name, default)


def to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a numpy array of the same dtype (bfloat16 via ml_dtypes)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
