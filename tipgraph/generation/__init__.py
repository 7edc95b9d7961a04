"""Candidate generation: task tips, LLM tips through LiteLLM aliases, and safe fallbacks."""

from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.llm_config import LLMConfig, LLMConfigError, load_llm_config
from tipgraph.generation.parsing import LLMTip, MalformedAnswer, ParsedTips, parse_tips
from tipgraph.generation.prompts import PromptSplit, PromptTemplate, load_split, task_lines
from tipgraph.generation.source import (
    CandidateSource,
    Completer,
    Completion,
    FallbackReason,
    GenerationItem,
    GenerationResult,
    LLMUnavailable,
    TipGenerator,
)

__all__ = [
    "CandidateSource",
    "CircuitBreaker",
    "Completer",
    "Completion",
    "FallbackReason",
    "GenerationItem",
    "GenerationResult",
    "LLMConfig",
    "LLMConfigError",
    "LLMTip",
    "LLMUnavailable",
    "MalformedAnswer",
    "ParsedTips",
    "PromptSplit",
    "PromptTemplate",
    "TipGenerator",
    "load_llm_config",
    "load_split",
    "parse_tips",
    "task_lines",
]
