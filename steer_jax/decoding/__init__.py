"""Jitted generation on device: prefill, decode loop, sampling, confidence measures, step ends."""

from steer_jax.decoding.generate import GenerateResult, generate
from steer_jax.decoding.sampler import (MEASURES, Greedy, Sample, decode, make_sampler, read,
                                        rollback, step_confidence, token_measures)
from steer_jax.decoding.steps import VocabMasks, build_masks, vocab_masks

__all__ = ["MEASURES", "GenerateResult", "Greedy", "Sample", "VocabMasks", "build_masks", "decode",
           "generate", "make_sampler", "read", "rollback", "step_confidence", "token_measures",
           "vocab_masks"]
