"""Independent numpy implementations written from REFERENCE.md, for cross-checks.

They work on flat dicts ``{path: np.ndarray}`` and loop over parameters and
matrices one at a time, the way the reference PyTorch code does.
"""

from __future__ import annotations

import numpy as np


def ta(tvs: list[dict]) -> dict:
    return {k: sum(t[k] for t in tvs) for k in tvs[0]}


def ties(tvs: list[dict], k: float = 0.2, merge: str = "mean") -> dict:
    keys = list(tvs[0])
    flat = np.stack([np.concatenate([t[key].ravel() for key in keys]) for t in tvs])  # (T, N)
    n = flat.shape[1]
    kk = n - int(n * k)
    trimmed = flat.copy()
    if kk >= 1:
        for t in range(len(tvs)):
            thr = np.sort(np.abs(flat[t]))[kk - 1]
            trimmed[t] = np.where(np.abs(flat[t]) >= thr, flat[t], 0.0)
    signs = np.sign(trimmed.sum(0))
    signs[signs == 0] = np.sign(signs.sum())
    agree = np.where(signs > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agree
    if merge == "sum":
        merged = selected.sum(0)
    else:
        merged = selected.sum(0) / np.maximum((selected != 0).sum(0), 1)
    out, start = {}, 0
    for key in keys:
        size = tvs[0][key].size
        out[key] = merged[start:start + size].reshape(tvs[0][key].shape)
        start += size
    return out


def consensus(tvs: list[dict], lambdas, k: int = 2, base_merged: dict | None = None) -> dict:
    total = ta(tvs)
    lambdas = np.broadcast_to(np.asarray(lambdas, float), (len(tvs),))
    merged = total if base_merged is None else base_merged
    out = {}
    for key in tvs[0]:
        count = sum((np.abs(t[key]) > lam * np.abs(total[key] - t[key])).astype(int) for t, lam in zip(tvs, lambdas))
        out[key] = np.where(count >= k, merged[key], 0.0)
    return out


def boost_matrix(mat: np.ndarray, beta: float, mode: str = "cumsum") -> np.ndarray:
    u, s, vh = np.linalg.svd(mat.astype(np.float64), full_matrices=False)
    if mode == "cumsum":
        total = s.sum()
        if total == 0:
            return np.zeros_like(mat)
        frac = np.cumsum(s) / total
        hits = np.nonzero(frac >= beta)[0]
        k = int(hits[0]) if len(hits) else len(s) - 1
    else:
        k = min(int(np.floor(beta * len(s))), len(s) - 1)
    s2 = np.maximum(s, s[k])
    return (u * s2) @ vh


def stable_rank(mat: np.ndarray) -> float:
    s = np.linalg.svd(mat, compute_uv=False)
    return float((s**2).sum() / s[0] ** 2)


def energy_rank(mat: np.ndarray, fraction: float = 0.95) -> int:
    s = np.linalg.svd(mat, compute_uv=False) ** 2
    cum = np.cumsum(s)
    return int(np.nonzero(cum >= fraction * s.sum())[0][0] + 1)


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested dict -> {"a/b/c": np.ndarray}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat(value, path))
        else:
            out[path] = np.asarray(value, np.float64)
    return out


def torch_matrix(path: str, kernel: np.ndarray) -> np.ndarray:
    """A Flax kernel as the PyTorch (out, in) matrix (per_qkv attention)."""
    parent = path.split("/")[-2]
    if parent in ("query", "key", "value") and kernel.ndim == 3:
        return kernel.reshape(kernel.shape[0], -1).T
    if parent == "out" and kernel.ndim == 3:
        return kernel.reshape(-1, kernel.shape[-1]).T
    return kernel.T


def from_torch_matrix(path: str, mat: np.ndarray, shape) -> np.ndarray:
    return mat.T.reshape(shape)


def is_default_matrix(path: str, shape) -> bool:
    parts = path.split("/")
    if parts[-1] != "kernel" or {"proj", "head", "visual_projection", "pre_logits", "output_projection"} & set(parts[:-1]):
        return False
    parent = parts[-2]
    if parent in ("query", "key", "value", "out"):
        return len(shape) in (2, 3)
    return len(shape) == 2
