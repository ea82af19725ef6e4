"""Tiny random-weight transformers models of the architectures curkernels supports."""

import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

DECODER_SHAPE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER_SHAPE)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER_SHAPE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER_SHAPE)),
    "bert": lambda: BertModel(BertConfig(vocab_size=96, hidden_size=48, intermediate_size=80,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=64)),
}
# Linears per block: decoders q, k, v, o, gate, up, down; BERT q, k, v, attn-out, inter, out.
BLOCK_LINEARS = {"llama": 7, "mistral": 7, "qwen2": 7, "bert": 6}


def tiny_model(architecture: str, seed: int = 0):
    torch.manual_seed(seed)
    return ARCHITECTURES[architecture]().eval()


def sample_inputs(seed: int = 1, batch: int = 2, length: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded row, as real batches have
    return {"input_ids": ids, "attention_mask": mask}


def model_outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
