"""Pair-wise structured compression (method "pairwise", after MoDeGPT, arXiv 2408.09632):
each pair of matrices that shares an inner dimension keeps part of that dimension.

- MLP: k intermediate neurons, gate/up keep those k rows, down_proj is refit by least
  squares on calibration activations. The MLP becomes a narrower dense MLP. The neurons are
  picked one at a time, each the one that lowers down_proj's refit error most
  (`greedy_refit_selection`); MoDeGPT's ridge-leverage scores of the activations'
  correlation (a Nyström approximation, blind to what down_proj does with each neuron) are
  `selection="leverage"`. WikiText-2 perplexity, every decoder projection, keep 0.5:
  SmolLM2-135M 2.66× dense greedy against 3.14× by leverage, Gemma 3 270M 3.27× against
  4.33×; keep 0.8 on SmolLM2 1.32× against 1.37×.
- Q/K: head-dimension pairs (i, i + d/2), which rotary embeddings rotate together, shared by
  every query head of a grouped-query group, scored by √(E[q²]·E[k²]); q·k is exact over
  the kept dimensions and no refit is needed.
- V/O: v dimensions of each key-value group (each feeds one o_proj input per query head of
  its group), picked as the MLP's neurons are; o_proj refit by least squares on them.

Where the block normalises a refit layer's output before adding it to the residual stream
(Gemma 2/3's post-attention and post-feedforward norms, found by which norm module reads the
output), what the model keeps of each token's output is its direction: the norm divides it by
its own RMS. The refit and the greedy selection then weigh each calibration token by 1/E[y²]
of its dense output y (`token_weighting="output_norm"`, the default; it changes nothing where
outputs are added as they are). Gemma 3 270M, keep 0.8: 1.18× dense perplexity against 1.65×
with uniform tokens; keep 0.5: 3.14× against 3.27×.

Kept rows are real rows of the dense weights (`NarrowLinear` records them). Blocks are
calibrated sequentially: each refit sees the inputs produced by the already-compressed layers
before it and fits the dense block's outputs on the same tokens (min ‖Wx + b − Ŵx̂_K − b̂‖²,
as sequential SVD-LLM does). Each block's share of the budget comes from its angular
distance (blocks that change the hidden state more keep more), MoDeGPT's allocation; inside
a block, attention drops a smaller fraction than the MLP (`qk_drop`, `vo_drop`).

Attention that normalises q and k per head after the projections (`q_norm`/`k_norm` modules:
Gemma 3, Qwen3, OLMo 2) keeps q_proj and k_proj dense: the norm divides each head by the RMS
of all its dimensions, so zeroing some of them rescales the kept ones by √(E_all/E_kept), a
per-token factor that sharpens every attention score (no column choice keeps q·k exact
there). Their share of the budget goes to v/o and the MLP; the report still counts them.
On Gemma 3 270M this is exact and a third faster, not better: WikiText-2 perplexity 1.71×
dense at keep 0.8 (1.74× with q/k narrowed under the norm), 4.33× at keep 0.5 (4.29×).
"""

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.narrow_linear import NarrowLinear
from .calibration import PairedInputStats, paired_input_stats, stats_from_passes
from .errors import relative_error
from .layer_selection import angular_layer_scores, block_list
from .pairwise_budget import (
    ATTENTION_QK,
    ATTENTION_VO,
    block_keeps,
    dense_groups,
    group_keeps,
    keep_floor,
    target_groups,
)
from .refit_selection import greedy_refit_selection, refit_moments
from .replay import block_passes, capture_block_inputs, next_block_inputs
from .report import ModuleReport

ALLOCATIONS = ("importance", "uniform")
SELECTIONS = ("leverage", "greedy")
# How the refits weigh calibration tokens: "uniform" (each the same) or "output_norm" (where the
# block normalises the layer's output before the residual add, Gemma's post-norms, by
# 1/E[y²] of the token's dense output y: the norm divides by it).
TOKEN_WEIGHTINGS = ("uniform", "output_norm")


@dataclass
class AttentionHeads:
    """A decoder's query heads, key-value heads and head dimension."""
    query: int
    key_value: int
    dim: int


