"""Tiny compressed Llama and Qwen2 checkpoints whose shapes vLLM's CPU attention takes
(head_dim 32), and the greedy continuations transformers gives for them."""

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import curkernels as ck

SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             initializer_range=0.1, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM),
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
# method -> compress() options giving different ranks per module and per merged shard
METHOD_OPTIONS = {
    "svd": dict(keep=0.5),
    "svdllm": dict(keep=0.5, allocation="global"),
    "curing": dict(keep=0.6, layers=[0, 1]),
    "rom": dict(keep=0.5),
}
DEFAULT_METHOD_KEEP = 0.5  # compress() with no method: "pairwise", which writes NarrowLinear


def calibration_batches(seed: int = 0, batches: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, SHAPE["vocab_size"], (4, 32), generator=generator)
           for _ in range(batches)]
    return [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]


def dense_model(architecture: str, seed: int = 0):
    config_class, model_class = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    return model_class(config_class(**SHAPE)).eval()


def write_compressed(architecture: str, method: str | None, out_dir) -> dict:
    """Compress a tiny model with `method` (None: compress()'s default) and save it to
    `out_dir`; returns its module specs."""
    model = dense_model(architecture)
    options = dict(keep=DEFAULT_METHOD_KEEP) if method is None else METHOD_OPTIONS[method]
    ck.compress(model, method=method, calib=calibration_batches(), **options)
    ck.save_compressed(model, out_dir)
    return model.config.compression_config["modules"]


def prompts(count: int = 8, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (int(length),), generator=generator).tolist()
            for length in torch.randint(3, 12, (count,), generator=generator)]


def transformers_greedy(checkpoint, prompt_ids: list[list[int]], new_tokens: int
                        ) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for ids in prompt_ids:
            tokens = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)
            outputs.append(tokens[0, len(ids):].tolist())
    return outputs


def _cur_from_rows(linear, rank: int, *, gather: bool, seed: int):
    """A CUR layer from `rank` rows of W (C = W·pinv(R), no U); in the gather form R is the
    whole W, read at the picked rows."""
    weight = linear.weight.detach().double()
    rows = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(seed))[:rank]
    rows = rows.sort().values
    C = (weight @ torch.linalg.pinv(weight[rows])).float()
    bias = None if linear.bias is None else linear.bias.detach()
    if gather:
        return ck.CURLinear(C, None, linear.weight.detach(), bias, row_indices=rows, gather=True)
    return ck.CURLinear(C, None, weight[rows].float(), bias, row_indices=rows)


def write_every_kind(architecture: str, out_dir) -> dict:
    """Each block holds every module kind the checkpoint format has, at different ranks: q a
    CUR with diagonal U, k low-rank, v dense, o a CUR with full U, gate a CUR in the gather
    form, up a CUR without U, down low-rank (Qwen2's q/k/v carry biases)."""
    model = dense_model(architecture)
    for index, block in enumerate(model.model.layers):
        attention, mlp = block.self_attn, block.mlp
        rank = 24 + 8 * index  # ranks differ between blocks too
        attention.q_proj = ck.CURLinear.from_linear(attention.q_proj, rank)
        attention.k_proj = ck.CURLinear.from_linear(attention.k_proj, rank // 2, link=False)
        full_u = ck.CURLinear.from_linear(attention.o_proj, rank + 4)
        attention.o_proj = ck.CURLinear(full_u.C, torch.diag(full_u.U), full_u.R)
        mlp.gate_proj = _cur_from_rows(mlp.gate_proj, rank + 8, gather=True, seed=index)
        mlp.up_proj = _cur_from_rows(mlp.up_proj, rank, gather=False, seed=index + 10)
        mlp.down_proj = ck.CURLinear.from_linear(mlp.down_proj, rank + 16, link=False)
    ck.save_compressed(model, out_dir)
    return model.config.compression_config["modules"]


def _with_bias(linear, seed: int):
    """The same Linear with a random bias (what ROM's factors add: the output mean)."""
    biased = torch.nn.Linear(linear.in_features, linear.out_features, bias=True)
    biased.weight.data.copy_(linear.weight.detach())
    biased.bias.data.copy_(torch.randn(linear.out_features,
                                       generator=torch.Generator().manual_seed(seed)))
    return biased


def write_one_shard_biased(out_dir) -> dict:
    """A Llama (no attention biases) whose q_proj is a CUR with a bias and whose k_proj is
    low-rank and v_proj dense, both without one; o_proj low-rank with a bias. vLLM merges
    q/k/v into one layer that needs a bias for q only."""
    model = dense_model("llama")
    for index, block in enumerate(model.model.layers):
        attention = block.self_attn
        attention.q_proj = ck.CURLinear.from_linear(_with_bias(attention.q_proj, index), 40)
        attention.k_proj = ck.CURLinear.from_linear(attention.k_proj, 24, link=False)
        attention.o_proj = ck.CURLinear.from_linear(_with_bias(attention.o_proj, 10 + index), 48,
                                                    link=False)
    ck.save_compressed(model, out_dir)
    return model.config.compression_config["modules"]
