"""Merging parameters straight from JAX training code: flax.nnx and scan-stacked trees.

    python -m experiments.integrate_training_code

1. flax.nnx: `nnx.split(model, nnx.Param)` gives an `nnx.State`; subboost reads
   its paths like a linen tree (the Variables' trailing `.value` is dropped), so
   task vectors, merging and boosting work on it directly and `nnx.merge`
   rebuilds the merged model.
2. big_vision-style scan-stacked parameters (one leading layer axis on every
   block parameter): `sb.matrix_predicate(layer_axes=1)` makes that axis a batch
   axis, so all layers of a kind are boosted in one batched SVD.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import subboost as sb


class Block(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=width, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(width, 4 * width, rngs=rngs)


def finetune_like(state, seed: int):
    """Stand-in for fine-tuning: a small random update of every parameter."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )


def merge_nnx_experts(num_experts: int = 4) -> nnx.Module:
    graphdef, pretrained = nnx.split(Block(16, rngs=nnx.Rngs(0)), nnx.Param)
    experts = [finetune_like(pretrained, seed) for seed in range(num_experts)]
    tvs = sb.task_vectors(pretrained, experts)
    tau = sb.subspace_boost(sb.merge(tvs, "ties", k=0.2), beta=0.01)
    return nnx.merge(graphdef, sb.apply_task_vector(pretrained, tau, alpha=0.5))


def merge_scan_stacked(num_layers: int = 6, num_experts: int = 4) -> dict:
    key = jax.random.key(1)
    pretrained = {
        "encoder": {  # every block parameter has a leading layer axis
            "mlp": {"kernel": jax.random.normal(key, (num_layers, 16, 64)), "bias": jnp.zeros((num_layers, 64))},
            "ln": {"scale": jnp.ones((num_layers, 16))},
        }
    }
    experts = [finetune_like(pretrained, seed) for seed in range(num_experts)]
    tvs = sb.task_vectors(pretrained, experts)
    scanned = sb.matrix_predicate(layer_axes=1)
    tau = sb.subspace_boost(sb.merge(tvs, "task_arithmetic"), beta=0.01, is_matrix=scanned)
    print("stable rank per scanned layer:", sb.stable_rank(tau, is_matrix=scanned)["encoder/mlp"])
    return sb.apply_task_vector(pretrained, tau, alpha=0.3)


if __name__ == "__main__":
    model = merge_nnx_experts()
    print("merged nnx model:", type(model).__name__, model.mlp.kernel[...].shape)
    merged = merge_scan_stacked()
    print("merged scan-stacked kernel:", merged["encoder"]["mlp"]["kernel"].shape)
