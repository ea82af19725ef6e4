"""`make_draft`: a draft of a causal LM that reads the LM's own weights in place.

method="curing": each factored Linear keeps real rows R = W[I, :] of the target's weight
(read through the gather form, never copied) and stores only C = W[:, J] and the link U
(CURing's selection: DEIM on the activation-weighted weight, U = C⁺·W·R⁺).
method="pairwise": the quality default's structure (`compress`'s "pairwise"): q/k/v and
gate/up keep real rows of the target's weights, read in place; o_proj and down_proj are refit
on the kept inputs, and those refit weights are all the draft stores.
Blocks can be skipped (the CURing paper's angular distance picks those that change the
hidden state least) and the head can score only the most frequent tokens of the calibration
text (FR-Spec).
"""

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..compress.api import compress
from ..compress.budget import check_keep, rank_for_keep
from ..compress.calibration import collect_linear_stats
from ..compress.calibration_sources import as_batches
from ..compress.curing import cur_decompose
from ..compress.layer_selection import angular_layer_scores, block_list, select_layers
from ..nn import NarrowLinear, find_linears, name_matches
from .assembly import BlockNames, CURFactor, DraftSpec, NarrowFactor, assemble_draft
from .head import most_frequent_tokens
from .identity import base_identity

DRAFT_METHODS = ("curing", "pairwise")


def _keep_for(name: str, keep: float | Mapping[str, float]) -> float | None:
    """The keep fraction of one Linear: the first matching pattern of a mapping (None: the
    Linear is not factored, the draft reads the dense weight as it is)."""
    if not isinstance(keep, Mapping):
        return keep
    for pattern, value in keep.items():
        if name_matches(name, pattern):
            return value
    return None


def _check_keep_option(keep) -> None:
    values = keep.values() if isinstance(keep, Mapping) else [keep]
    for value in values:
        check_keep(value)


def _skipped_blocks(model: nn.Module, skip_layers, batches, num_blocks: int) -> list[int]:
    if skip_layers is None:
        return []
    if isinstance(skip_layers, int) and not isinstance(skip_layers, bool):
        if skip_layers == 0:
            return []
        if batches is None:
            raise ValueError("skip_layers=<count> picks blocks by angular distance: pass calib=")
        return select_layers(angular_layer_scores(model, batches), skip_layers)
    if not isinstance(skip_layers, Sequence):
        raise TypeError(f"skip_layers must be a count, a list of block indices or None, got "
                        f"{type(skip_layers).__name__}")
    skipped = sorted({int(i) for i in skip_layers})
    if skipped and (skipped[0] < 0 or skipped[-1] >= num_blocks or len(skipped) >= num_blocks):
        raise ValueError(f"skip_layers must be indices in [0, {num_blocks}) leaving at least "
                         f"one block, got {list(skip_layers)}")
    return skipped


def _head_token_ids(model: nn.Module, head_tokens, batches) -> torch.Tensor | None:
    if head_tokens is None:
        return None
    vocab = model.get_output_embeddings().weight.shape[0]
    if isinstance(head_tokens, int) and not isinstance(head_tokens, bool):
        if batches is None:
            raise ValueError("head_tokens=<count> keeps the calibration text's most frequent "
                             "tokens: pass calib=")
        return most_frequent_tokens(batches, vocab, head_tokens)
    return torch.as_tensor(head_tokens, dtype=torch.int64).reshape(-1)


