"""Fine-tuning one expert per task: the encoder only, the task's head frozen.

For task ``t`` with frozen head ``(W_t, b_t)`` (`subboost.bench.suites.vision.centroid_heads`):

    loss_t(theta) = mean_i cross_entropy( normalise(f_theta(x_i)) @ W_t + b_t , y_i )

minimised from the pretrained ``theta_0`` with AdamW (no weight decay, so the
task vector ``theta_t - theta_0`` holds only what the task asked for), linear
warm-up then cosine decay to 0, gradient clipping at global norm 1, fresh
pixel noise every step. All experts train at once: parameters and optimiser
states carry a leading task axis and one `jax.vmap`-ed update serves every
task, ``steps_per_call`` steps per jit-compiled `jax.lax.scan`. Experts are
independent (own batches, own PRNG stream ``fold_in(key, t)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from subboost.bench.suites.vision.config import BenchConfig
from subboost.bench.suites.vision.splits import SuiteData
from subboost.bench.suites.vision.centroid_heads import task_logits
from subboost.bench.suites.vision.model import add_pixel_noise, make_encoder
from subboost.bench.suites.vision.pretrain import chunk_sizes

FINETUNE_MOMENTUM = 0.9


def stack_trees(tree, copies: int):
    """``copies`` copies of ``tree`` on a new leading axis."""
    return jax.tree_util.tree_map(lambda p: jnp.broadcast_to(p, (copies,) + p.shape), tree)


def finetune_experts(
    config: BenchConfig, base: dict, data: SuiteData, heads: dict, *, seed: int, progress: bool = True
) -> tuple[dict, list[float]]:
    """Fine-tunes one expert per task of ``data`` (deterministic in ``seed``).

    Returns:
      ``(experts, losses)``: encoder parameters stacked on a leading task axis
      (expert ``t`` at index ``t``), and the mean training loss per call.
    """
    encode = make_encoder(config.model)
    num_tasks = data.train.num_tasks
    num_train = data.train.images.shape[1]
    batch = config.finetune_batch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.finetune_lr, max(config.finetune_warmup, 1), max(config.finetune_steps, config.finetune_warmup + 1)
    )
    if config.finetune_optimizer == "sgd":
        # Plain gradient steps: each linear layer's update stays in the span of the task's own activations.
        optimizer = optax.sgd(schedule, momentum=FINETUNE_MOMENTUM)
    elif config.finetune_optimizer == "adam":
        optimizer = optax.adam(schedule)
    else:
        raise ValueError(f"BenchConfig.finetune_optimizer must be 'sgd' or 'adam', got {config.finetune_optimizer!r}.")
    tx = optax.chain(optax.clip_by_global_norm(1.0), optimizer)
    params = stack_trees(base, num_tasks)
    opt_state = jax.vmap(tx.init)(params)

    def loss_one(params, images, labels, head):
        head = jax.tree_util.tree_map(lambda x: x[None], head)
        logits = task_logits(encode(params, images)[None], head)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def update_one(params, opt_state, images, labels, head):
        loss, grads = jax.value_and_grad(loss_one)(params, images, labels, head)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def run(params, opt_state, images, labels, noise, heads, keys):
        def step(carry, step_key):
            params, opt_state = carry
            task_keys = jax.vmap(lambda t: jax.random.fold_in(step_key, t))(jnp.arange(num_tasks))
            index = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (batch,), 0, num_train))(task_keys)
            rows = jnp.arange(num_tasks)[:, None]
            x = jax.vmap(lambda k, x, s: add_pixel_noise(jax.random.fold_in(k, 1), x, s))(task_keys, images[rows, index], noise)
            params, opt_state, loss = jax.vmap(update_one)(params, opt_state, x, labels[rows, index], heads)
            return (params, opt_state), jnp.mean(loss)

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), keys)
        return params, opt_state, jnp.mean(losses)

    images, labels = jnp.asarray(data.train.images), jnp.asarray(data.train.labels)
    noise = jnp.asarray(data.noise)
    heads = jax.tree_util.tree_map(jnp.asarray, heads)
    key = jax.random.key(seed)
    losses: list[float] = []
    done = 0
    with tqdm(total=config.finetune_steps, desc=f"fine-tuning {num_tasks} experts", unit="step",
              disable=not progress, leave=False) as bar:
        for size in chunk_sizes(config.finetune_steps, config.steps_per_call):
            keys = jax.random.split(jax.random.fold_in(key, done), size)
            params, opt_state, loss = run(params, opt_state, images, labels, noise, heads, keys)
            losses.append(float(loss))
            done += size
            bar.update(size)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses
