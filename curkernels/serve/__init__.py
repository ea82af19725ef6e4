"""Serve compressed models: static-cache generation (eager or compiled), text streaming,
loading. The HTTP layer (`curkernels.serve.server`) needs the `serve` extra (fastapi)."""

from .generation import StaticCacheGenerator, end_of_sequence_ids
from .loading import load_for_inference
from .sampling import sample_next_token
from .text_stream import IncrementalDetokenizer, StopMatcher

__all__ = ["IncrementalDetokenizer", "StaticCacheGenerator", "StopMatcher",
           "end_of_sequence_ids", "load_for_inference", "sample_next_token"]
