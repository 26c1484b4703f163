"""Shared fixtures: small parameter trees shaped like a CLIP ViT (built by `tests.trees`)."""

from __future__ import annotations

try:  # torchvision must be loaded before TensorFlow in one process (the reverse order segfaults)
    import torchvision  # noqa: F401
except ImportError:
    pass

import numpy as np
import pytest

from tests.trees import perturbed, vit_like_params  # noqa: F401  (re-exported: `from tests.conftest import ...`)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def experts(rng):
    """(pretrained, [expert_1..expert_4]) with small task vectors."""
    base = vit_like_params(rng)
    return base, perturbed(base, rng, num=4)
