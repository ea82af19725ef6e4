import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96
# tiny matrices: one thread avoids OpenMP spin-waits that slow a loaded 2-core box 10×+
torch.set_num_threads(1)


def random_batches(count=3, batch=4, length=12, seed=0, pad_last=3):
    """Input dicts with right padding on the last sequence of each batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[-1, length - pad_last:] = 0
        ids[-1, length - pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def batches():
    return random_batches()
