"""Models for the end-to-end benchmark: Llama-3.1-8B shapes with random weights, and the
compression settings applied to copies of one dense model.

Speed depends on the factored modules' shapes, not on the values in them, so by default the
factors are drawn at random at the ranks the setting implies (`factors="random"`): factoring
224 matrices of 8B shapes for real takes longer than the whole benchmark. `factors="compress"`
runs `curkernels.compress` instead (used by the CPU sanity check).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels.compress import METHODS, rank_for_keep
from curkernels.nn import CURLinear, swap_linears
from curkernels.nn.surgery import find_linears

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = "sdpa"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    curing_layers: int  # CURing: q, k, gate of this many blocks ...
    curing_rank: int  # ... at this rank


LLAMA_31_8B = Shape(4096, 14336, 32, 32, 8, 128256, curing_layers=10, curing_rank=256)
SMALL = Shape(128, 256, 4, 4, 2, 512, curing_layers=2, curing_rank=16)


def dense_model(shape: Shape, max_positions: int, device: torch.device,
                dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=max_positions, rope_theta=500000.0,
                         tie_word_embeddings=False, attn_implementation=ATTENTION)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: 8B parameters on the CPU take minutes
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def _random(shape: tuple[int, ...], like: torch.Tensor, product_rank: int) -> torch.Tensor:
    """Factor entries scaled so that a product of two has the dense init's spread (0.02)."""
    std = (0.02 / product_rank ** 0.5) ** 0.5
    return torch.randn(shape, device=like.device, dtype=like.dtype) * std


def random_low_rank(linear: nn.Linear, rank: int) -> CURLinear:
    m, n = linear.weight.shape
    return CURLinear(_random((m, rank), linear.weight, rank), None,
                     _random((rank, n), linear.weight, rank))


def random_cur(linear: nn.Linear, rank: int) -> CURLinear:
    """CURing's module: C (m×r), a full link U (r×r) and R (r×n)."""
    m, n = linear.weight.shape
    eye = torch.eye(rank, device=linear.weight.device, dtype=linear.weight.dtype)
    return CURLinear(_random((m, rank), linear.weight, rank), eye,
                     _random((rank, n), linear.weight, rank))


def curing_targets(model: nn.Module, shape: Shape) -> list[str]:
    """q, k, gate of the deepest `curing_layers` blocks before the last (random weights give
    the angular-distance rule nothing to measure; the paper's picks are deep blocks)."""
    last = shape.layers - 1
    blocks = range(max(last - shape.curing_layers, 1), last)
    return [f"model.layers.{i}.{kind}" for i in blocks
            for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj")]


def calibration_batches(shape: Shape, device: torch.device, count: int = 4,
                        length: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, shape.vocab, (1, length), generator=generator)
             .to(device)} for _ in range(count)]


@dataclass(frozen=True)
class Setting:
    name: str
    description: str


def settings_for(keeps: tuple[float, ...]) -> list[Setting]:
    return ([Setting("dense", "dense model"),
             Setting("curing", "CURing's setting: q, k, gate of 10 blocks at r = 256")]
            + [Setting(f"keep{k:g}", f"keep {k:g} of every decoder projection") for k in keeps])


def compressed_copy(dense: nn.Module, setting: Setting, shape: Shape, *, factors: str,
                    method: str, device: torch.device,
                    rank_multiple: int = 1) -> tuple[nn.Module, str]:
    """A compressed copy of `dense` for `setting`, and a note on how it was made."""
    if setting.name == "dense":
        return dense, "dense"
    model = copy.deepcopy(dense)
    if setting.name == "curing":
        targets = curing_targets(model, shape)
        if factors == "compress" and "curing" in METHODS:
            ck.compress(model, method="curing", keep=1.0, max_rank=shape.curing_rank,
                        targets=targets, calib=calibration_batches(shape, device))
            return model, "curkernels.compress(method='curing', keep=1.0, max_rank)"
        swap_linears(model, find_linears(model, targets),
                     lambda _name, linear: random_cur(linear, shape.curing_rank))
        why = "" if factors == "random" else " (method 'curing' is not available)"
        return model, f"random C, U, R factors at r = {shape.curing_rank}{why}"
    keep = float(setting.name.removeprefix("keep"))
    if factors == "compress":
        ck.compress(model, method=method, keep=keep, targets=list(PROJECTIONS),
                    calib=calibration_batches(shape, device), rank_multiple=rank_multiple)
        return model, (f"curkernels.compress(method={method!r}, keep={keep:g}, "
                       f"rank_multiple={rank_multiple})")

    def factor(_name: str, linear: nn.Linear) -> CURLinear:
        m, n = linear.weight.shape
        return random_low_rank(linear, rank_for_keep(m, n, keep, "none", rank_multiple))

    swap_linears(model, find_linears(model, PROJECTIONS), factor)
    return model, (f"random two-factor modules at the rank holding keep {keep:g}, rounded "
                   f"down to a multiple of {rank_multiple}")
