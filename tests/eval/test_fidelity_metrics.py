import math

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from curkernels.eval import (
    embedding_cosine,
    encode,
    holdout_split,
    mean_pool,
    pair_spearman,
    perplexity,
    read_sts_pairs,
    sts_spearman,
)


class WordTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (ids 3..), pads with 0."""

    pad_token = "[PAD]"

    def __init__(self, vocab=50):
        self.vocab = vocab

    def _ids(self, text):
        return [3 + (sum(map(ord, w)) % (self.vocab - 3)) for w in text.split()]

    def __call__(self, texts, padding=False, truncation=False, max_length=None,
                 return_tensors="pt"):
        single = isinstance(texts, str)
        rows = [self._ids(t)[:max_length] if truncation else self._ids(t)
                for t in ([texts] if single else texts)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64),
                     add_pooling_layer=False).eval()


def test_mean_pool_ignores_pads():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(mean_pool(hidden, torch.tensor([[1, 1, 0]])),
                               torch.tensor([[2.0, 3.0]]))


def test_encode_keeps_input_order_and_padding_free(bert):
    tok = WordTokenizer()
    sentences = ["a b c d e f", "x", "the cat sat", "y z"]
    together = encode(bert, tok, sentences, batch_size=2)
    alone = torch.cat([encode(bert, tok, [s]) for s in sentences])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(4))
    assert embedding_cosine(alone, together) == pytest.approx(1.0, abs=1e-5)


def test_sts_tsv_reading_and_spearman(bert, tmp_path):
    rows = [("g", "f", "2012", "0001", "5.0", 'He said "hi" loudly', 'He said "hi" loudly'),
            ("g", "f", "2012", "0002", "0.5", "a b c", "x y z w"),
            ("g", "f", "2012", "0003", "2.5", "one two", "one three")]
    path = tmp_path / "sts.tsv"
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    left, right, scores = read_sts_pairs(path)
    assert left[0] == 'He said "hi" loudly' and scores == [5.0, 0.5, 2.5]
    value = sts_spearman(bert, WordTokenizer(), left, right, scores)
    assert -100 <= value <= 100
    # identical sentences score highest: perfect rank agreement on this ordering
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert pair_spearman(a, b, [5.0, 0.5, 2.5]) == pytest.approx(100.0)


def test_bad_tsv_raises(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("only\tthree\tfields\n")
    with pytest.raises(ValueError, match="fields"):
        read_sts_pairs(path)


def test_holdout_split_is_a_deterministic_partition():
    tune, check = holdout_split(1500, seed=0)
    assert len(tune) == len(check) == 750
    assert sorted(tune + check) == list(range(1500)) and tune == sorted(tune)
    assert (tune, check) == holdout_split(1500, seed=0)
    assert holdout_split(1500, seed=1)[0] != tune
    assert tune[:3] != [0, 1, 2]  # shuffled, not the first half
    small_tune, small_check = holdout_split(5, tune_fraction=0.4)
    assert len(small_tune) == 2 and len(small_check) == 3


@pytest.mark.parametrize("count,fraction", [(1, 0.5), (10, 0.0), (10, 1.0), (2.5, 0.5)])
def test_holdout_split_bad_input(count, fraction):
    with pytest.raises(ValueError):
        holdout_split(count, fraction)


class UniformLM(torch.nn.Module):
    """Logits all zero: every next token has probability 1/V, perplexity exactly V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        class Out:
            logits = torch.zeros(*input_ids.shape, self.vocab)
        return Out()


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (100, 50)])
def test_perplexity_of_uniform_model_is_vocab_size(window, stride):
    text = " ".join(f"w{i}" for i in range(40))
    assert perplexity(UniformLM(50), WordTokenizer(), text, window=window,
                      stride=stride) == pytest.approx(50.0)


def test_perplexity_scores_each_token_once():
    """Windows that overlap must give the same value as one window covering everything."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         max_position_embeddings=64)).eval()
    text = " ".join(f"w{i}" for i in range(30))
    full = perplexity(model, WordTokenizer(), text, window=64, stride=64)
    assert math.isfinite(full) and full > 1
    # stride = 1 with a full-length window is exact too (every token sees its whole prefix)
    assert perplexity(model, WordTokenizer(), text, window=64, stride=1) == pytest.approx(full,
                                                                                          rel=1e-4)


def test_perplexity_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        perplexity(UniformLM(5), WordTokenizer(), "a b c", window=4, stride=5)
