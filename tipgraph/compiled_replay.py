"""Progressive replay of the ridge policies in compiled code (numba).

Tuning replays the whole log once per trial: each event's distribution from the model
learned on the events before it, then one update.  In numpy that loop makes about 15
small calls per event, and the calls, not the arithmetic, bound it (BENCHMARKS.md).  This
module is the same loop for the policies whose distribution is a deterministic function
of the ridge model, compiled, so a call costs nothing:

* LinUCB, ε-greedy, softmax and SquareCB, on :class:`~tipgraph.policies.RidgeStats`
  (the statistics that keep everything; a forgetting policy recomputes A⁻¹ after every
  update anyway, which numpy does as fast);
* LinTS samples from a numpy ``Generator`` per event, which compiled code cannot
  reproduce draw for draw, and stays on the reference loop.

``Policy.replay(..., reference=True)`` is the reference: it is the code
serving runs, one :meth:`~tipgraph.policies.Policy.distribution` and
:meth:`~tipgraph.policies.Policy.update` per event.  ``tests/test_compiled_replay.py``
pins this module to it (probabilities within 1e-12, the learned state within 1e-9
relative, on random logs of every kind).  Change one, change the other.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

# What each kind's distribution is, in the kernel's terms.
KIND_CODES: dict[str, int] = {"linucb": 0, "egreedy": 1, "softmax": 2, "squarecb": 3}
TIE_TOLERANCE = 1e-12  # policies.argmax_mass: exact ties share the mass

_kernel: Any = None


def _compile() -> Any:
    import numba  # heavy (a second to import), and serving never replays

    # numba's cache sits beside this file unless NUMBA_CACHE_DIR says otherwise (the
    # image's read-only root filesystem: k3s sets it to /tmp).

    cache = os.access(os.path.dirname(__file__), os.W_OK) or "NUMBA_CACHE_DIR" in os.environ

    # "reassoc" lets the dot products' sums vectorize, "contract" fuses multiply-adds: the
    # sums round differently, as numpy's BLAS calls in the reference do in their own way
    # (the test pins the two within 1e-12).  No "nnan"/"ninf": NaN and inf keep their meaning.
    @numba.njit(cache=cache, nogil=True, fastmath={"reassoc", "contract"})
    def ridge_replay(
        X: np.ndarray,
        bounds: np.ndarray,
        rows: np.ndarray,
        rewards: np.ndarray,
        A_inv: np.ndarray,
        gram: np.ndarray,
        b: np.ndarray,
        ridge: float,
        refresh_every: int,
        since_refresh: int,
        kind: int,
        alpha: float,
        temperature: float,
        gamma: float,
        epsilon: float,
    ) -> tuple[np.ndarray, int]:
        n_rows, d = X.shape
        pi = np.empty(n_rows)
        Ax = np.empty(d)
        xA = np.empty(d)
        theta = np.empty(d)
        for i in range(len(bounds) - 1):
            start, stop = bounds[i], bounds[i + 1]
            k = stop - start
            block = X[start:stop]
            scores = np.empty(k)
            if kind == 0:
                # θ̂ᵀx = xᵀA⁻¹b and the width xᵀA⁻¹x from one pass over xᵀA⁻¹.
                for j in range(k):
                    xA.fill(0.0)
                    for a in range(d):
                        xa = block[j, a]
                        if xa != 0.0:
                            for c in range(d):
                                xA[c] += xa * A_inv[a, c]
                    mean = 0.0
                    width = 0.0
                    for c in range(d):
                        mean += xA[c] * b[c]
                        width += xA[c] * block[j, c]
                    scores[j] = mean + alpha * math.sqrt(max(width, 0.0))
            else:
                for a in range(d):
                    total = 0.0
                    for c in range(d):
                        total += A_inv[a, c] * b[c]
                    theta[a] = total
                for j in range(k):
                    total = 0.0
                    for a in range(d):
                        total += block[j, a] * theta[a]
                    scores[j] = total
            p = np.zeros(k)
            best = 0
            for j in range(1, k):
                if scores[j] > scores[best]:
                    best = j
            if kind == 2:
                top = scores.max()
                total = 0.0
                for j in range(k):
                    p[j] = math.exp((scores[j] - top) / temperature)
                    total += p[j]
                for j in range(k):
                    p[j] /= total
            elif kind == 3:
                total = 0.0
                for j in range(k):
                    if j != best:
                        p[j] = 1.0 / (k + gamma * (scores[best] - scores[j]))
                        total += p[j]
                p[best] = 1.0 - total
            else:
                ties = 0
                for j in range(k):
                    if scores[j] >= scores[best] - TIE_TOLERANCE:
                        ties += 1
                if ties > 1:
                    for j in range(k):
                        if scores[j] >= scores[best] - TIE_TOLERANCE:
                            p[j] = 1.0 / ties
                else:
                    p[best] = 1.0
            if epsilon:
                for j in range(k):
                    p[j] = p[j] * (1.0 - epsilon) + epsilon / k
            pi[start:stop] = p

            x = X[rows[i]]
            r = rewards[i]
            for a in range(d):
                b[a] += r * x[a]
                for c in range(d):
                    gram[a, c] += x[a] * x[c]
            since_refresh += 1
            if since_refresh >= refresh_every:
                A = gram.copy()
                for a in range(d):
                    A[a, a] += ridge
                A_inv[:, :] = np.linalg.inv(A)
                since_refresh = 0
            else:
                # As RidgeStats.update orders it: the vector divided, then the outer
                # product (fused multiply-subtracts here, so rounded once, not twice).
                xAx = 0.0
                for a in range(d):
                    total = 0.0
                    for c in range(d):
                        total += A_inv[a, c] * x[c]
                    Ax[a] = total
                    xAx += x[a] * total
                v = Ax / (1.0 + xAx)
                for a in range(d):
                    for c in range(d):
                        A_inv[a, c] -= Ax[a] * v[c]
        return pi, since_refresh

    return ridge_replay


def ridge_kernel() -> Any:
    """The compiled loop, compiled on first use (about 2 s, then from numba's cache)."""
    global _kernel
    if _kernel is None:
        _kernel = _compile()
    return _kernel
