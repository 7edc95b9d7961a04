"""A fixed random projection of tip embeddings to a few features.

Embedding models answer with hundreds of dimensions, and which model is behind the
``embedder`` alias may change.  Policies need a small, stable layout: every embedding is
multiplied by a Gaussian matrix drawn from a fixed seed (one per input dimension), then
scaled to unit length.  Random projections keep angles roughly (Johnson-Lindenstrauss),
so tips that are close stay close.  :attr:`Projection.version` names the seed and size;
it is part of the feature names, so changing either changes ``feature_version``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Projection:
    dim: int
    seed: int

    @property
    def version(self) -> str:
        return f"rp{self.dim}s{self.seed}"

    def __call__(self, vector: Sequence[float]) -> tuple[float, ...]:
        """The unit-length projection of ``vector`` (zeros stay zeros)."""
        x = np.asarray(vector, dtype=np.float64)
        if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
            raise ValueError(f"an embedding must be a non-empty finite vector, got {x.shape}")
        y = _matrix(self.dim, self.seed, x.size) @ x
        norm = float(np.linalg.norm(y))
        return tuple(float(v) / norm for v in y) if norm > 0 else tuple(0.0 for _ in y)


@functools.lru_cache(maxsize=8)
def _matrix(dim: int, seed: int, n_in: int) -> np.ndarray:
    rng = np.random.default_rng([seed, n_in])
    return rng.standard_normal((dim, n_in)) / math.sqrt(dim)


PROJECTION = Projection(dim=8, seed=20261205)
"""The projection the features use."""


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm > 0 else 0.0
