"""The compact encodings of the decision log (tipgraph.store.packing)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tipgraph.store import packing


def _texts(n: int) -> list[packing.CandidateTexts]:
    return [
        packing.CandidateTexts(f"c{i}", "focus", "llm", f"tip ✓ {i}", None, "m", "p1")
        for i in range(n)
    ]


def test_candidates_round_trip_bit_for_bit() -> None:
    rng = np.random.default_rng(7)
    # A joint layout: the context in one kind's columns of 6, zero in the others.
    context, kinds = rng.normal(size=10), rng.integers(0, 6, 7)
    X = np.zeros((7, 81))
    for row, kind in enumerate(kinds):
        X[row, kind:60:6] = context
    X[:, 60:] = rng.normal(size=(7, 21))
    X[3, 0] = 5e-324  # a subnormal, and the extremes of float64
    X[4, 1] = -1.7976931348623157e308
    p = rng.dirichlet(np.ones(7))
    packed = packing.pack_candidates(_texts(7), X.tolist(), p.tolist())
    back = packing.unpack_candidates(packed)
    assert back.texts == _texts(7)
    assert back.features.tobytes() == X.tobytes()
    assert back.probabilities.tobytes() == p.tobytes()
    assert back.row("c4") == X[4].tolist()
    with pytest.raises(KeyError):
        back.row("nope")
    # The repeats of a joint layout are what compression removes.
    assert len(packed) < X.nbytes / 2, len(packed)


def test_no_candidates_and_no_features_round_trip() -> None:
    back = packing.unpack_candidates(packing.pack_candidates([], [], []))
    assert back.texts == [] and back.features.shape == (0, 0)
    one = packing.unpack_candidates(packing.pack_candidates(_texts(1), [[]], [1.0]))
    assert one.features.shape == (1, 0) and one.probabilities.tolist() == [1.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        packing.pack_candidates(_texts(2), [[0.0, bad], [1.0, 2.0]], [0.5, 0.5])
    with pytest.raises(ValueError, match="finite"):
        packing.pack_candidates(_texts(2), [[0.0, 1.0], [1.0, 2.0]], [bad, 0.5])
    with pytest.raises(ValueError, match="finite"):
        packing.pack_vector([bad], what="v")


def test_parts_that_disagree_are_refused() -> None:
    with pytest.raises(ValueError, match="2 candidates but 1 feature vectors"):
        packing.pack_candidates(_texts(2), [[0.0]], [0.5, 0.5])
    with pytest.raises(ValueError, match="different lengths"):
        packing.pack_candidates(_texts(2), [[0.0], [0.0, 1.0]], [0.5, 0.5])
    with pytest.raises(ValueError, match="at most 65535"):
        packing.pack_candidates(_texts(1), [[0.0] * 70_000], [1.0])


def test_values_it_did_not_make_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown packed-candidates format"):
        packing.unpack_candidates(b"\x02abc")
    with pytest.raises(ValueError, match="corrupt"):
        packing.unpack_candidates(packing.FORMAT_V1 + b"not zlib")
    with pytest.raises(ValueError, match="unknown packed-vector format"):
        packing.unpack_vector(b"")


def test_vectors_and_floats_round_trip() -> None:
    values = [0.0, 1 / 3, -2.5e-300, 7.0]
    assert packing.unpack_vector(packing.pack_vector(values, what="v")) == values
    assert packing.unpack_floats(packing.pack_floats(values, what="p")) == values
    assert packing.unpack_floats(memoryview(packing.pack_floats(values, what="p"))) == values
