"""Parameter paths, the matrix predicate, and the grouped matrix view of a pytree.

Every SVD-based step in subboost (boosting, TSV-M, Iso-C/CTS, HO-GSVD, spectra)
sees a parameter pytree through one lens: the *matrix view*. Matrix leaves are
selected by a predicate on ``(path, leaf)``, reshaped to PyTorch orientation
``(out, in)``, grouped by ``(rows, cols, dtype)`` and stacked, so that one batched
kernel runs per group instead of one Python-level call per layer.

Group arrays have shape ``(G, *lead, m, n)``: ``G`` counts the matrices of the
group (layers, scan-stacked layers, heads), ``lead`` are leading axes every leaf
carries (the expert axis ``T`` of stacked task vectors, for instance).

The plan is computed from shapes only, so it runs at trace time inside ``jit``
and costs nothing at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from subboost import linalg
from subboost.errors import SubboostError

PyTree = Any
GroupKey = tuple[int, int, str]  # (rows, cols, dtype name)
GroupKernel = Callable[[jax.Array], Any]  # (B, *lead, m, n) -> pytree of (B, ...) arrays
AttentionMode = Literal["per_qkv", "full", "per_head"]
ATTENTION_MODES: tuple[str, ...] = ("per_qkv", "full", "per_head")

# Final projections / classifiers are not merged as matrices (REFERENCE.md).
EXCLUDED_MODULES: frozenset[str] = frozenset(
    {"proj", "visual_projection", "head", "pre_logits", "output_projection"}
)
ATTENTION_IN_NAMES: frozenset[str] = frozenset({"query", "key", "value"})
ATTENTION_OUT_NAMES: frozenset[str] = frozenset({"out"})


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------
def key_name(key: Any) -> str:
    """Readable name of one `jax.tree_util` path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """`jax.tree_util` key path -> ``"a/b/c"``.

    A trailing ``.value`` attribute (how `flax.nnx` Variables flatten) is
    dropped, so an ``nnx.State`` reads ``"block/fc/kernel"`` like a linen tree.
    """
    path = list(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return "/".join(key_name(k) for k in path)


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """Flattened ``(path string, leaf)`` pairs in `jax.tree_util` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(p), leaf) for p, leaf in flat]


# ----------------------------------------------------------------------------
# The matrix predicate
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatrixLayout:
    """How one leaf is read as a batch of ``(out, in)`` matrices.

    Attributes:
      kind: ``"dense"`` for a kernel ``(*layer, in, out)``; ``"matrix"`` for a
        leaf that already is a ``(*layer, rows, cols)`` matrix in the orientation
        the reference code uses (open_clip's ``proj`` and
        ``positional_embedding``, read as stored); ``"attn_in"`` for a
        query/key/value kernel ``(*layer, embed, heads, head_dim)``;
        ``"attn_out"`` for an output kernel ``(*layer, heads, head_dim, embed)``;
        ``"qkv_rows"`` for a PyTorch-layout query/key/value weight
        ``(*layer, fused * heads * head_dim, embed)`` (Hugging Face's ``q_proj``,
        or GPT-2's fused ``c_attn`` with ``fused=3``); ``"out_cols"`` for a
        PyTorch-layout attention output weight ``(*layer, embed, heads * head_dim)``.
      layer_axes: number of leading scan-stacked layer axes (big_vision style);
        they become batch axes of the group.
      heads: ``qkv_rows`` / ``out_cols``: the heads along the rows / columns
        (``0``: unknown, and ``attention="per_head"`` is refused).
      transposed: ``qkv_rows`` / ``out_cols``: the leaf is stored ``(in, out)``
        (GPT-2's ``Conv1D``) and read transposed.
      fused: ``qkv_rows``: q, k and v stacked along the rows of one leaf (3 for
        GPT-2's ``c_attn``); ``attention="per_qkv"`` splits them.
      qkv_block: ``qkv_rows``: siblings with the same non-empty key are one
        attention block's q, k, v, stacked (in ``qkv_role`` order) by
        ``attention="full"``; their row counts may differ (grouped-query attention).
      qkv_role: ``qkv_rows``: 0, 1, 2 for q, k, v.
    """

    kind: Literal["dense", "matrix", "attn_in", "attn_out", "qkv_rows", "out_cols"] = "dense"
    layer_axes: int = 0
    heads: int = 0
    transposed: bool = False
    fused: int = 1
    qkv_block: str = ""
    qkv_role: int = 0

    @property
    def ndim(self) -> int:
        return self.layer_axes + (3 if self.kind in ("attn_in", "attn_out") else 2)

    @property
    def is_attention_input(self) -> bool:
        """Whether the leaf holds attention q/k/v projections (boosting's ``attn_beta``)."""
        return self.kind in ("attn_in", "qkv_rows")


def layout_from_name(path: str, ndim: int, layer_axes: int = 0) -> MatrixLayout:
    """Infers a layout from the module name holding the kernel."""
    parts = path.split("/")
    parent = parts[-2] if len(parts) >= 2 else ""
    if ndim == layer_axes + 3 and parent in ATTENTION_IN_NAMES:
        return MatrixLayout("attn_in", layer_axes)
    if ndim == layer_axes + 3 and parent in ATTENTION_OUT_NAMES:
        return MatrixLayout("attn_out", layer_axes)
    return MatrixLayout("dense", layer_axes)


def matrix_predicate(
    *, layer_axes: int = 0, exclude: frozenset[str] | Sequence[str] = EXCLUDED_MODULES
) -> Callable[[str, Any], MatrixLayout | None]:
    """Builds the default predicate, optionally for scan-stacked parameters.

    A leaf is a matrix when it is named ``kernel`` and is a 2-D Dense kernel, or a
    3-D attention kernel of a ``query``/``key``/``value``/``out`` module (plus
    ``layer_axes`` leading scan axes), and no module on its path is a final
    projection or classifier (``exclude``).

    Args:
      layer_axes: leading axes that stack layers (``nn.scan``); batch axes.
      exclude: module names whose kernels are never matrices.

    Returns:
      ``predicate(path, leaf) -> MatrixLayout | None``.
    """
    excluded = frozenset(exclude)

    def predicate(path: str, leaf: Any) -> MatrixLayout | None:
        parts = path.split("/")
        if parts[-1] != "kernel" or excluded.intersection(parts[:-1]):
            return None
        ndim = len(np.shape(leaf))
        layout = layout_from_name(path, ndim, layer_axes)
        return layout if ndim == layout.ndim else None

    predicate.__name__ = f"matrix_predicate_layer_axes_{layer_axes}"
    return predicate


default_is_matrix = matrix_predicate()


def resolve_layout(is_matrix: Callable | None, path: str, leaf: Any) -> MatrixLayout | None:
    """Calls a predicate; ``True`` from a user predicate means 'infer by name'."""
    predicate = default_is_matrix if is_matrix is None else is_matrix
    answer = predicate(path, leaf)
    if answer is None or answer is False:
        return None
    if answer is True:
        layout = layout_from_name(path, len(np.shape(leaf)))
        if len(np.shape(leaf)) < 2:
            raise SubboostError(
                f"is_matrix selected {path!r} with shape {tuple(np.shape(leaf))}, "
                "but a matrix needs at least 2 dimensions."
            )
        # Extra leading axes of a user-selected leaf are layer (batch) axes.
        extra = len(np.shape(leaf)) - layout.ndim
        return dataclasses.replace(layout, layer_axes=max(extra, 0))
    if isinstance(answer, MatrixLayout):
        if len(np.shape(leaf)) != answer.ndim:
            raise SubboostError(
                f"is_matrix gave layout {answer} for {path!r}, whose shape "
                f"{tuple(np.shape(leaf))} has {len(np.shape(leaf))} dimensions, "
                f"not {answer.ndim}."
            )
        return answer
    raise SubboostError(
        f"is_matrix must return None/False, True or a MatrixLayout; got {answer!r} for {path!r}."
    )


# ----------------------------------------------------------------------------
# The plan: which leaves form which matrices
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Member:
    """One named matrix family: a leaf, or fused q/k/v leaves in ``full`` mode."""

    name: str  # module path, e.g. "transformer/resblocks_0/attn/query"
    leaf_ids: tuple[int, ...]
    layout: MatrixLayout
    attention: str
    leaf_shape: tuple[int, ...]  # shape without lead axes (one leaf; q/k/v share it)
    group: tuple[int, int, str]
    offset: int
    count: int
    leaf_shapes: tuple[tuple[int, ...], ...] = ()  # each leaf's shape where fused leaves differ (GQA)

    def shape_of(self, j: int) -> tuple[int, ...]:
        """The shape of the member's ``j``-th leaf (without lead axes)."""
        return self.leaf_shapes[j] if self.leaf_shapes else self.leaf_shape

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.leaf_shape[: self.layout.layer_axes]


def _torch_layout_matrix(layout: MatrixLayout, core: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a ``qkv_rows`` / ``out_cols`` leaf in PyTorch orientation."""
    rows, cols = core
    return (cols, rows) if layout.transposed else (rows, cols)


def _check_heads(layout: MatrixLayout, size: int, what: str) -> int:
    if layout.heads < 1:
        raise SubboostError(f"attention='per_head' needs the number of heads of this {layout.kind} leaf; none given.")
    if size % layout.heads:
        raise SubboostError(f"{layout.kind} leaf: {what} {size} is not a multiple of its {layout.heads} heads.")
    return size // layout.heads


def _matrix_shape(layout: MatrixLayout, shape: tuple[int, ...], attention: str, fused: int,
                  fused_rows: int | None = None):
    """(count, rows, cols) of the PyTorch-oriented matrices a leaf contributes.

    ``fused_rows``: ``qkv_rows`` siblings stacked by ``attention="full"``: their rows together.
    """
    core = shape[layout.layer_axes :]
    layers = math.prod(shape[: layout.layer_axes])
    if layout.kind == "dense":
        d_in, d_out = core
        return layers, d_out, d_in
    if layout.kind == "matrix":
        rows, cols = core
        return layers, rows, cols
    if layout.kind == "qkv_rows":
        rows, cols = _torch_layout_matrix(layout, core)
        if rows % layout.fused:
            raise SubboostError(f"qkv_rows leaf with {rows} rows cannot hold {layout.fused} fused projections.")
        if attention == "per_head":
            head_dim = _check_heads(layout, rows // layout.fused, "rows per projection")
            return layers * layout.fused * layout.heads, head_dim, cols
        if attention == "full":
            return layers, rows if fused_rows is None else fused_rows, cols
        return layers * layout.fused, rows // layout.fused, cols
    if layout.kind == "out_cols":
        rows, cols = _torch_layout_matrix(layout, core)
        if attention == "per_head":
            return layers * layout.heads, rows, _check_heads(layout, cols, "columns")
        return layers, rows, cols
    if layout.kind == "attn_in":
        embed, heads, head_dim = core
        if attention == "per_head":
            return layers * heads, head_dim, embed
        return layers, fused * heads * head_dim, embed
    heads, head_dim, embed = core
    if attention == "per_head":
        return layers * heads, embed, head_dim
    return layers, embed, heads * head_dim


@dataclasses.dataclass(frozen=True)
class MatrixPlan:
    """Static description of a tree's matrix view (built from shapes alone)."""

    treedef: Any
    paths: tuple[str, ...]
    lead_ndim: int
    attention: str
    members: tuple[Member, ...]
    groups: tuple[tuple[int, int, str], ...]
    group_sizes: tuple[int, ...]

    @property
    def matrix_leaf_ids(self) -> frozenset[int]:
        return frozenset(i for m in self.members for i in m.leaf_ids)

    def is_matrix_leaf(self, leaf_id: int) -> bool:
        return leaf_id in self.matrix_leaf_ids

    # -- gather ---------------------------------------------------------------
    def gather(self, tree: PyTree) -> dict[GroupKey, jax.Array]:
        """Stacks every group's matrices into ``(G, *lead, m, n)`` arrays."""
        leaves = jax.tree_util.tree_leaves(tree)
        if len(leaves) != len(self.paths):
            raise SubboostError("tree does not match the plan it is gathered with.")
        return {g: self._gather_group(g, leaves) for g in self.groups}

    def _gather_group(self, group: GroupKey, leaves: list) -> jax.Array:
        return jnp.concatenate([self._member_matrices(m, leaves) for m in self.members if m.group == group], axis=0)

    def _member_matrices(self, member: Member, leaves: list) -> jax.Array:
        lead = self.lead_ndim
        layout = member.layout
        arrays = [jnp.asarray(leaves[i]) for i in member.leaf_ids]
        lead_shape = arrays[0].shape[:lead]
        layers = math.prod(member.layer_shape)
        core = member.leaf_shape[layout.layer_axes :]
        mats = []
        for j, x in enumerate(arrays):
            core = member.shape_of(j)[layout.layer_axes :]
            x = x.reshape(lead_shape + (layers,) + core)
            if layout.kind in ("qkv_rows", "out_cols"):
                if layout.transposed:
                    x = jnp.swapaxes(x, -1, -2)
                rows, cols = x.shape[-2:]
                if layout.kind == "qkv_rows" and member.attention != "full":
                    per = layout.fused * (layout.heads if member.attention == "per_head" else 1)
                    x = x.reshape(lead_shape + (layers * per, rows // per, cols))
                elif layout.kind == "out_cols" and member.attention == "per_head":
                    heads = layout.heads
                    x = jnp.moveaxis(x.reshape(lead_shape + (layers, rows, heads, cols // heads)), -2, -3)
                    x = x.reshape(lead_shape + (layers * heads, rows, cols // heads))
            elif layout.kind == "dense":
                x = jnp.swapaxes(x, -1, -2)  # (in, out) -> (out, in)
            elif layout.kind == "matrix":
                pass  # already (rows, cols)
            elif layout.kind == "attn_in":
                embed, heads, head_dim = core
                if member.attention == "per_head":
                    x = jnp.moveaxis(x, -3, -1)  # (H, hd, E)
                    x = x.reshape(lead_shape + (layers * heads, head_dim, embed))
                else:
                    x = jnp.swapaxes(x.reshape(lead_shape + (layers, embed, heads * head_dim)), -1, -2)
            else:
                heads, head_dim, embed = core
                if member.attention == "per_head":
                    x = jnp.swapaxes(x, -1, -2).reshape(lead_shape + (layers * heads, embed, head_dim))
                else:
                    x = jnp.swapaxes(x.reshape(lead_shape + (layers, heads * head_dim, embed)), -1, -2)
            mats.append(x)
        x = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=-2)
        return jnp.moveaxis(x, lead, 0)  # (count, *lead, m, n)

    # -- scatter --------------------------------------------------------------
    def scatter(self, groups: Mapping[tuple[int, int, str], jax.Array]) -> dict[int, jax.Array]:
        """Inverse of `gather`: leaf id -> array in the leaf's own layout.

        Group arrays may carry any lead shape (e.g. ``(G, m, n)`` after a merge
        removed the expert axis); it is read off the arrays.
        """
        out: dict[int, jax.Array] = {}
        for member in self.members:
            block = groups[member.group][member.offset : member.offset + member.count]
            block = jnp.moveaxis(block, 0, -3)  # (*lead, count, m, n)
            lead_shape = block.shape[:-3]
            layout = member.layout
            core = member.leaf_shape[layout.layer_axes :]
            n_fused = len(member.leaf_ids)
            if layout.kind == "qkv_rows" and n_fused > 1:  # row counts may differ (grouped-query attention)
                bounds = np.cumsum([0] + [_torch_layout_matrix(layout, member.shape_of(j)[layout.layer_axes :])[0]
                                          for j in range(n_fused)])
            else:
                bounds = np.arange(n_fused + 1) * (block.shape[-2] // n_fused)
            for j, leaf_id in enumerate(member.leaf_ids):
                x = block[..., bounds[j] : bounds[j + 1], :] if n_fused > 1 else block
                leaf_shape = member.shape_of(j)
                if layout.kind in ("qkv_rows", "out_cols"):
                    layers = math.prod(member.layer_shape)
                    rows, cols = _torch_layout_matrix(layout, leaf_shape[layout.layer_axes :])
                    if layout.kind == "out_cols" and member.attention == "per_head":
                        x = x.reshape(lead_shape + (layers, layout.heads, rows, cols // layout.heads))
                        x = jnp.moveaxis(x, -3, -2)
                    x = x.reshape(lead_shape + (layers, rows, cols))
                    if layout.transposed:
                        x = jnp.swapaxes(x, -1, -2)
                    out[leaf_id] = x.reshape(lead_shape + leaf_shape)
                    continue
                if layout.kind == "matrix":
                    pass
                elif layout.kind == "attn_in" and member.attention == "per_head":
                    embed, heads, head_dim = core
                    x = jnp.moveaxis(x.reshape(lead_shape + (-1, heads, head_dim, embed)), -1, -3)
                elif layout.kind == "attn_out" and member.attention == "per_head":
                    heads, head_dim, embed = core
                    x = jnp.swapaxes(x.reshape(lead_shape + (-1, heads, embed, head_dim)), -1, -2)
                else:  # dense, or a whole attention matrix: (out, in) -> (in, out); the reshape below splits heads
                    x = jnp.swapaxes(x, -1, -2)
                out[leaf_id] = x.reshape(lead_shape + member.leaf_shape)
        return out

    def split(self, values: Mapping[tuple[int, int, str], jax.Array]) -> dict[str, jax.Array]:
        """Per-matrix results ``(G, *rest)`` -> ``{member name: (*rest)}``.

        Members with several matrices (scan layers, heads) keep a leading axis
        of that size; single matrices drop it.
        """
        out = {}
        for member in self.members:
            block = values[member.group][member.offset : member.offset + member.count]
            out[member.name] = block[0] if member.count == 1 else block
        return out

    def rebuild(self, tree: PyTree, new_leaves: Mapping[int, Any]) -> PyTree:
        """The tree with leaves replaced by ``new_leaves`` (by leaf id)."""
        leaves = jax.tree_util.tree_leaves(tree)
        merged = [new_leaves.get(i, leaf) for i, leaf in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(self.treedef, merged)

    # -- the group-mapping primitive -------------------------------------------
    def map_groups(
        self,
        fn: GroupKernel | None,
        tree: PyTree,
        *,
        batch_size: int | None = None,
        mesh: Mesh | None = None,
        parts: Callable[[GroupKey], Sequence[tuple[np.ndarray, GroupKernel]]] | None = None,
    ) -> dict[GroupKey, Any]:
        """``fn`` on every matrix group of ``tree``: ``{group: fn(G matrices)}``.

        The one place where groups are gathered, chunked, chained and split
        over devices. ``fn`` maps a stack ``(B, *lead, m, n)`` to a pytree of
        arrays with leading axis ``B`` and must treat the ``B`` matrices
        independently, so the result does not depend on how a group is cut:

        * whole groups (default): ``fn`` once per group on its gathered ``(G, ...)`` stack;
        * ``batch_size``: no group is gathered; `jax.lax.map` loads
          ``batch_size`` matrices at a time straight from their leaves
          (`map_in_chunks`), so temporaries stay at that many matrices' worth;
        * ``mesh``: the group axis is split over every device of the mesh
          (`map_groups_on_mesh`; ``batch_size`` then chunks each device's block).

        Every group's input is made data-dependent on the previous group's
        result (`subboost.linalg.after`): at most one group's LAPACK calls are
        in flight, the CPU deadlock that chaining prevents.

        Args:
          fn: the kernel; may be ``None`` when ``parts`` gives the kernels.
          tree: the tree the plan was built from (same structure and shapes).
          batch_size: matrices per chunk (a positive int), or ``None`` for
            whole groups.
          mesh: a `jax.sharding.Mesh` to split groups over (inside `jax.jit`).
          parts: ``group -> [(indices, kernel), ...]``: static subsets of a
            group's matrices (together covering it; ``None`` = all of them)
            run as groups of their own with their own kernel (e.g. another
            cutoff for attention matrices) and are reassembled in group order;
            ``None``: ``fn`` on every whole group.

        Returns:
          ``{group key: result}`` in plan order (`scatter` or `split` it).
        """
        leaves = jax.tree_util.tree_leaves(tree)
        if len(leaves) != len(self.paths):
            raise SubboostError("tree does not match the plan it is mapped with.")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            # Public callers check it first (`subboost.validation.check_int`, naming themselves).
            raise SubboostError(f"map_groups: batch_size must be a positive integer or None, got {batch_size!r}.")
        results: dict[GroupKey, Any] = {}
        previous = None
        for group, size in zip(self.groups, self.group_sizes):
            kernels = [(None, fn)] if parts is None else [(None if i is None else np.asarray(i), k) for i, k in parts(group)]
            gathered, outs = None, []
            for indices, kernel in kernels:
                count = size if indices is None else len(indices)
                if batch_size is None or batch_size >= count or mesh is not None:
                    if gathered is None:
                        gathered = self._gather_group(group, leaves)
                    x = linalg.after(gathered if indices is None else gathered[indices], previous)
                    out = kernel(x) if mesh is None else map_groups_on_mesh(kernel, x, mesh, batch_size=batch_size)
                else:
                    out = map_in_chunks(kernel, self._group_loader(group, leaves, indices), count, batch_size,
                                        previous=previous)
                outs.append(previous := out)
            if len(outs) == 1:
                results[group] = outs[0]
            else:
                order = np.argsort(np.concatenate([i for i, _ in kernels]))
                results[group] = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0)[order], *outs)
        return results

    def _group_loader(self, group: GroupKey, leaves: list, indices: np.ndarray | None = None
                      ) -> Callable[[jax.Array], jax.Array]:
        """``ids (B,) -> (B, *lead, m, n)``: matrices ``ids`` of a group (of its ``indices``), read from the leaves."""
        members = [m for m in self.members if m.group == group]
        loaders = [self._member_loader(m, leaves) for m in members]
        member_of = np.repeat(np.arange(len(members)), [m.count for m in members])
        local = np.concatenate([np.arange(m.count) for m in members])
        if indices is not None:
            member_of, local = member_of[indices], local[indices]
        member_of, local = jnp.asarray(member_of, jnp.int32), jnp.asarray(local, jnp.int32)

        def load(ids: jax.Array) -> jax.Array:
            # One switch per matrix: a vmapped switch would evaluate every branch.
            return jnp.stack([jax.lax.switch(member_of[i], loaders, local[i]) for i in ids])

        return load

    def _member_loader(self, member: Member, leaves: list) -> Callable[[jax.Array], jax.Array]:
        """``j -> (*lead, m, n)``: the member's j-th matrix; only the layer holding it is sliced and oriented."""
        lead = self.lead_ndim
        core = member.leaf_shape[member.layout.layer_axes :]
        layers = math.prod(member.layer_shape)
        per_layer = member.count // layers  # heads in the per_head view, else 1
        one_layer = dataclasses.replace(
            member,
            leaf_ids=tuple(range(len(member.leaf_ids))),
            layout=dataclasses.replace(member.layout, layer_axes=0),
            leaf_shape=core,
            leaf_shapes=tuple(shape[member.layout.layer_axes :] for shape in member.leaf_shapes),
            offset=0,
            count=per_layer,
        )

        def load(j: jax.Array) -> jax.Array:
            layer, within = j // per_layer, j % per_layer
            parts = []
            for j, leaf_id in enumerate(member.leaf_ids):
                x = jnp.asarray(leaves[leaf_id])
                x = x.reshape(x.shape[:lead] + (layers,) + member.shape_of(j)[member.layout.layer_axes :])
                parts.append(jax.lax.dynamic_index_in_dim(x, layer, axis=lead, keepdims=False))
            matrices = self._member_matrices(one_layer, parts)  # (per_layer, *lead, m, n)
            return jax.lax.dynamic_index_in_dim(matrices, within, axis=0, keepdims=False)

        return load


def map_in_chunks(fn: GroupKernel, load: Callable[[jax.Array], jax.Array], count: int, batch_size: int,
                  *, previous: Any = None) -> Any:
    """``fn`` over ``count`` matrices, ``batch_size`` at a time: ``load(ids)`` reads chunk ``ids``.

    Chunks run one after another (`jax.lax.map` without vmapping ``fn``, so
    `jax.lax.cond`s inside stay real branches); the last chunk is padded with
    copies of the last matrix (never a degenerate input), sliced off after.
    Each chunk is chained after ``previous`` (`subboost.linalg.after`).
    """
    chunks = -(-count // batch_size)
    ids = np.minimum(np.arange(chunks * batch_size), count - 1).reshape(chunks, batch_size)
    out = jax.lax.map(lambda c: fn(linalg.after(load(c), previous)), jnp.asarray(ids, jnp.int32))
    return jax.tree_util.tree_map(lambda a: a.reshape((chunks * batch_size,) + a.shape[2:])[:count], out)


def pad_groups(x: jax.Array, multiple: int) -> jax.Array:
    """Pads axis 0 to a multiple of ``multiple`` with copies of the last entry."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)], axis=0)


def map_groups_on_mesh(fn: GroupKernel, x: jax.Array, mesh: Mesh, *, batch_size: int | None = None) -> Any:
    """``fn`` on a group ``(G, ...)`` split along G over every device of ``mesh``.

    ``G`` is padded to a multiple of the device count (copies of the last
    matrix) and each device calls ``fn`` on its block of ``ceil(G / D)``
    matrices (``batch_size`` at a time if given); every output leaf is sliced
    back to ``G``. Use inside `jax.jit`.
    """
    num = x.shape[0]
    spec = PartitionSpec(tuple(mesh.axis_names))
    padded = jax.lax.with_sharding_constraint(pad_groups(x, mesh.size), NamedSharding(mesh, spec))

    def block_fn(block: jax.Array) -> Any:
        if batch_size is None or batch_size >= block.shape[0]:
            return fn(block)
        return map_in_chunks(fn, lambda ids: jnp.take(block, ids, axis=0), block.shape[0], batch_size)

    out = jax.shard_map(block_fn, mesh=mesh, in_specs=spec, out_specs=spec)(padded)
    return jax.tree_util.tree_map(lambda y: y[:num], out)


def _stackable(layouts: Sequence[MatrixLayout], shapes: Sequence[tuple[int, ...]]) -> bool:
    """Whether ``qkv_rows`` leaves can be stacked along their rows: same layers, columns and layout."""
    first = layouts[0]
    if any(dataclasses.replace(l, qkv_role=0, heads=0) != dataclasses.replace(first, qkv_role=0, heads=0)
           for l in layouts):
        return False
    cores = [_torch_layout_matrix(first, s[first.layer_axes :]) for s in shapes]
    return len({s[: first.layer_axes] for s in shapes}) == 1 and len({c[1] for c in cores}) == 1


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path else ""


def _module_name(path: str) -> str:
    """The module holding a leaf: ``"a/b"`` of ``"a/b/kernel"``; ``"a.b"`` of a PyTorch name ``"a.b.weight"``."""
    if "/" not in path and "." in path:
        return path.rsplit(".", 1)[0]
    return _parent(path)


def matrix_plan(
    tree: PyTree,
    *,
    lead_ndim: int = 0,
    is_matrix: Callable | None = None,
    attention: AttentionMode = "per_qkv",
) -> MatrixPlan:
    """Builds the matrix view of ``tree`` (whose leaves carry ``lead_ndim`` lead axes).

    Args:
      tree: parameter pytree (arrays or `jax.ShapeDtypeStruct`s).
      lead_ndim: leading axes shared by every leaf (1 for stacked task vectors).
      is_matrix: predicate ``(path, leaf) -> MatrixLayout | bool | None``; the
        leaf passed has the lead axes removed. Defaults to `default_is_matrix`.
      attention: ``per_qkv`` (q, k, v separately), ``full`` (q, k, v stacked into
        one ``(3D, D)`` matrix, PyTorch's ``in_proj_weight``) or ``per_head``.

    Returns:
      A `MatrixPlan`.
    """
    if attention not in ATTENTION_MODES:
        raise SubboostError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}.")
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = tuple(path_str(p) for p, _ in flat)
    layouts: dict[int, MatrixLayout] = {}
    shapes: dict[int, tuple[int, ...]] = {}
    dtypes: dict[int, str] = {}
    for i, (path, (_, leaf)) in enumerate(zip(paths, flat)):
        shape = tuple(np.shape(leaf))
        if len(shape) < lead_ndim:
            raise SubboostError(
                f"leaf {path!r} has shape {shape}, fewer than the {lead_ndim} lead axes expected."
            )
        core_shape = shape[lead_ndim:]
        layout = resolve_layout(is_matrix, path, jax.ShapeDtypeStruct(core_shape, leaf.dtype))
        if layout is not None:
            layouts[i] = layout
            shapes[i] = core_shape
            dtypes[i] = jnp.dtype(leaf.dtype).name

    # Fuse sibling q/k/v kernels in `full` mode.
    units: list[tuple[str, tuple[int, ...]]] = []
    fused_done: set[int] = set()
    by_path = {paths[i]: i for i in layouts}
    qkv_siblings: dict[str, dict[int, int]] = {}
    for i, layout in layouts.items():
        if layout.kind == "qkv_rows" and layout.qkv_block and layout.fused == 1:
            qkv_siblings.setdefault(layout.qkv_block, {})[layout.qkv_role] = i
    for i in sorted(layouts):
        if i in fused_done:
            continue
        module = _module_name(paths[i])
        if attention == "full" and layouts[i].kind == "qkv_rows" and layouts[i].qkv_block:
            roles = qkv_siblings.get(layouts[i].qkv_block, {})
            trio = [roles.get(r) for r in range(3)]
            if all(t is not None for t in trio) and _stackable([layouts[t] for t in trio], [shapes[t] for t in trio]):
                fused_done.update(trio)
                units.append((f"{layouts[i].qkv_block}.qkv", tuple(trio)))
                continue
        if attention == "full" and layouts[i].kind == "attn_in":
            block = _parent(module)
            trio = [by_path.get(f"{block}/{n}/kernel" if block else f"{n}/kernel") for n in ("query", "key", "value")]
            if all(t is not None for t in trio) and len({shapes[t] for t in trio}) == 1 and all(
                layouts[t].kind == "attn_in" for t in trio
            ):
                fused_done.update(trio)
                units.append((f"{block}/qkv" if block else "qkv", tuple(trio)))
                continue
        fused_done.add(i)
        units.append((module, (i,)))

    members: list[Member] = []
    offsets: dict[tuple[int, int, str], int] = {}
    for name, ids in units:
        layout = layouts[ids[0]]
        fused_rows = None
        if layout.kind == "qkv_rows" and len(ids) > 1:
            fused_rows = sum(_torch_layout_matrix(layouts[t], shapes[t][layout.layer_axes :])[0] for t in ids)
        try:
            count, rows, cols = _matrix_shape(layout, shapes[ids[0]], attention, len(ids), fused_rows)
        except ValueError as err:
            raise SubboostError(f"{paths[ids[0]]!r} (shape {shapes[ids[0]]}): {err}") from err
        group = (rows, cols, dtypes[ids[0]])
        offset = offsets.get(group, 0)
        offsets[group] = offset + count
        leaf_shapes = tuple(shapes[t] for t in ids) if len({shapes[t] for t in ids}) > 1 else ()
        members.append(Member(name, ids, layout, attention, shapes[ids[0]], group, offset, count, leaf_shapes))
    groups = tuple(offsets)
    return MatrixPlan(
        treedef=treedef,
        paths=paths,
        lead_ndim=lead_ndim,
        attention=attention,
        members=tuple(members),
        groups=groups,
        group_sizes=tuple(offsets[g] for g in groups),
    )


def map_matrices(
    fn: Callable[[jax.Array], jax.Array],
    tree: PyTree,
    *,
    non_matrix: Callable[[jax.Array], jax.Array] | None = None,
    lead_ndim: int = 0,
    is_matrix: Callable | None = None,
    attention: AttentionMode = "per_qkv",
    batch_size: int | None = None,
    mesh: Mesh | None = None,
) -> PyTree:
    """Applies ``fn`` to every matrix group, ``non_matrix`` to every other leaf.

    ``fn`` maps a group ``(G, *lead, m, n)`` to ``(G, *lead_out, m, n)``; it runs
    through `MatrixPlan.map_groups` (whole groups, ``batch_size`` matrices at a
    time, or split over ``mesh``).
    """
    plan = matrix_plan(tree, lead_ndim=lead_ndim, is_matrix=is_matrix, attention=attention)
    new_leaves = plan.scatter(plan.map_groups(fn, tree, batch_size=batch_size, mesh=mesh))
    if non_matrix is not None:
        for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
            if i not in new_leaves:
                new_leaves[i] = non_matrix(leaf)
    return plan.rebuild(tree, new_leaves)


def nest(flat: Mapping[str, Any]) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``: the nested dict whose `leaves_with_paths` names are the keys."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
