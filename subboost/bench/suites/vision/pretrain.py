"""CLIP-style pretraining of the encoder on the captioned mixture of every task.

As in CLIP, images and captions meet in one embedding space, compared by
cosine similarity under a learned temperature:

    logits_ij = exp(s) * < normalise(f(x_i)), normalise(w_j) >,   exp(s) <= 100
    loss      = mean_i  cross_entropy(logits_i, caption_i)

The captions form a small fixed vocabulary (one caption per class of each task,
or per pair of neighbouring classes, see `subboost.bench.suites.vision.splits.build_pretraining_mixture`), so the text tower is an embedding
table ``w`` and every caption is a negative for every image (CLIP's
image-to-text loss with the whole vocabulary in the batch; the text-to-image
half adds nothing when captions repeat within a batch).

Optimiser: AdamW (weight decay on >= 2-D parameters only), linear warm-up then
cosine decay to 0, gradient clipping at global norm 1. Each step samples a
batch uniformly from the mixture and adds each image's task pixel noise
afresh. ``steps_per_call`` steps run inside one jit-compiled `jax.lax.scan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from subboost.bench.suites.vision.config import BenchConfig
from subboost.bench.suites.vision.splits import PretrainData
from subboost.bench.suites.vision.model import add_pixel_noise, init_encoder, make_encoder
from subboost.models.heads import l2_normalize

MAX_LOGIT_SCALE = 100.0
INIT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """The pretrained encoder, its temperature and the loss curve (mean per `steps_per_call` chunk)."""

    encoder: dict
    logit_scale: float
    losses: tuple[float, ...]


def decay_mask(params):
    """Weight decay on matrices and kernels only (not on biases, norms, the temperature)."""
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def chunk_sizes(steps: int, per_call: int) -> list[int]:
    """``steps`` split into calls of ``per_call`` steps (the last one shorter)."""
    if steps < 0 or per_call < 1:
        raise ValueError(f"need steps >= 0 and steps_per_call >= 1, got {steps} and {per_call}.")
    sizes = [per_call] * (steps // per_call)
    return sizes + ([steps % per_call] if steps % per_call else [])


def pretrain(
    config: BenchConfig,
    data: PretrainData,
    *,
    seed: int,
    progress: bool = True,
    on_chunk: Callable[[int, dict, float], None] | None = None,
) -> PretrainResult:
    """Pretrains the encoder (deterministic in ``seed``).

    ``on_chunk(steps_done, encoder, logit_scale)``, if given, sees the encoder after every jit-compiled chunk
    (for snapshots of long runs; it does not change the result).
    """
    encode = make_encoder(config.model)
    key_init, key_captions, key_train = jax.random.split(jax.random.key(seed), 3)
    embed_dim = config.model.embed_dim
    params = {
        "encoder": init_encoder(config.model, key_init),
        "captions": jax.random.normal(key_captions, (data.num_captions, embed_dim)) * embed_dim**-0.5,
        "log_scale": jnp.asarray(np.log(INIT_LOGIT_SCALE), jnp.float32),
    }
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.pretrain_lr, max(config.pretrain_warmup, 1), max(config.pretrain_steps, config.pretrain_warmup + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=config.pretrain_weight_decay, mask=decay_mask),
    )
    opt_state = tx.init(params)
    batch = config.pretrain_batch
    num_images = data.images.shape[0]

    def loss_fn(params, images, captions):
        features = l2_normalize(encode(params["encoder"], images))
        scale = jnp.exp(jnp.minimum(params["log_scale"], np.log(MAX_LOGIT_SCALE)))
        logits = scale * features @ l2_normalize(params["captions"]).T
        return optax.softmax_cross_entropy_with_integer_labels(logits, captions).mean()

    @jax.jit
    def run(params, opt_state, images, captions, noise, keys):
        def step(carry, step_key):
            params, opt_state = carry
            key_index, key_noise = jax.random.split(step_key)
            index = jax.random.randint(key_index, (batch,), 0, num_images)
            x = add_pixel_noise(key_noise, images[index], noise[index])
            loss, grads = jax.value_and_grad(loss_fn)(params, x, captions[index])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, jnp.mean(losses)

    images, captions, noise = jnp.asarray(data.images), jnp.asarray(data.captions), jnp.asarray(data.noise)
    losses = []
    done = 0
    with tqdm(total=config.pretrain_steps, desc="pretraining", unit="step", disable=not progress, leave=False) as bar:
        for size in chunk_sizes(config.pretrain_steps, config.steps_per_call):
            keys = jax.random.split(jax.random.fold_in(key_train, done), size)
            params, opt_state, loss = run(params, opt_state, images, captions, noise, keys)
            losses.append(float(loss))
            done += size
            bar.update(size)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if on_chunk is not None:
                on_chunk(done, params["encoder"], float(np.exp(min(float(params["log_scale"]), np.log(MAX_LOGIT_SCALE)))))
    scale = float(np.exp(min(float(params["log_scale"]), np.log(MAX_LOGIT_SCALE))))
    return PretrainResult(params["encoder"], scale, tuple(losses))
