"""Fine-tuning one expert per task: the transformer blocks only; embeddings and head frozen.

For task ``t`` with frozen prototype head ``(W_t, b_t)`` (`subboost.bench.suites.text.prototype_heads`):

    loss_t(theta) = mean_i cross_entropy( normalise(meanpool(f_theta(x_i))) @ W_t + b_t , y_i )

minimised from the pretrained blocks with AdamW without weight decay (the task vector
holds only what the task asked for), linear warm-up then cosine decay to 0, gradient
clipping at global norm 1, a fresh random batch of the task's training sentences every
step. Experts train one after another with one jit-compiled `lax.scan` program of
``steps_per_call`` steps (same shapes for every task, so it compiles once); each expert
has its own PRNG stream ``fold_in(key(seed), t)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from subboost.models.bert import BertConfig
from subboost.bench.suites.text.prototype_heads import task_logits
from subboost.bench.suites.text.model import make_embedder, with_encoder


def chunk_sizes(total: int, per_call: int) -> list[int]:
    return [min(per_call, total - start) for start in range(0, total, per_call)]


def finetune_experts(config, model: BertConfig, base: dict, suite, heads: dict, *, seed: int,
                     progress: bool = True) -> tuple[dict, list[list[float]]]:
    """Fine-tunes one expert per task of ``suite`` (deterministic in ``seed``).

    Args:
      config: the `TextBenchConfig` (steps, batch, learning rate, warm-up, steps per call).
      model: the encoder architecture.
      base: pretrained parameters ``{"embeddings", "encoder"}``.
      suite: the tokenised `TextSuite`.
      heads: stacked frozen heads.
      seed: run seed.

    Returns:
      ``(experts, losses)``: the fine-tuned ``encoder`` subtrees stacked on a leading task
      axis, and per task the mean training loss of each call.
    """
    embed = make_embedder(model)
    steps, batch = config.finetune_steps, config.finetune_batch
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.finetune_lr, max(config.finetune_warmup, 1), max(steps, config.finetune_warmup + 1)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    num_tasks, num_train, _ = suite.train.input_ids.shape

    def loss_fn(encoder, embeddings, ids, mask, labels, head):
        feats = embed(with_encoder({"embeddings": embeddings}, encoder), ids, mask)
        logits = task_logits(feats[None], jax.tree_util.tree_map(lambda x: x[None], head))[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def run(encoder, opt_state, embeddings, ids, mask, labels, head, keys):
        def step(carry, key):
            encoder, opt_state = carry
            index = jax.random.randint(key, (batch,), 0, num_train)
            loss, grads = jax.value_and_grad(loss_fn)(encoder, embeddings, ids[index], mask[index], labels[index], head)
            updates, opt_state = tx.update(grads, opt_state, encoder)
            return (optax.apply_updates(encoder, updates), opt_state), loss

        (encoder, opt_state), losses = jax.lax.scan(step, (encoder, opt_state), keys)
        return encoder, opt_state, jnp.mean(losses)

    embeddings = jax.tree_util.tree_map(jnp.asarray, base["embeddings"])
    experts, losses = [], []
    with tqdm(total=num_tasks * steps, desc=f"fine-tuning {num_tasks} experts", unit="step",
              disable=not progress, leave=False) as bar:
        for t in range(num_tasks):
            encoder = jax.tree_util.tree_map(jnp.asarray, base["encoder"])
            opt_state = tx.init(encoder)
            ids, mask = jnp.asarray(suite.train.input_ids[t]), jnp.asarray(suite.train.attention_mask[t])
            labels = jnp.asarray(suite.train.labels[t])
            head = jax.tree_util.tree_map(lambda x, t=t: jnp.asarray(x[t]), heads)
            key, done, task_losses = jax.random.fold_in(jax.random.key(seed), t), 0, []
            for size in chunk_sizes(steps, config.steps_per_call):
                keys = jax.random.split(jax.random.fold_in(key, done), size)
                encoder, opt_state, loss = run(encoder, opt_state, embeddings, ids, mask, labels, head, keys)
                task_losses.append(float(loss))
                done += size
                bar.update(size)
                bar.set_postfix_str(f"{suite.tasks[t].name} loss {task_losses[-1]:.3f}")
            experts.append(jax.device_get(encoder))
            losses.append(task_losses)
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *experts), losses
