"""The compact encodings of the decision log (migration 0009): a decision's candidates as
one value, and feature vectors and probabilities as float64 bytes.

One row per candidate and per score cost 8 to 18 KB a decision (JSON floats, an event id
and an index entry on every row).  A decision's candidates are written once and read
together, so they are one value on the decision row instead::

    candidates = FORMAT_V1 || zlib( header | texts (JSON) | X (n × d float64) | p (n float64) )

``X`` is every candidate's joint feature vector, row-major; ``p`` the served policy's
probabilities, in candidate order.  The context block of a joint vector repeats the
decision's context in one of its kind columns and is zero elsewhere, and candidates of one
task or kind share values: zlib removes those repeats exactly, which is what makes the
vectors cheap without this module knowing the feature layout.  Floats go in as IEEE-754
binary64, so what is read back is bit for bit what was written.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FORMAT_V1 = b"\x01"
"""First byte of every packed value: a later format can change everything after it."""

_HEADER = struct.Struct("<HHI")  # candidates, features per candidate, bytes of texts
_MAX_COUNT = 0xFFFF
_FLOAT64 = np.dtype("<f8")
# Level 6 (zlib's default) packs a decision's candidates within a few bytes of level 9 at
# a third of the time; the writer pays it once per decision.
_LEVEL = 6


@dataclass(frozen=True, slots=True)
class CandidateTexts:
    """What the log keeps of a candidate besides its features."""

    candidate_id: str
    kind: str
    source: str
    content: str | None
    task_ref: str | None
    model: str | None
    prompt_version: str | None


@dataclass(frozen=True, slots=True)
class PackedCandidates:
    """A decision's candidates as read back: texts, features (n × d) and the served
    policy's probabilities, all in candidate position order.  The shown tip's text is not
    here (None): the decision row holds it, where the history reads it."""

    texts: list[CandidateTexts]
    features: np.ndarray
    probabilities: np.ndarray

    @property
    def candidate_ids(self) -> list[str]:
        return [t.candidate_id for t in self.texts]

    def row(self, candidate_id: str) -> list[float]:
        """One candidate's features; KeyError when the decision has no such candidate."""
        try:
            index = self.candidate_ids.index(candidate_id)
        except ValueError:
            raise KeyError(candidate_id) from None
        return [float(v) for v in self.features[index]]


def finite_matrix(rows: Sequence[Sequence[float]], *, what: str) -> np.ndarray:
    """Equal-length float rows as a float64 matrix; ValueError for ragged rows, NaN or inf."""
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        if not all(np.all(np.isfinite(np.asarray(row, dtype=_FLOAT64))) for row in rows):
            raise ValueError(f"{what} must be finite floats")
        raise ValueError(f"{what}: feature vectors of different lengths {sorted(widths)}")
    matrix = np.array(rows, dtype=_FLOAT64).reshape(len(rows), widths.pop() if widths else 0)
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{what} must be finite floats")
    return matrix


def pack_candidates(
    texts: Sequence[CandidateTexts],
    features: Sequence[Sequence[float]],
    probabilities: Sequence[float],
) -> bytes:
    """One decision's candidates as one value; ValueError when the parts disagree in
    length or a float is not finite."""
    n = len(texts)
    if len(features) != n or len(probabilities) != n:
        raise ValueError(
            f"{n} candidates but {len(features)} feature vectors and "
            f"{len(probabilities)} probabilities"
        )
    X = finite_matrix(features, what="candidate features")
    if max(n, X.shape[1]) > _MAX_COUNT:
        raise ValueError(f"at most {_MAX_COUNT} candidates and features, got {n} x {X.shape[1]}")
    p = finite_matrix([probabilities], what="probabilities").reshape(n)
    meta = json.dumps(
        [
            [t.candidate_id, t.kind, t.source, t.content, t.task_ref, t.model, t.prompt_version]
            for t in texts
        ],
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()
    body = _HEADER.pack(n, X.shape[1], len(meta)) + meta + X.tobytes() + p.tobytes()
    return FORMAT_V1 + zlib.compress(body, _LEVEL)


def unpack_candidates(raw: bytes | memoryview) -> PackedCandidates:
    """The inverse of :func:`pack_candidates`; ValueError for a value it did not make."""
    data = bytes(raw)
    if data[:1] != FORMAT_V1:
        raise ValueError(f"unknown packed-candidates format {data[:1]!r}")
    try:
        body = zlib.decompress(data[1:])
        n, d, meta_len = _HEADER.unpack_from(body)
        start = _HEADER.size + meta_len
        meta = json.loads(body[_HEADER.size : start])
        X = np.frombuffer(body, _FLOAT64, n * d, start).reshape(n, d)
        p = np.frombuffer(body, _FLOAT64, n, start + 8 * n * d)
    except (zlib.error, struct.error, ValueError) as err:
        raise ValueError(f"corrupt packed candidates: {err}") from err
    return PackedCandidates([CandidateTexts(*m) for m in meta], X, p)


def pack_floats(values: Sequence[float], *, what: str) -> bytes:
    """Float64 bytes (a run's probabilities), uncompressed: a few dozen bytes that do not
    shrink.  ValueError for NaN or inf."""
    return finite_matrix([values], what=what).tobytes()


def unpack_floats(raw: bytes | memoryview) -> list[float]:
    return np.frombuffer(bytes(raw), _FLOAT64).tolist()


def pack_vector(values: Sequence[float], *, what: str) -> bytes:
    """One feature vector (a reward's copy of what it trained on), compressed like a
    decision's candidates: mostly zeros."""
    return FORMAT_V1 + zlib.compress(pack_floats(values, what=what), _LEVEL)


def unpack_vector(raw: bytes | memoryview) -> list[float]:
    data = bytes(raw)
    if data[:1] != FORMAT_V1:
        raise ValueError(f"unknown packed-vector format {data[:1]!r}")
    return unpack_floats(zlib.decompress(data[1:]))
