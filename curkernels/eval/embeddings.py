"""Sentence-embedding fidelity: mean-pooled embeddings (as sentence-transformers pools
all-MiniLM-L6-v2), their cosine to the dense model's, and STS Spearman correlation."""

import csv
import random
from pathlib import Path

import scipy.stats
import torch
from torch import nn
from torch.nn import functional as F

from ..compress.calibration import mean_pool


@torch.no_grad()
def encode(model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 64,
           max_length: int = 256, normalize: bool = True) -> torch.Tensor:
    """(len(sentences), d) mean-pooled sentence embeddings, L2-normalised by default."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # longest first, as sentence-transformers does: batches of similar length pad little
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out = []
    try:
        for start in range(0, len(sentences), batch_size):
            texts = [sentences[i] for i in order[start:start + batch_size]]
            batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model(**batch).last_hidden_state.float()
            pooled = mean_pool(hidden, batch["attention_mask"])
            out.append(F.normalize(pooled, dim=-1) if normalize else pooled)
    finally:
        model.train(was_training)
    embeddings = torch.empty(len(sentences), out[0].shape[-1]) if out else torch.empty(0, 0)
    if out:
        embeddings[torch.tensor(order)] = torch.cat(out).cpu()
    return embeddings


def embedding_cosine(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (e.g. compressed vs dense)."""
    if reference.shape != embeddings.shape:
        raise ValueError(f"embeddings must match the reference's shape {tuple(reference.shape)}, "
                         f"got {tuple(embeddings.shape)}")
    return float(F.cosine_similarity(reference.float(), embeddings.float(), dim=-1).mean())


def read_sts_pairs(path: str | Path, score_column: int = 4, first_column: int = 5
                   ) -> tuple[list[str], list[str], list[float]]:
    """(sentences 1, sentences 2, gold scores) from an STS Benchmark-style TSV (genre, file,
    year, id, score, sentence 1, sentence 2). Quotes are literal text in these files."""
    left, right, scores = [], [], []
    with open(path, encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle, delimiter="\t",
                                                     quoting=csv.QUOTE_NONE), 1):
            if len(row) <= first_column + 1:
                raise ValueError(f"{path}:{line_number}: expected at least {first_column + 2} "
                                 f"tab-separated fields, got {len(row)}")
            scores.append(float(row[score_column]))
            left.append(row[first_column])
            right.append(row[first_column + 1])
    if not scores:
        raise ValueError(f"{path} holds no sentence pairs")
    return left, right, scores


def pair_spearman(left: torch.Tensor, right: torch.Tensor, scores: list[float]) -> float:
    """Spearman correlation ×100 between the cosine of paired embeddings and gold scores."""
    cosine = F.cosine_similarity(left.double(), right.double(), dim=-1).numpy()
    return 100 * float(scipy.stats.spearmanr(cosine, scores).statistic)


def sts_spearman(model: nn.Module, tokenizer, left: list[str], right: list[str],
                 scores: list[float], **encode_options) -> float:
    """STS score of `model`: `pair_spearman` of the two sentences' embeddings."""
    if not len(left) == len(right) == len(scores):
        raise ValueError(f"left, right and scores must have one entry a pair, got "
                         f"{len(left)}, {len(right)} and {len(scores)}")
    embeddings = encode(model, tokenizer, left + right, **encode_options)
    return pair_spearman(embeddings[:len(left)], embeddings[len(left):], scores)


def holdout_split(count: int, tune_fraction: float = 0.5, seed: int = 0
                  ) -> tuple[list[int], list[int]]:
    """(tune, check): sorted indices of a seeded random split of `count` items (e.g. the pairs
    of an STS file) — choices are made on `tune`, results confirmed on the held-out `check`.
    The same (count, fraction, seed) always gives the same split."""
    if not isinstance(count, int) or count < 2:
        raise ValueError(f"count must be an integer ≥ 2, got {count!r}")
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction!r}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = min(count - 1, max(1, round(tune_fraction * count)))
    return sorted(order[:cut]), sorted(order[cut:])
