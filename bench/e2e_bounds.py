"""What a model must move and compute: the bounds each measured speedup is compared with.

Decode at batch 1 is bandwidth-bound: a step reads every projection's weights once, the
lm_head, and the KV cache of the context (the embedding contributes one row). Prefill of a
long prompt is compute-bound: 2 FLOPs per weight entry per token in the projections, plus
causal attention; the lm_head runs for the last position only.
"""

from torch import nn

from curkernels.nn import CURLinear


def _matrix_entries(model: nn.Module) -> tuple[int, int]:
    """(entries in decoder projections, factored or dense; entries in the lm_head)."""
    head = model.get_output_embeddings()
    projections = 0
    for module in model.modules():
        if isinstance(module, CURLinear):
            projections += module.factor_parameters
        elif isinstance(module, nn.Linear) and module is not head:
            projections += module.weight.numel()
    return projections, head.weight.numel()


def kv_entries_per_token(model: nn.Module) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim


def decode_bytes(model: nn.Module, context: int) -> int:
    """Bytes a batch-1 decode step reads at `context` tokens."""
    projections, head = _matrix_entries(model)
    element = next(model.parameters()).element_size()
    return (projections + head + kv_entries_per_token(model) * context) * element


def prefill_flops(model: nn.Module, tokens: int) -> int:
    projections, head = _matrix_entries(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 2 * tokens * tokens * config.num_attention_heads * head_dim  # QKᵀ and PV, causal
    return 2 * tokens * projections + config.num_hidden_layers * attention + 2 * head


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
