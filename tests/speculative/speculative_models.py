"""Tiny random causal LMs long enough for 64 generated tokens, and calibration batches."""

import torch
from model_configs import DECODER_SHAPE
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

LOW_RANK = 6
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM),
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def causal_lm(architecture: str, *, seed: int = 0, num_layers: int = 3, vocab_size: int = 96,
              initializer_range: float = 0.1, block_rank: int | None = LOW_RANK):
    """Weights larger than the default init make peaked next-token distributions, so greedy
    choices are clear. With `block_rank`, every Linear in the blocks is cut to that rank (its
    truncated SVD): a CUR draft of rank ≥ block_rank then reproduces those Linears, so a
    draft can agree with its target, as a trained one does on a real model."""
    config_class, model_class = ARCHITECTURES[architecture]
    shape = {**DECODER_SHAPE, "num_hidden_layers": num_layers, "vocab_size": vocab_size,
             "max_position_embeddings": 128, "initializer_range": initializer_range}
    torch.manual_seed(seed)
    model = model_class(config_class(**shape)).eval()
    if block_rank is not None:
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    left, sigma, right = torch.linalg.svd(module.weight, full_matrices=False)
                    module.weight.copy_(left[:, :block_rank] * sigma[:block_rank]
                                        @ right[:block_rank])
    return model


def calibration_batches(vocab_size: int = 96, count: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab_size, (8, 32), generator=generator)}
            for _ in range(count)]
