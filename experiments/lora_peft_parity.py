"""Parity of subboost's adapter merges with peft's ``add_weighted_adapter`` on tiny random adapters.

Three random rank-4 adapters of a tiny BERT (query, value and every ``dense``
module) are merged by peft (``cat``, ``svd``, ``linear``, ``ties_svd``) and by
their subboost counterparts; printed: the largest ``||ours - peft||_F / ||peft||_F``
over modules, and the peft version.

    python -m experiments.lora_peft_parity
    PYTHONPATH=/path/to/peft-0.21 python -m experiments.lora_peft_parity   # another peft
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    import peft

    from subboost.lora import adapter_factors, merge_adapters, merge_factors
    from tests.test_lora import make_adapter, tiny_bert

    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"a{t}" for t in range(3)]
        for t, path in enumerate(paths):
            make_adapter(path, seed=t)
        model = peft.PeftModel.from_pretrained(tiny_bert(), paths[0], adapter_name="a0")
        for t, path in enumerate(paths[1:], start=1):
            model.load_adapter(path, adapter_name=f"a{t}")
        weights = [1.0, 0.5, -0.7]

        def truncated(merged, rank):
            factors, _ = adapter_factors(merged, rank=rank)
            return {name: b @ a for name, (a, b) in factors.items()}

        ties = merge_adapters(paths, "ties", k=0.5 - 1 / 4096, scope="per_leaf", merge="mean")
        ta = merge_adapters(paths, "task_arithmetic", weights=weights)
        linear = merge_factors(paths, "task_arithmetic", weights=weights)
        ours = {
            "cat": ("task_arithmetic (factored)", {n: ta.update(n) for n in ta.modules}),
            "svd": ("task_arithmetic, rank-4 adapter", truncated(ta, 4)),
            "linear": ("merge_factors task_arithmetic", {n: linear.update(n) for n in linear.modules}),
            "ties_svd": ("ties per_leaf mean (dense) k = 0.5 - 1/4096, rank-4 adapter", truncated(ties, 4)),
        }
        print(f"peft {peft.__version__}")
        print("| peft combination | subboost | max relative difference |")
        print("|---|---|---:|")
        for combination, (what, expected) in ours.items():
            is_ties = combination == "ties_svd"
            model.base_model.add_weighted_adapter(["a0", "a1", "a2"], [1.0] * 3 if is_ties else weights, combination,
                                                  combination_type=combination, density=0.5 if is_ties else None)
            worst = 0.0
            for name, module in model.base_model.model.named_modules():
                if isinstance(module, peft.tuners.lora.LoraLayer):
                    theirs = module.get_delta_weight(combination).detach().numpy()
                    worst = max(worst, np.linalg.norm(expected[name] - theirs) / np.linalg.norm(theirs))
            print(f"| {combination} | {what} | {worst:.2e} |")
        # TIES's own trim keeps the threshold entry too (int(N k) + 1 entries): with k = density exactly
        plain = truncated(merge_adapters(paths, "ties", k=0.5, scope="per_leaf", merge="mean"), 4)
        worst = max(np.linalg.norm(plain[name] - module.get_delta_weight("ties_svd").detach().numpy())
                    / np.linalg.norm(module.get_delta_weight("ties_svd").detach().numpy())
                    for name, module in model.base_model.model.named_modules()
                    if isinstance(module, peft.tuners.lora.LoraLayer))
        print(f"| ties_svd | ties per_leaf mean with k = density = 0.5 (one more entry kept per tensor) | {worst:.2e} |")


if __name__ == "__main__":
    main()
