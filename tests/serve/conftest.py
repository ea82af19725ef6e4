"""Tiny random causal LMs and a byte-level tokenizer trained on the spot (no downloads)."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import curkernels as ck

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
CHECKPOINT_NAME = "tiny-llama-svd"
TRAINING_TEXT = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ça va? 日本語",
                 "compressed models serve tokens faster", "0123456789 +-*/ ()[]{}"] * 8


@pytest.fixture(scope="session")
def tokenizer():
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")


def tiny_causal_lm(architecture: str, vocab_size: int, seed: int = 0):
    """A 2-layer model small enough that tests stay fast, in eval mode, fp32, sdpa attention."""
    config_class, model_class = ARCHITECTURES[architecture]
    config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, eos_token_id=0, bos_token_id=None,
                          pad_token_id=None, tie_word_embeddings=False,
                          attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_class(config).eval()


@pytest.fixture(scope="session")
def checkpoint(tokenizer, tmp_path_factory):
    """A folder named CHECKPOINT_NAME: a tiny Llama factored by SVD at keep 0.5, saved with its
    tokenizer."""
    model = tiny_causal_lm("llama", len(tokenizer))
    ck.compress(model, method="svd", keep=0.5)
    folder = tmp_path_factory.mktemp("checkpoint") / CHECKPOINT_NAME
    ck.save_compressed(model, folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The models here are tiny: extra OpenMP threads only spin-wait, and on a busy 2-core
    machine that makes these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