@torch.no_grad()
def make_draft(model: nn.Module, method: str = "curing", keep: float | Mapping[str, float] = 0.4,
               calib=None, *, tokenizer=None, skip_layers: int | Sequence[int] | None = None,
               head_tokens: int | Sequence[int] | None = None, targets: Sequence[str] | None = None,
               max_rank: int | None = None, selection: str = "deim",
               svd: str = "randomized") -> nn.Module:
    """A draft of `model` (a transformers causal LM) for speculative decoding.

    Args:
        method: how Linears are factored: 'curing' (CUR, real rows read in place) or
            'pairwise' (the compression default's kept rows, read in place, and refits).
        keep: fraction of each factored Linear's entries the draft reads per token (C, U and
            the rows R), or a mapping {name pattern: keep} — per layer or per matrix, e.g.
            {"layers.3.*": 0.6, "mlp.*": 0.3}; a Linear no pattern matches stays dense
            (the target's weight, shared). 'pairwise' takes one number: it splits the
            budget among blocks and matrices itself.
        calib: input dicts, or strings with `tokenizer=`: activation statistics for the
            selection, angular distances for `skip_layers`, token counts for `head_tokens`.
        skip_layers: a count (the blocks of smallest angular distance, never the first or last)
            or explicit block indices the draft leaves out.
        head_tokens: a count (the calibration text's most frequent tokens) or explicit token
            ids: the draft's head scores only those (rows of the target's head, shared).
        targets: name patterns of the Linears to factor (default: every Linear in the blocks).
        max_rank: an upper bound on every rank; selection, svd: passed to CURing's selection
            (method 'curing' only).

    The draft shares every tensor of `model` and owns only its factors (C and U, or the
    refit weights) and indices; `heal_draft` trains them toward `model`'s next-token
    distribution, `save_draft` stores the delta.
    """
    if method not in DRAFT_METHODS:
        raise ValueError(f"method must be one of {DRAFT_METHODS} (a draft reads the target's "
                         f"rows in place), got {method!r}")
    _check_keep_option(keep)
    batches = None if calib is None else as_batches(calib, tokenizer)
    prefix, blocks = block_list(model)
    skipped = _skipped_blocks(model, skip_layers, batches, len(blocks))
    kept = [i for i in range(len(blocks)) if i not in skipped]
    in_kept_blocks = [f"{prefix}.{i}.*" for i in kept]
    linears = {name: linear for name, linear in find_linears(model, targets).items()
               if any(name_matches(name, p) for p in in_kept_blocks)}
    head_ids = _head_token_ids(model, head_tokens, batches)
    if method == "pairwise":
        _check_pairwise_options(keep, batches, max_rank, selection, svd)
        spec = DraftSpec(method, kept, {}, head_ids, base_identity(model))
        factors = _pairwise_factors(assemble_draft(model, spec), list(linears), keep, batches)
        return assemble_draft(model, DraftSpec(method, kept, factors, head_ids, spec.base))
    keeps = {name: _keep_for(name, keep) for name in linears}
    linears = {name: linear for name, linear in linears.items() if keeps[name] is not None}
    stats = {}
    if linears and batches is not None:
        stats = collect_linear_stats(model, linears, batches, desc="draft calibration")
    factors = {}
    for name, linear in linears.items():
        m, n = linear.weight.shape
        rank = rank_for_keep(m, n, keeps[name], "full")
        rank = rank if max_rank is None else max(1, min(rank, max_rank))
        mean_sq = stats[name].mean_sq if name in stats else None
        f = cur_decompose(linear.weight, mean_sq, rank, selection=selection, svd=svd)
        factors[name] = CURFactor(f.C, f.U, f.rows, f.cols)
    return assemble_draft(model, DraftSpec(method, kept, factors, head_ids,
                                           base_identity(model)))


def _check_pairwise_options(keep, batches, max_rank, selection, svd) -> None:
    if isinstance(keep, Mapping):
        raise ValueError("method='pairwise' splits one keep among the blocks and their "
                         "matrices: keep must be a number, not a mapping")
    if batches is None:
        raise ValueError("method='pairwise' selects and refits on activations: pass calib=")
    if max_rank is not None or selection != "deim" or svd != "randomized":
        raise ValueError("max_rank, selection and svd are CURing's options; method='pairwise' "
                         "takes none of them")


@torch.no_grad()
def _pairwise_factors(dense_draft: nn.Module, targets: list[str], keep: float,
                      batches) -> dict[str, NarrowFactor]:
    """Compress a copy of the draft's kept blocks with pairwise (so the selection and refits
    see the blocks the draft runs) and keep what it adds: the kept rows' indices and the
    refit weights, keyed by the target's module names."""
    prefix, _ = block_list(dense_draft)
    names = BlockNames(prefix, dense_draft.draft_spec.base_layers)
    work = copy.deepcopy(dense_draft)  # compressed in place, then dropped
    compress(work, "pairwise", keep=keep, calib=batches,
             targets=[names.in_draft(name) for name in targets])
    factors = {}
    for name, module in work.named_modules():
        if not isinstance(module, NarrowLinear):
            continue
        if module.col_indices is None:
            factors[names.in_target(name)] = NarrowFactor(module.row_indices, None,
                                                          module.scatter_rows, False)
        else:
            factors[names.in_target(name)] = NarrowFactor(
                None, module.col_indices, False, module.gather_cols, module.weight.detach(),
                None if module.bias is None else module.bias.detach())
    return factors
