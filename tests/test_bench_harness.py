"""The benchmark harness on a toy suite registered through the suite registry; seed summaries; grids."""

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost import grids
from subboost.bench import pipeline
from subboost.bench.report import markdown_report, method_label, seed_summary
from subboost.bench.settings import DEFAULT_FIXED_ALPHAS, DEFAULT_METHOD_KWARGS
from subboost.bench.suites import Suite, available_suites, get_suite, register_suite


# ----------------------------------------------------------------------------
# A toy suite: one 6x6 matrix, "accuracy" = closeness to each expert
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    suite: ClassVar[str] = "toy"
    name: str = "tiny"
    num_tasks: int = 3
    task_counts: tuple[int, ...] = (2, 3)
    methods: tuple[str, ...] | None = ("task_arithmetic", "ties", "tsv", "iso_c")
    method_kwargs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_METHOD_KWARGS))
    fixed_alphas: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_FIXED_ALPHAS))
    alphas: tuple[float, ...] = (0.25, 0.5, 1.0)
    betas: tuple[float, ...] = grids.PAPER_BETAS
    sweep_methods: tuple[str, ...] = ("task_arithmetic",)
    sweep_betas: tuple[float, ...] = (0.0, 0.5, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def toy_prepare(config: ToyConfig, *, seed: int, cache_dir, progress: bool = True, log=print) -> pipeline.TrainedSuite:
    rng = np.random.default_rng(seed)
    base = {"layer": {"kernel": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)}}
    deltas = [np.outer(rng.standard_normal(6), rng.standard_normal(6)) for _ in range(config.num_tasks)]
    experts = {"layer": {"kernel": jnp.stack([base["layer"]["kernel"] + d.astype(np.float32) for d in deltas])}}

    def evaluator(num_tasks: int):
        def evaluate(tau, alphas, split):
            shift = 0.0 if split == "val" else 0.01
            moved = [float(a) * np.asarray(tau["layer"]["kernel"]) for a in alphas]
            return np.array([[1 / (1 + shift + np.linalg.norm(m - deltas[t])) for t in range(num_tasks)]
                             for m in moved])
        return evaluate

    expert_test = np.full(config.num_tasks, 1 / 1.01)
    pretrained_test = np.array([1 / (1.01 + np.linalg.norm(d)) for d in deltas])
    return pipeline.TrainedSuite(
        config, seed, base, experts, evaluator, pretrained_test, expert_test,
        [{"name": f"task{t}", "num_classes": 2} for t in range(config.num_tasks)],
        lambda: {"toy": True}, Path(cache_dir) / "key", False, {}, {"benchmark": "toy"})


def toy_tables(results: dict[str, Any]) -> str:
    from subboost.bench.report import accuracy_table

    return accuracy_table(results) + "\n"


@pytest.fixture(scope="module")
def toy_suite():
    try:
        return get_suite("toy")
    except ValueError:
        return register_suite(Suite("toy", "a toy suite for the tests", ("tiny",), lambda size="tiny", **kw: ToyConfig(),
                                    toy_prepare, toy_tables, "Toy suite", "results/toy"))


def test_builtin_suites_are_registered_by_name():
    assert {"vision", "text"} <= set(available_suites())
    assert get_suite("vision").name == "vision" and get_suite("vision").default_out == "results/vision"
    assert get_suite("text").default_out == "results/text"
    assert get_suite("vision").get_config("tiny").suite == "vision" and get_suite("text").get_config("tiny").suite == "text"
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'.*vision"):
        get_suite("nope")


def test_a_suite_name_registers_once(toy_suite):
    assert register_suite(toy_suite) is toy_suite  # the same record again is fine
    with pytest.raises(ValueError, match="already registered"):
        register_suite(dataclasses.replace(toy_suite, title="another"))


