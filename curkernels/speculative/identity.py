"""The identity of a draft's base model: its shape-defining config keys and a weight checksum.

A delta checkpoint only makes sense on the exact weights it was cut from, so it records both
and `load_draft` compares them. The checksum hashes a strided sample of every tensor (at most
`SAMPLE` entries each, rounded to bfloat16 so the same weights loaded in fp32, bf16 or fp16
from a bf16 source agree): cheap on any model, and it changes when any tensor is retrained.
"""

import hashlib

import torch
from torch import nn

CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
               "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "tie_word_embeddings")
SAMPLE = 4096


def base_config(model: nn.Module) -> dict:
    config = model.config.to_dict()
    return {key: config.get(key) for key in CONFIG_KEYS}


@torch.no_grad()
def weight_checksum(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // SAMPLE)][:SAMPLE]
        if sample.is_floating_point():
            sample = sample.to(torch.bfloat16).view(torch.int16)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_identity(model: nn.Module) -> dict:
    return {"config": base_config(model), "checksum": weight_checksum(model)}


def identity_mismatch(recorded: dict, model: nn.Module) -> str | None:
    """Why `model` is not the base `recorded` describes, or None when it is."""
    config = base_config(model)
    differing = [f"{key}: draft's base {recorded['config'].get(key)!r}, target {config[key]!r}"
                 for key in CONFIG_KEYS if recorded["config"].get(key) != config[key]]
    if differing:
        return "its config differs (" + "; ".join(differing) + ")"
    if recorded["checksum"] != weight_checksum(model):
        return "its weights differ (checksum mismatch): the draft was cut from other weights"
    return None
