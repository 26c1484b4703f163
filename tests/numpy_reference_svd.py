"""Independent numpy implementations of TSV-M, Iso-C, Iso-CTS and LiNeS, from REFERENCE.md.

Written the way the reference PyTorch code is: one matrix at a time, a Python
loop over tasks, zero-padded ``(m, s)`` / ``(s, n)`` buffers for the
concatenated singular vectors, float64 throughout. Trees are flat dicts
``{path: np.ndarray}`` (see `tests.numpy_reference.flat`).
"""

from __future__ import annotations

import re

import numpy as np

from tests.numpy_reference import from_torch_matrix, is_default_matrix, torch_matrix


def polar(x: np.ndarray) -> np.ndarray:
    """P Q^T of x = P S Q^T."""
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def tsv_matrix(mats: list[np.ndarray]) -> np.ndarray:
    num_tasks = len(mats)
    m, n = mats[0].shape
    s = min(m, n)
    r = s // num_tasks
    u_all, s_all, v_all = np.zeros((m, s)), np.zeros(s), np.zeros((s, n))
    for t, w in enumerate(mats):
        u, sv, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
        u_all[:, t * r:(t + 1) * r] = u[:, :r]
        s_all[t * r:(t + 1) * r] = sv[:r]
        v_all[t * r:(t + 1) * r, :] = vt[:r, :]
    return polar(u_all) @ np.diag(s_all) @ polar(v_all)


def iso_c_matrix(mats: list[np.ndarray]) -> np.ndarray:
    total = sum(np.asarray(w, np.float64) for w in mats)
    u, sv, vt = np.linalg.svd(total, full_matrices=False)
    return u @ np.diag(np.full_like(sv, sv.mean())) @ vt


def iso_cts_matrix(mats: list[np.ndarray], fraction: float = 0.8) -> np.ndarray:
    num_tasks = len(mats)
    mats = [np.asarray(w, np.float64) for w in mats]
    m, n = mats[0].shape
    s = min(m, n)
    common = int(s * fraction)
    specific_total = round((s - common) / num_tasks) * num_tasks
    common = s - specific_total
    per_task = int((s - common) / num_tasks)
    u, sv, vt = np.linalg.svd(sum(mats), full_matrices=False)
    u_c, s_c, vt_c = u[:, :common], sv[:common], vt[:common, :]
    u_all, s_all, v_all = np.zeros((m, s)), np.zeros(s), np.zeros((s, n))
    for t, w in enumerate(mats):
        w_ts = w - u_c @ u_c.T @ w
        ut, st, vtt = np.linalg.svd(w_ts, full_matrices=False)
        u_all[:, t * per_task:(t + 1) * per_task] = ut[:, :per_task]
        s_all[t * per_task:(t + 1) * per_task] = st[:per_task]
        v_all[t * per_task:(t + 1) * per_task, :] = vtt[:per_task, :]
    start = num_tasks * per_task
    u_all[:, start:start + common] = u_c
    s_all[start:start + common] = s_c
    v_all[start:start + common, :] = vt_c
    return polar(u_all) @ np.diag(np.full(s, s_all.mean())) @ polar(v_all)


MATRIX_MERGES = {"tsv": tsv_matrix, "iso_c": iso_c_matrix, "iso_cts": iso_cts_matrix}


def merge_tree(tvs: list[dict], method: str, **kwargs) -> dict:
    """Per-parameter loop: default matrices (per_qkv attention) merged as PyTorch (out, in), others averaged."""
    out = {}
    for path, first in tvs[0].items():
        if is_default_matrix(path, first.shape):
            mats = [torch_matrix(path, t[path]) for t in tvs]
            merged = MATRIX_MERGES[method](mats, **kwargs)
            out[path] = from_torch_matrix(path, merged, first.shape)
        else:
            out[path] = np.mean([t[path] for t in tvs], axis=0)
    return out


def lines_tree(tau: dict, alpha: float, beta: float, pattern: str = r"resblocks_(\d+)",
               num_blocks: int | None = None, non_block_scale: float | None = None) -> dict:
    blocks = {}
    for path in tau:
        match = re.search(pattern, path)
        blocks[path] = int(match.group(1)) if match else None
    if num_blocks is None:
        num_blocks = 1 + max(b for b in blocks.values() if b is not None)
    other = alpha if non_block_scale is None else non_block_scale
    out = {}
    for path, x in tau.items():
        b = blocks[path]
        scale = other if b is None else alpha + beta * b / max(num_blocks - 1, 1)
        out[path] = x * scale
    return out
