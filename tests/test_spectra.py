"""Spectral diagnostics against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

import subboost as sb
from subboost.errors import SubboostError
from tests import numpy_reference as ref
from tests.conftest import vit_like_params


def test_stable_and_energy_rank_known_values():
    m = jnp.diag(jnp.array([2.0, 1.0, 1.0]))
    assert float(sb.stable_rank(m)) == pytest.approx(1.5)
    # energies 4, 1, 1 of 6: 0.95 needs all three, 0.8 needs two, 0.5 one.
    assert int(sb.energy_rank(m, fraction=0.95)) == 3
    assert int(sb.energy_rank(m, fraction=0.8)) == 2
    assert int(sb.energy_rank(m, fraction=0.5)) == 1
    assert float(sb.stable_rank(jnp.zeros((3, 3)))) == 0.0
    assert int(sb.energy_rank(jnp.zeros((3, 3)))) == 0


def test_tree_diagnostics_are_keyed_by_module_path_and_match_numpy(rng):
    params = vit_like_params(rng)
    ranks = sb.stable_rank(params)
    energies = sb.energy_rank(params, fraction=0.9)
    flat = ref.flat(params)
    expected = {p.rsplit("/", 1)[0]: ref.torch_matrix(p, x) for p, x in flat.items() if ref.is_default_matrix(p, x.shape)}
    assert set(ranks) == set(expected)
    assert "transformer/resblocks_1/attn/query" in ranks
    for name, matrix in expected.items():
        assert float(ranks[name]) == pytest.approx(ref.stable_rank(matrix), rel=1e-4)
        assert int(energies[name]) == ref.energy_rank(matrix, 0.9)


def test_spectra_with_expert_axis(rng):
    params = vit_like_params(rng)
    stacked = {"m": {"kernel": jnp.stack([params["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"]] * 3)}}
    s = sb.spectra(stacked, lead_ndim=1)["m"]
    assert s.shape == (3, 8)
    np.testing.assert_allclose(s[0], s[2])


@pytest.mark.parametrize("fraction", [1.5, 0.0, -0.1, float("nan"), "0.9", True])
def test_energy_fraction_checked(fraction):
    with pytest.raises(SubboostError, match=r"energy_rank: fraction must be in \(0, 1\]"):
        sb.energy_rank(jnp.ones((2, 2)), fraction=fraction)