def ridge_leverage_scores(correlation: torch.Tensor, ridge: float) -> torch.Tensor:
    """diag(C(C + λI)⁻¹), λ = ridge·mean(diag C): how much each coordinate contributes to the
    span of the data that a ridge-regularised fit can see (fp64)."""
    c = correlation.double()
    shift = ridge * float(c.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve(c + shift * eye, c).diagonal()


def refit_on_kept_inputs(weight: torch.Tensor, bias: torch.Tensor | None,
                         stats: PairedInputStats, kept: torch.Tensor, damping: float
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Ŵ, b̂) minimising E‖Wx + b − (Ŵx̂_K + b̂)‖² + δ‖Ŵ − W[:, K]‖² over the paired tokens
    (x the dense inputs, x̂ the compressed ones, K the kept input features), fp64. The damping
    δ = damping·mean(diag E[x̂_Kx̂_Kᵀ]) keeps the dense columns where the data says little.
    A bias absorbs the mean: the moments are then centred, b̂ = b + W·E[x] − Ŵ·E[x̂_K]."""
    w = weight.detach().double()
    gram, cross = refit_moments(stats, centred=bias is not None)
    gram, cross = gram[kept][:, kept], cross[:, kept]
    shift = damping * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(kept), dtype=gram.dtype, device=gram.device)
    # Ŵ(G + δI) = W·X + δW_K, G symmetric: solve for Ŵᵀ
    refit = torch.linalg.solve(gram + shift * eye, (w @ cross + shift * w[:, kept]).T).T
    if bias is not None:
        bias = bias.detach().double() + w @ stats.dense_mean.double() - \
            refit @ stats.mean[kept].double()
    return refit, bias


def attention_heads(model: nn.Module) -> AttentionHeads:
    """The heads of a transformers decoder model; anything else is refused by name."""
    config = getattr(model, "config", None)
    if not hasattr(config, "num_attention_heads"):
        raise ValueError("pairwise needs a transformers decoder model (config with "
                         "num_attention_heads)")
    query = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // query
    return AttentionHeads(query, getattr(config, "num_key_value_heads", None) or query, dim)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the `count` largest scores (at least one), ascending."""
    count = max(1, min(count, scores.numel()))
    return torch.sort(torch.topk(scores.flatten(), count).indices).values


def _mean_square(t: torch.Tensor) -> torch.Tensor:
    """Mean square over the last dimension (fp64): one value per token."""
    return t.double().square().mean(-1)


def _swap(block: nn.Module, local: str, module: nn.Module) -> None:
    block.set_submodule(local, module)


def _report(name: str, dense: nn.Linear, module: NarrowLinear, approx: torch.Tensor,
            start: float) -> ModuleReport:
    m, n = dense.weight.shape
    return ModuleReport(name, (m, n), min(module.weight.shape), m * n, module.factor_parameters,
                        relative_error(dense.weight, approx), None, time.perf_counter() - start)


def _as_dense(module: NarrowLinear) -> torch.Tensor:
    """The dense-shape weight the narrow one stands for (zeros where nothing is kept)."""
    w = torch.zeros(module.dense_out_features, module.dense_in_features, dtype=torch.float64,
                    device=module.weight.device)
    rows = slice(None) if module.row_indices is None else module.row_indices
    cols = slice(None) if module.col_indices is None else module.col_indices
    if module.row_indices is not None and module.col_indices is not None:
        w[rows[:, None], cols] = module.weight.double()
    else:
        w[rows, cols] = module.weight.double()
    return w


def _narrow_rows(linear: nn.Linear, rows: torch.Tensor, scatter: bool) -> NarrowLinear:
    bias = None if linear.bias is None else linear.bias.detach()[rows]
    return NarrowLinear(linear.weight.detach()[rows], bias, out_features=linear.out_features,
                        in_features=linear.in_features, rows=rows, scatter_rows=scatter)


def _narrow_cols(linear: nn.Linear, cols: torch.Tensor, gather: bool, refit: bool,
                 stats: PairedInputStats, damping: float) -> NarrowLinear:
    if refit:
        weight, bias = refit_on_kept_inputs(linear.weight, linear.bias, stats, cols, damping)
    else:
        weight, bias = linear.weight.detach()[:, cols], linear.bias
    dtype = linear.weight.dtype
    return NarrowLinear(weight.to(dtype), None if bias is None else bias.to(dtype),
                        out_features=linear.out_features, in_features=linear.in_features,
                        cols=cols, gather_cols=gather)


class _BlockCompressor:
    """Compresses one block in place, each step calibrated on the block as compressed so far
    (`inputs`) against its dense twin (`dense_inputs`)."""

    def __init__(self, name: str, block: nn.Module, inputs, dense_inputs, refit_targets,
                 heads: AttentionHeads, options: dict):
        self.name, self.block, self.inputs, self.heads = name, block, inputs, heads
        self.ridge, self.damping, self.refit, self.selection = (
            options["ridge"], options["damping"], options["refit"], options["selection"])
        self.token_weighting = options["token_weighting"]
        self.reports: list[ModuleReport] = []
        self.dense_block = copy.deepcopy(block)
        self.dense_inputs_of, self.output_sq, self.normalised, self.next_dense_inputs = (
            self._dense_pass(dense_inputs, refit_targets))

    def _dense_pass(self, dense_inputs, locals_: list[str]):
        """One pass of the dense twin: the inputs each refit target sees there (one tensor a
        batch), its outputs' mean square per token, which targets' outputs the block
        normalises before adding them to the residual (a norm module reads the output
        itself: Gemma's post-norms), and the next block's dense inputs."""
        seen = {local: [] for local in locals_}
        output_sq = {local: [] for local in locals_}
        outputs, normalised = {}, set()  # the latest output of each target (held: ids recur)

        def record(module, args, output, local):
            seen[local].append(args[0].detach())
            output_sq[local].append(_mean_square(output.detach()))
            outputs[local] = output

        def reads_output(module, args):
            if args and "Norm" in type(module).__name__:
                normalised.update(local for local, output in outputs.items()
                                  if args[0] is output)

        handles = [self.dense_block.get_submodule(local).register_forward_hook(
            lambda module, args, output, local=local: record(module, args, output, local))
            for local in locals_]
        handles += [module.register_forward_pre_hook(reads_output)
                    for module in self.dense_block.modules()]
        try:
            next_inputs = next_block_inputs(self.dense_block, dense_inputs)
        finally:
            for handle in handles:
                handle.remove()
        return seen, output_sq, normalised, next_inputs

    def _token_weights(self, local: str) -> list[torch.Tensor] | None:
        """Per-token weights of `local`'s refit (see `TOKEN_WEIGHTINGS`), one tensor a batch."""
        if self.token_weighting == "uniform" or local not in self.normalised:
            return None
        return [1 / output_sq.clamp_min(1e-6 * float(output_sq.mean()))
                for output_sq in self.output_sq[local]]

    def _paired(self, local: str) -> PairedInputStats:
        """Dense inputs from the cached dense pass, compressed ones from running the block as
        compressed so far (each cut short at `local`)."""
        dense_linear = self.dense_block.get_submodule(local)
        passes = ((mask, lambda x=x: dense_linear(x), run) for (mask, run), x in zip(
            block_passes(self.block, self.inputs), self.dense_inputs_of.pop(local), strict=True))
        return paired_input_stats(f"{self.name}.{local}", dense_linear,
                                  self.block.get_submodule(local), passes,
                                  desc=f"pairwise {self.name}.{local}",
                                  token_weights=self._token_weights(local))

    def _replace(self, local: str, module: NarrowLinear, start: float) -> None:
        dense = self.block.get_submodule(local)
        self.reports.append(_report(f"{self.name}.{local}", dense, module, _as_dense(module),
                                    start))
        _swap(self.block, local, module)

    def _greedy(self, local: str, stats: PairedInputStats, columns: torch.Tensor,
                count: int) -> torch.Tensor:
        linear = self.block.get_submodule(local)
        return greedy_refit_selection(linear.weight, stats, columns, count, self.damping,
                                      centred=linear.bias is not None)

    def leave_dense(self, locals_: tuple[str, ...]) -> None:
        """Report `locals_` as kept whole (they stay nn.Linear)."""
        for local in locals_:
            linear = self.block.get_submodule(local)
            m, n = linear.weight.shape
            self.reports.append(ModuleReport(f"{self.name}.{local}", (m, n), min(m, n), m * n,
                                             m * n, 0.0, None, 0.0))

    def query_key(self, q: str, k: str, kept_fraction: float) -> None:
        """Keep the rotary pairs of largest √(E[q²]E[k²]) summed over each group's heads."""
        start = time.perf_counter()
        h = self.heads
        modules = {q: self.block.get_submodule(q), k: self.block.get_submodule(k)}
        stats = stats_from_passes(modules, block_passes(self.block, self.inputs), outputs=True,
                                  stop_after=True, desc=f"pairwise {self.name} q/k")
        half = h.dim // 2

        def pair_energy(local, heads):
            s = stats[local]
            energy = (s.out_outer.diagonal() / max(s.tokens, 1)).reshape(heads, h.dim)
            return energy[:, :half] + energy[:, half:]

        group = h.query // h.key_value
        q_norm = pair_energy(q, h.query).sqrt().reshape(h.key_value, group, half).sum(1)
        scores = q_norm * pair_energy(k, h.key_value).sqrt()  # (key-value groups, pairs)
        kept = _top(scores, int(kept_fraction * h.key_value * half))
        mask = torch.zeros(h.key_value, half, dtype=torch.bool)
        mask.view(-1)[kept] = True
        dims = torch.cat([mask, mask], 1)  # pair i keeps dims i and i + d/2
        k_rows = dims.flatten().nonzero().flatten()
        q_rows = dims.repeat_interleave(group, 0).flatten().nonzero().flatten()
        for local, rows in ((q, q_rows), (k, k_rows)):
            self._replace(local, _narrow_rows(self.block.get_submodule(local), rows, True),
                          start)

    def value_output(self, v: str, o: str, kept_fraction: float) -> None:
        """Keep the v dimensions of largest ridge leverage (o_proj's input, summed over each
        group's query heads); refit o_proj on them."""
        start = time.perf_counter()
        h = self.heads
        stats = self._paired(o)
        group = h.query // h.key_value
        count = max(1, int(kept_fraction * h.key_value * h.dim))
        if self.selection == "greedy":
            # candidate (group g, dim t) keeps o_proj input t of each query head of group g
            columns = torch.arange(h.query * h.dim).reshape(h.key_value, group, h.dim)
            kept = self._greedy(o, stats, columns.transpose(1, 2).reshape(-1, group), count)
        else:
            leverage = ridge_leverage_scores(stats.second_moment, self.ridge)
            kept = _top(leverage.reshape(h.key_value, group, h.dim).sum(1), count)
        mask = torch.zeros(h.key_value, h.dim, dtype=torch.bool)
        mask.view(-1)[kept] = True
        v_rows = mask.flatten().nonzero().flatten()
        o_cols = mask.repeat_interleave(group, 0).flatten().nonzero().flatten()
        self._replace(v, _narrow_rows(self.block.get_submodule(v), v_rows, True), start)
        self._replace(o, _narrow_cols(self.block.get_submodule(o), o_cols, True, self.refit,
                                      stats, self.damping), start)

    def mlp(self, gate: str, up: str, down: str, kept_fraction: float, multiple: int) -> None:
        """Keep the intermediate neurons of largest ridge leverage; refit down_proj."""
        start = time.perf_counter()
        stats = self._paired(down)
        width = self.block.get_submodule(down).in_features
        count = min(width, max(multiple, int(kept_fraction * width) // multiple * multiple))
        if self.selection == "greedy":
            neurons = self._greedy(down, stats, torch.arange(width)[:, None], count)
        else:
            neurons = _top(ridge_leverage_scores(stats.second_moment, self.ridge), count)
        for local in (gate, up):
            self._replace(local, _narrow_rows(self.block.get_submodule(local), neurons, False),
                          start)
        self._replace(down, _narrow_cols(self.block.get_submodule(down), neurons, False,
                                         self.refit, stats, self.damping), start)


@torch.no_grad()
def compress_block(name: str, block: nn.Module, targets: dict[str, nn.Linear], keep: float,
                   inputs, dense_inputs, heads: AttentionHeads, *, qk_drop: float, vo_drop: float,
                   rank_multiple: int, options: dict) -> "_BlockCompressor":
    """Compress one block's `targets` (local names) to `keep` of their weights, split among
    q/k, v/o and the MLP by `group_keeps`; `inputs` are the block's calibration inputs (the
    compressed model's when sequential), `dense_inputs` the dense model's. Returns the step,
    holding its reports and the next block's dense inputs."""
    groups = target_groups(set(targets))
    # the refits (o_proj, down_proj: the last member of a v/o or MLP group) need the dense
    # block's inputs to them; non-sequential calibration runs the block on dense inputs
    refit_targets = [group[-1] for group in groups if not group[0].endswith(ATTENTION_QK[0])]
    step = _BlockCompressor(name, block, inputs, dense_inputs, refit_targets, heads, options)
    group_sizes = [sum(targets[local].weight.numel() for local in group) for group in groups]
    fixed = dense_groups(block, groups)
    fractions = group_keeps(groups, group_sizes, keep, 0.0 if fixed else qk_drop, vo_drop)
    for group, fraction in zip(groups, fractions, strict=True):
        if group in fixed:
            step.leave_dense(group)
        elif group[0].endswith(ATTENTION_QK[0]):
            step.query_key(*group, fraction)
        elif group[0].endswith(ATTENTION_VO[0]):
            step.value_output(*group, fraction)
        else:
            step.mlp(*group, fraction, rank_multiple)
    return step


def compress_pairwise(model: nn.Module, targets: dict[str, nn.Linear], keep: float, *, calib,
                      rank_multiple: int, ridge: float, damping: float, refit: bool,
                      selection: str, token_weighting: str, sequential: bool, allocation: str,
                      temperature: float, qk_drop: float, vo_drop: float) -> list[ModuleReport]:
    """Compress q/k, v/o and gate/up/down of each decoder block in place (see the module
    docstring). `keep` counts stored weight entries (indices and biases excluded). The
    options' defaults and checks live in `PairwiseConfig`.

    Args:
        rank_multiple: the MLP's kept neuron count is a multiple of it.
        ridge: λ of the ridge-leverage scores, as a fraction of the mean diagonal.
        damping: pulls a refit towards the dense columns (see `refit_on_kept_inputs`); weak
            damping overfits 64 calibration paragraphs on SmolLM2-135M (keep 0.8: 1e-4 1.55×,
            1e-2 1.44× dense perplexity on 4,096 tokens; keep 0.5 with the attention split:
            1e-2 3.46×, 5e-2 3.14× on 16,384).
        refit: refit o_proj and down_proj on the kept inputs (False: keep their dense columns).
        selection: how the kept MLP neurons and v dimensions are chosen: "leverage" (ridge
            leverage of their correlation, MoDeGPT's) or "greedy" (one at a time, each the one
            that lowers the refit's error most; `greedy_refit_selection`).
        token_weighting: how the refits and the greedy selection weigh calibration tokens
            (`TOKEN_WEIGHTINGS`).
        sequential: calibrate each block on the compressed blocks' outputs (False: on the
            dense model's).
        allocation: "importance" (each block's share from its angular distance) or "uniform".
        temperature: softness of the importance allocation (larger: closer to uniform).
        qk_drop, vo_drop: q/k's and v/o's dropped fraction as a multiple of the MLP's inside
            each block's budget (see `group_keeps`); attention is the less forgiving part.
    """
    heads = attention_heads(model)
    prefix, blocks = block_list(model)
    per_block: dict[int, dict[str, nn.Linear]] = {}
    for name, linear in targets.items():
        start = f"{prefix}."
        index = name[len(start):].split(".", 1)[0] if name.startswith(start) else ""
        if not index.isdigit():
            raise ValueError(f"pairwise compresses decoder blocks only; {name!r} is outside "
                             f"{prefix}")
        per_block.setdefault(int(index), {})[name[len(f"{start}{index}."):]] = linear
    for local in per_block.values():
        target_groups(set(local))  # whole groups in every block, checked before any calibration
    indices = sorted(per_block)
    sizes = [sum(linear.weight.numel() for linear in per_block[i].values()) for i in indices]
    floor = keep_floor(blocks, per_block, keep)
    if allocation == "importance":
        # the decoder alone gives the hidden states: the LM head's cost is not needed
        scores = angular_layer_scores(model.get_decoder(), calib)[indices]
        keeps = dict(zip(indices, block_keeps(scores, sizes, keep, temperature, floor),
                         strict=True))
    else:
        keeps = dict.fromkeys(indices, keep)
    options = {"ridge": ridge, "damping": damping, "refit": refit, "selection": selection,
               "token_weighting": token_weighting}
    inputs = dense_inputs = capture_block_inputs(model, blocks[0], calib)
    reports = []
    for index, block in enumerate(blocks):
        if index > indices[-1]:
            break
        if index not in per_block:
            dense_inputs = next_block_inputs(block, dense_inputs)
            inputs = next_block_inputs(block, inputs) if sequential else dense_inputs
            continue
        step = compress_block(f"{prefix}.{index}", block, per_block[index], keeps[index],
                              inputs if sequential else dense_inputs, dense_inputs, heads,
                              qk_drop=qk_drop, vo_drop=vo_drop, rank_multiple=rank_multiple,
                              options=options)
        reports += step.reports
        dense_inputs = step.next_dense_inputs
        inputs = next_block_inputs(block, inputs) if sequential else dense_inputs
    return reports
