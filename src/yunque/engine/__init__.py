"""Inference: sampling functions, the generation engine and its step API."""

from yunque.engine.engine import Batch, Completion, Engine, Row, Sampled, SamplingParams
from yunque.engine.sampling import check_sampling, filter_top_k, filter_top_p, sample, token_logprobs

__all__ = ["Batch", "Completion", "Engine", "Row", "Sampled", "SamplingParams", "check_sampling", "filter_top_k",
           "filter_top_p", "sample", "token_logprobs"]
