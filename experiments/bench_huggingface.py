"""Hugging Face decoders: subboost's streaming merge side by side with mergekit 0.1.5.

Two measurements, each in one run of this script:

* ``parity``: tiny random-init Llama, Mistral and Qwen2 decoders (float32, three experts
  ``base + 0.01 * noise``). Task Arithmetic (subboost ``alpha=0.3`` vs mergekit
  ``task_arithmetic`` with every ``weight: 0.3``) and TIES (subboost ``scope="per_leaf"``,
  ``k=0.2``, ``alpha=1`` vs mergekit ``ties`` with ``density: 0.2``, ``weight: 1``,
  ``normalize: true``): the largest absolute difference and the fraction of entries that differ.
* ``scale``: a random-init Llama-architecture model of about 0.5B parameters in bfloat16 and
  ``--experts`` experts; TIES with the settings above, each tool in its own process under
  ``/usr/bin/time`` (wall time, peak RSS), written to the same machine's disk.

Convention differences (TIES), named because they make the two disagree on a few entries:

1. trim: mergekit keeps ``int(density * n)`` entries per tensor (argsort, ties broken by
   position); subboost keeps every entry ``>=`` the ``(n - int(n k))``-th smallest magnitude,
   i.e. one more (and all entries equal to the threshold). subboost's default ranks over the
   whole model (``scope="global"``, REFERENCE.md); ``per_leaf`` is mergekit's per-tensor rule.
2. elected sign where the trimmed sum is exactly zero: mergekit ``+1``; subboost the sign of
   the total vote over all parameters.
3. arithmetic dtype: mergekit computes in the base's dtype unless ``dtype:`` is set; subboost
   in the checkpoint dtype (bfloat16 differences for bfloat16 experts).

mergekit must be installed in its own environment (``--mergekit-venv``, default
``/work/venvs/mergekit``), never in subboost's.

    python -m experiments.bench_huggingface parity
    nice -n 10 python -m experiments.bench_huggingface scale --experts 8 --workdir /tmp/hf-scale
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _decoder_config(family: str, **sizes):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(**sizes)


def make_models(family: str, root: Path, num_experts: int, *, dtype: str, noise: float, sizes: dict) -> tuple:
    """A random-init base and ``num_experts`` experts ``base + noise * N(0, 1)``, written by transformers."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_decoder_config(family, **sizes))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(root / "base", max_shard_size="2GB")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    experts = []
    for t in range(num_experts):
        generator = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(base_state[name] + noise * torch.randn(p.shape, generator=generator).to(p.dtype))
        model.save_pretrained(root / f"expert{t}", max_shard_size="2GB")
        experts.append(root / f"expert{t}")
    del model, base_state
    return root / "base", experts


