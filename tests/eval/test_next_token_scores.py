"""Perplexity and top-1 agreement of causal LMs, against a computation by hand."""

import copy
import math

import pytest
import torch
from test_fidelity_metrics import WordTokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from curkernels.eval import perplexity, score_next_tokens, top1_agreement

TEXT = " ".join(f"w{i % 13}" for i in range(20))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=64)).eval()


def by_hand(model, ids, window):
    """Consecutive windows of `window` tokens; in each, token t is predicted from tokens < t
    of the same window."""
    nll, predictions = [], []
    for begin in range(0, len(ids), window):
        chunk = ids[begin:begin + window]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([chunk])).logits[0]
        for t in range(1, len(chunk)):
            nll.append(-torch.log_softmax(logits[t - 1], dim=-1)[chunk[t]].item())
            predictions.append(int(logits[t - 1].argmax()))
    return nll, predictions


def test_consecutive_windows_match_the_hand_computation(model):
    ids = WordTokenizer()(TEXT)["input_ids"][0]
    nll, predictions = by_hand(model, ids.tolist(), window=8)
    scores = score_next_tokens(model, ids, window=8, stride=8)
    assert scores.count == len(nll) == 7 + 7 + 3  # a window's first token is context only
    assert scores.nll == pytest.approx(sum(nll), rel=1e-5)
    assert scores.predictions.tolist() == predictions
    assert scores.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert perplexity(model, WordTokenizer(), TEXT, window=8, stride=8) == pytest.approx(
        scores.perplexity)


def test_agreement_counts_equal_top1_predictions(model):
    ids = WordTokenizer()(TEXT)["input_ids"][0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn_like(p))
    _, mine = by_hand(model, ids.tolist(), window=8)
    _, theirs = by_hand(other, ids.tolist(), window=8)
    expected = sum(a == b for a, b in zip(mine, theirs, strict=True)) / len(mine)
    assert 0 < expected < 1  # the perturbation changed some predictions, not all
    ours = score_next_tokens(model, ids, window=8, stride=8)
    assert ours.agreement(score_next_tokens(other, ids, window=8, stride=8)) == pytest.approx(
        expected)
    assert ours.agreement(ours) == 1.0
    assert top1_agreement(other, model, WordTokenizer(), TEXT, window=8,
                          stride=8) == pytest.approx(expected)


def test_agreement_needs_the_same_positions(model):
    ids = WordTokenizer()(TEXT)["input_ids"][0]
    with pytest.raises(ValueError, match="same window and stride"):
        score_next_tokens(model, ids, window=8, stride=8).agreement(
            score_next_tokens(model, ids, window=8, stride=4))


@pytest.mark.parametrize("ids", [torch.tensor([5]), torch.ones(2, 4, dtype=torch.int64)])
def test_scores_need_a_1d_sequence_of_two_tokens(model, ids):
    with pytest.raises(ValueError, match="ids must be 1-D"):
        score_next_tokens(model, ids, window=8, stride=8)
