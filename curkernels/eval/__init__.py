"""Fidelity of a compressed model: perplexity for causal LMs, embedding similarity and STS
correlation for sentence encoders."""

from .embeddings import (
                         embedding_cosine,
                         encode,
                         holdout_split,
                         mean_pool,
                         pair_spearman,
                         read_sts_pairs,
                         sts_spearman,
)
from .perplexity import (
                         NextTokenScores,
                         perplexity,
                         score_next_tokens,
                         text_token_ids,
                         top1_agreement,
)

__all__ = ["NextTokenScores", "embedding_cosine", "encode", "holdout_split", "mean_pool",
           "pair_spearman", "perplexity", "read_sts_pairs", "score_next_tokens", "sts_spearman",
           "text_token_ids", "top1_agreement"]