def test_toy_suite_runs_through_the_harness(toy_suite, tmp_path):
    results = pipeline.run_benchmark(ToyConfig(), seed=0, out_dir=tmp_path / "run", progress=False, log=lambda _: None)
    assert results["suite"] == "toy" and results["benchmark"] == "toy" and results["regime"] == {"toy": True}
    for name in ("results.json", "results.md", "accuracy_vs_tasks.png", "stable_rank_vs_tasks.png", "boost_sweep.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"] == results["settings"]
    for setting in results["settings"]:
        assert set(setting["methods"]) == {"task_arithmetic", "ties", "tsv", "iso_c"}
        for entry in setting["methods"].values():
            assert entry["boosted"]["beta"] in ToyConfig.betas and entry["boosted"]["beta"] in entry["boosted"]["equivalent_betas"]
            assert entry["boosted"]["stable_rank"] >= entry["plain"]["stable_rank"] - 1e-4
    # Task Arithmetic at 3 tasks by hand: the mean of the rank-one deltas, scaled by the chosen alpha.
    trained = toy_prepare(ToyConfig(), seed=0, cache_dir=tmp_path)
    tau = pipeline.task_vectors_of(trained.base, trained.experts, 3)["layer"]["kernel"].sum(axis=0)
    entry = results["settings"][1]["methods"]["task_arithmetic"]["plain"]
    expected = trained.evaluator(3)({"layer": {"kernel": tau}}, [entry["alpha"]], "test")[0]
    np.testing.assert_allclose(entry["test_accuracy"], expected, rtol=1e-5)
    assert entry["stable_rank"] == pytest.approx(float(sb.stable_rank(jnp.asarray(tau))), rel=1e-5)
    sweep = results["boost_sweep"]
    assert [row["beta"] for row in sweep["methods"]["task_arithmetic"]] == [0.0, 0.5, 1.0]
    assert "Task Arithmetic + boost" in (tmp_path / "run" / "results.md").read_text()
    assert markdown_report(results).startswith("| method |")


def test_seed_summary_is_mean_and_sample_sd_over_runs(toy_suite, tmp_path):
    paths, config = [], ToyConfig(methods=("ties", "iso_c"))
    for seed in (0, 1, 2):
        pipeline.run_benchmark(config, seed=seed, out_dir=tmp_path / f"seed{seed}", progress=False,
                               log=lambda _: None)
        paths.append(tmp_path / f"seed{seed}" / "results.json")
    markdown, summary = seed_summary(paths)
    runs = [json.loads(p.read_text()) for p in paths]
    values = [r["settings"][0]["methods"]["ties"]["boosted"]["normalized"] for r in runs]
    stats = summary["settings"]["2"]["ties/boosted"]["normalized"]
    assert stats["mean"] == pytest.approx(np.mean(values)) and stats["sd"] == pytest.approx(np.std(values, ddof=1))
    assert summary["seeds"] == [0, 1, 2] and len(summary["boost_sweep"]["methods"]["task_arithmetic"]) == 3
    assert f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}" in markdown
    assert "Iso-C + boost" in markdown and "seeds 0, 1, 2" in markdown
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**runs[0], "size": "default"}))
    with pytest.raises(ValueError, match="size default"):
        seed_summary([paths[0], other])


def test_method_display_names_come_from_the_registry():
    from subboost.merging.registry import METHODS

    assert method_label("tsv") == "TSV-M" and method_label("dare") == METHODS["dare"].display_name
    assert all(re.fullmatch(r"\d{4}\.\d{5}", record.reference) for record in METHODS.values())
    assert method_label("not_a_method") == "not_a_method"


def test_the_beta_default_lives_in_one_signature():
    """``0.01`` is written only in `subspace_boost`'s signature and the grids module (one home for defaults)."""
    root = Path(sb.__file__).parent
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"\b0\.01\b", line) and p.name not in ("grids.py", "boosting.py")]
    assert hits == []
    assert grids.DEFAULT_BETA in grids.PAPER_BETAS
    assert DEFAULT_METHOD_KWARGS["ties"]["k"] == 0.2 and DEFAULT_METHOD_KWARGS["dare"]["p"] == 0.9
