"""Generation stage: candidate tips. Task mode now; LLM mode plugs in as another source."""

from __future__ import annotations

from ray import serve

from tipgraph.candidates import Candidate, CandidateSource, task_candidates
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.settings import TipgraphSettings


@serve.deployment(name="generation")
class CandidateGenerator:
    def __init__(self, settings: TipgraphSettings) -> None:
        self._settings = settings
        # Task mode is the embedded default; an LLM source slots in here.
        self._source: CandidateSource = task_candidates

    def generate(self, request: TipRequest, context: UserContext, n: int) -> list[Candidate]:
        return list(self._source(request, context, n))
