"""Inference: sampling functions and the generation engine."""

from yunque.engine.engine import Completion, Engine, SamplingParams
from yunque.engine.sampling import check_sampling, filter_top_k, filter_top_p, sample

__all__ = ["Engine", "SamplingParams", "Completion", "sample", "filter_top_k", "filter_top_p", "check_sampling"]
