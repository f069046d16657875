"""Shared test fixtures. The toolkit the tests import (scenes, the tiny model) is tests/helpers.py."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import make_scene

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def scenes():
    rng = np.random.default_rng(0)
    return [make_scene(rng, f"scene_{i:03d}", n_points=int(rng.integers(200, 800)),
                       n_objects=int(rng.integers(1, 6))) for i in range(12)]