def mergekit_config(method: str, base: Path, experts: list[Path], *, weight: float, density: float | None) -> str:
    """A mergekit YAML configuration (written by hand: no YAML library needed)."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for path in experts:
        lines.append(f"  - model: {path}")
        lines.append("    parameters:")
        lines.append(f"      weight: {weight}")
        if density is not None:
            lines.append(f"      density: {density}")
    if method == "ties":
        lines += ["parameters:", "  normalize: true"]
    return "\n".join(lines) + "\n"


def run_timed(command: list[str], log: Path) -> dict:
    """Runs ``command`` under ``/usr/bin/time -v``: wall seconds and peak RSS (GiB)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(["/usr/bin/time", "-v", *command], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed (exit {done.returncode}); see {log}:\n{text[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_s": wall, "peak_rss_gib": rss_kb / 2**20}


def run_mergekit(venv: Path, config: str, out: Path, log: Path) -> dict:
    config_file = out.parent / f"{out.name}.yml"
    config_file.write_text(config)
    return run_timed([str(venv / "bin" / "mergekit-yaml"), str(config_file), str(out), "--lazy-unpickle",
                      "--no-cuda", "--quiet", "--no-copy-tokenizer", "--no-write-model-card"], log)


def run_subboost(base: Path, experts: list[Path], out: Path, log: Path, *, method: str, params: list[str],
                 alpha: float, chunk_bytes: int) -> dict:
    command = [sys.executable, "-m", "subboost.cli", "merge", "--base", str(base), *map(str, experts),
               "--method", method, "--alpha", str(alpha), "--chunk-bytes", str(chunk_bytes), "--out", str(out)]
    for p in params:
        command += ["--param", p]
    return run_timed(command, log)


def compare(a: Path, b: Path) -> dict:
    """Largest absolute difference and fraction of differing entries between two HF directories."""
    from subboost.checkpoint_io.huggingface import read_huggingface

    x, y = read_huggingface(a), read_huggingface(b)
    missing = sorted(set(x) ^ set(y))
    if missing:
        raise RuntimeError(f"tensor names differ: {missing[:5]}")
    worst, differing, total = 0.0, 0, 0
    for name in x:
        d = np.abs(x[name].astype(np.float64) - y[name].astype(np.float64))
        worst = max(worst, float(d.max()))
        differing += int((d > 1e-6).sum())
        total += d.size
    return {"max_abs_diff": worst, "fraction_differing": differing / total}


def parity(args) -> None:
    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    rows = []
    for family in ("llama", "mistral", "qwen2"):
        root = Path(tempfile.mkdtemp(prefix=f"parity-{family}-", dir=args.workdir))
        base, experts = make_models(family, root, 3, dtype="float32", noise=0.01, sizes=sizes)
        for label, sub, mk in (
            ("task_arithmetic", ("task_arithmetic", [], 0.3), ("task_arithmetic", 0.3, None)),
            ("ties (per tensor)", ("ties", ["k=0.2", "scope=per_leaf"], 1.0), ("ties", 1.0, 0.2)),
        ):
            ours, theirs = root / f"sb-{sub[0]}", root / f"mk-{sub[0]}"
            run_subboost(base, experts, ours, root / f"sb-{sub[0]}.log", method=sub[0], params=sub[1], alpha=sub[2],
                         chunk_bytes=args.chunk_bytes)
            run_mergekit(args.mergekit_venv, mergekit_config(mk[0], base, experts, weight=mk[1], density=mk[2]),
                         theirs, root / f"mk-{sub[0]}.log")
            rows.append({"family": family, "method": label, **compare(ours, theirs)})
        shutil.rmtree(root)
    print("| decoder | method | max abs diff | entries differing (> 1e-6) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['family']} | {r['method']} | {r['max_abs_diff']:.3g} | {100 * r['fraction_differing']:.4f}% |")


def scale(args) -> None:
    sizes = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=args.layers,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    root = Path(args.workdir) / "hf-scale"
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (root / f"expert{args.experts - 1}").exists():
        make_models("llama", root, args.experts, dtype="bfloat16", noise=0.002, sizes=sizes)
    base, experts = root / "base", [root / f"expert{t}" for t in range(args.experts)]
    from subboost.checkpoint_io.huggingface import open_huggingface

    params = sum(int(np.prod(s.shape)) for s in open_huggingface(base).specs.values())
    print(f"models: {params / 1e9:.3f}B parameters, bfloat16, {args.experts} experts "
          f"(made in {time.perf_counter() - start:.0f} s)", flush=True)
    results = {}
    for tool in args.order:
        out = root / f"out-{tool}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "subboost":
            results[tool] = run_subboost(base, experts, out, root / "subboost.log", method="ties",
                                         params=["k=0.2", "scope=per_leaf"], alpha=1.0, chunk_bytes=args.chunk_bytes)
        else:
            results[tool] = run_mergekit(args.mergekit_venv,
                                         mergekit_config("ties", base, experts, weight=1.0, density=0.2),
                                         out, root / "mergekit.log")
        print(tool, json.dumps(results[tool]), flush=True)
    print(json.dumps({"agreement": compare(root / "out-subboost", root / "out-mergekit")}))
    print("| tool | wall (s) | peak RSS (GiB) |")
    print("|---|---:|---:|")
    for tool, r in results.items():
        print(f"| {tool} | {r['wall_s']:.0f} | {r['peak_rss_gib']:.2f} |")
    print(f"wall-time ratio subboost / mergekit: {results['subboost']['wall_s'] / results['mergekit']['wall_s']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("parity", "scale"))
    parser.add_argument("--mergekit-venv", type=Path, default=Path("/work/venvs/mergekit"))
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=28, help="scale: decoder layers (28: about 0.5B parameters)")
    parser.add_argument("--chunk-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--order", nargs="+", default=["subboost", "mergekit"])
    args = parser.parse_args()
    (parity if args.what == "parity" else scale)(args)


if __name__ == "__main__":
    main()
