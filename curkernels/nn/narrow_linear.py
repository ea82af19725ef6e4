"""`NarrowLinear`: a dense Linear over some of a wider layer's rows and/or columns.

Pair-wise compression shrinks the inner dimension two matrices share: an MLP keeps k of its
intermediate neurons (gate/up keep k rows, down keeps the k matching columns), an attention
head keeps some of its q/k or v dimensions. The kept weights are a plain, smaller dense matrix
— no factor overhead — and the kept positions are recorded as indices into the dense layer,
so checkpoints, the gather form and drafts can find them in the dense weights.

Where the model reshapes a projection's output by the dense head size (q, k, v), the kept
outputs are scattered back to the dense width with zeros elsewhere (`scatter_rows`): exact
for q·k, since both sides are zero in the dropped dimensions, and for v, whose dropped
dimensions the matching `gather_cols` o_proj never reads.

A speculative draft reads its kept rows in place (`gather_rows`): the weight is the dense
layer's own, shared with the target, and each call picks `rows` out of it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .cur_linear import _index_buffer


def _as_parameter(tensor: torch.Tensor, shared: bool) -> nn.Parameter:
    if shared:
        return nn.Parameter(tensor.detach(), requires_grad=False)
    return nn.Parameter(tensor.detach().contiguous())


class NarrowLinear(nn.Module):
    """y = x[..., cols]·Wᵀ + b, written to `rows` of a dense-width output or returned narrow.

    Args:
        weight: (len(rows) or out_features, len(cols) or in_features); with `gather_rows`,
            the dense layer's whole (out_features, in_features) weight.
        bias: optional, one entry per row of `weight`.
        out_features, in_features: the dense layer's shape.
        rows: the dense layer's output rows this weight computes (int64), or None for all.
        cols: the dense layer's input features this weight reads (int64), or None for all.
        scatter_rows: the output has the dense width, zeros outside `rows`; otherwise it has
            len(rows) features (the next layer is narrowed to match).
        gather_cols: the input has the dense width and `cols` are read from it; otherwise
            it already holds just those len(cols) features.
        gather_rows: `weight` (and `bias`) are the dense layer's, read in place: each call
            uses their `rows` (a draft sharing the target's weights).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, out_features: int,
                 in_features: int, rows=None, cols=None, scatter_rows: bool = False,
                 gather_cols: bool = False, gather_rows: bool = False):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        if scatter_rows and rows is None:
            raise ValueError("scatter_rows=True needs rows: the output positions to write")
        if gather_cols and cols is None:
            raise ValueError("gather_cols=True needs cols: the input features to read")
        if gather_rows and (rows is None or cols is not None):
            raise ValueError("gather_rows=True needs rows (the dense weight's rows to read) "
                             "and no cols")
        if gather_rows and weight.shape[0] != out_features:
            raise ValueError(f"gather_rows=True reads rows of the dense weight: weight must "
                             f"have out_features={out_features} rows, got {weight.shape[0]}")
        self.gather_rows = gather_rows
        kept_rows = len(rows) if gather_rows else weight.shape[0]
        kept_cols = weight.shape[1]
        if rows is None and kept_rows != out_features:
            raise ValueError(f"weight has {kept_rows} rows but out_features={out_features} and "
                             f"no rows were given")
        if cols is None and kept_cols != in_features:
            raise ValueError(f"weight has {kept_cols} columns but in_features={in_features} "
                             f"and no cols were given")
        self.dense_out_features, self.dense_in_features = out_features, in_features
        self.scatter_rows, self.gather_cols = scatter_rows, gather_cols
        self.out_features = out_features if scatter_rows or rows is None else kept_rows
        self.in_features = in_features if gather_cols or cols is None else kept_cols
        # a shared weight keeps its storage (and its frozen state); an own one is made contiguous
        self.weight = _as_parameter(weight, shared=gather_rows)
        self.bias = None if bias is None else _as_parameter(bias, shared=gather_rows)
        bias_rows = weight.shape[0]
        if self.bias is not None and tuple(self.bias.shape) != (bias_rows,):
            raise ValueError(f"bias must have shape ({bias_rows},), got {tuple(self.bias.shape)}")
        self.register_buffer("row_indices", _index_buffer("rows", rows, kept_rows, out_features),
                             persistent=False)
        self.register_buffer("col_indices", _index_buffer("cols", cols, kept_cols, in_features),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather_cols:
            x = x.index_select(-1, self.col_indices)
        y = F.linear(x, *self.kept_weight_and_bias())
        if not self.scatter_rows:
            return y
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy_(-1, self.row_indices, y)

    def kept_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias this layer computes with (its rows picked when shared)."""
        if not self.gather_rows:
            return self.weight, self.bias
        bias = None if self.bias is None else self.bias.index_select(0, self.row_indices)
        return self.weight.index_select(0, self.row_indices), bias

    @property
    def healable(self) -> tuple[str, ...]:
        """What healing trains: the weight and bias of a layer that reads only some input
        features — the partner of a narrowed inner dimension (o_proj, down_proj), refit on the
        kept inputs, and the one place that can compensate for what was dropped. A layer that
        keeps some rows stays real rows of the dense weight, which the gather form and drafts
        read in place."""
        return ("weight", "bias") if self.col_indices is not None else ()

    @property
    def factor_parameters(self) -> int:
        """Weight entries the layer reads (indices and bias excluded, as `keep` counts them;
        a shared weight counts its kept rows)."""
        rows, cols = self.kept_shape
        return rows * cols

    @property
    def kept_shape(self) -> tuple[int, int]:
        """The shape of the weight the layer computes with."""
        return (len(self.row_indices) if self.gather_rows else self.weight.shape[0],
                self.weight.shape[1])

    @property
    def dense_parameters(self) -> int:
        return self.dense_out_features * self.dense_in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept={self.kept_shape} of {self.dense_out_features}×"
                f"{self.dense_in_features}, scatter_rows={self.scatter_rows}, "
                f"gather_cols={self.gather_cols}, gather_rows={self.gather_rows}, "
                f"bias={self.bias is not None}")
