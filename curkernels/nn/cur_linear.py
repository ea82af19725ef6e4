"""`CURLinear`: a drop-in `nn.Linear` storing W ≈ C·U·R (C·R without U), one fused op a call."""

import torch
from torch import nn

from ..ops import cur_linear
from ..ops.factors import fold_link, split_evenly, truncated_svd
from ..ops.op import check_rows_in_range

TRAINABLE_FACTORS = ("C", "U", "R")


def _index_buffer(name: str, indices, size: int, limit: int) -> torch.Tensor | None:
    """Validated int64 indices: `size` of them, distinct, in [0, limit)."""
    if indices is None:
        return None
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).contiguous()
    if indices.numel() != size:
        raise ValueError(f"{name} must hold {size} indices, got {indices.numel()}")
    if indices.device.type == "meta":
        return indices
    if indices.unique().numel() != indices.numel():
        raise ValueError(f"{name} must not repeat an index")
    check_rows_in_range(indices, limit)
    return indices


class CURLinear(nn.Module):
    """y = x·(C·U·R)ᵀ + b, computed as ((x·Rᵀ)·Uᵀ)·Cᵀ + b without forming the m×n weight.

    The one factored layer: CUR (U full), SVD (U diagonal) and low-rank layers (no U: the two
    factors C·R of SVD-family methods) are all this class.

    Args:
        C: (m, c) expand factor (CUR: columns W[:, col_indices]).
        U: (c, r) link, (r,) diagonal (SVD's Σ), or None (two factors, c = r).
        R: (r, n) shrink factor (CUR: rows W[row_indices, :]); with `gather=True`, a base
            weight (k, n) shared with another module, read as R = base[row_indices].
        bias: optional (m,).
        row_indices, col_indices: the CUR row/column picks (int64), kept as metadata and saved
            in checkpoints; `row_indices` is required with `gather=True`.
        trainable: which factors get gradients; by default the ones healing trains
            (`healable`).
        gather: read R's rows in place from a shared base weight.
        backend: 'auto' | 'torch' | 'triton' | 'cuda', passed to `cur_linear`.
    """

    def __init__(self, C: torch.Tensor, U: torch.Tensor | None, R: torch.Tensor,
                 bias: torch.Tensor | None = None, row_indices=None, col_indices=None, *,
                 trainable: tuple[str, ...] | None = None, gather: bool = False,
                 backend: str = "auto"):
        super().__init__()
        unknown = set(trainable or ()) - set(TRAINABLE_FACTORS)
        if unknown:
            raise ValueError(f"trainable must name factors among {TRAINABLE_FACTORS}, "
                             f"got {sorted(unknown)}")
        if C.dim() != 2 or R.dim() != 2:
            raise ValueError(f"C and R must be 2-D, got C {tuple(C.shape)} and R {tuple(R.shape)}")
        if gather and row_indices is None:
            raise ValueError("gather=True needs row_indices into the base weight R")
        rank = len(row_indices) if gather else R.shape[0]
        self.in_features = R.shape[1]
        self.out_features = C.shape[0]
        self.gather = gather
        self.backend = backend
        self.shared_shrink = self.shared_index = None  # see shared_shrink.py
        self.C = nn.Parameter(C.detach().contiguous(), requires_grad=False)
        self.U = None if U is None else nn.Parameter(U.detach().contiguous(), requires_grad=False)
        self.R = nn.Parameter(R.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous())
        # Row picks index the base weight (gather) or W's m rows, column picks W's n columns.
        self.register_buffer("row_indices",
                             _index_buffer("row_indices", row_indices, rank, R.shape[0]
                                           if gather else self.out_features),
                             persistent=False)
        self.register_buffer("col_indices",
                             _index_buffer("col_indices", col_indices, C.shape[1],
                                           self.in_features),
                             persistent=False)
        self._check_shapes()
        for name in self.healable if trainable is None else trainable:
            if self._parameters.get(name) is not None:
                self._parameters[name].requires_grad_(True)

    def _check_shapes(self) -> None:
        rank, inner = self.rank, self.C.shape[1]
        if self.U is None and inner != rank:
            raise ValueError(f"without U, C needs {rank} columns (the rank), got {inner}")
        if self.U is not None:
            expected = (rank,) if self.U.dim() == 1 else (inner, rank)
            if tuple(self.U.shape) != expected:
                raise ValueError(f"U must have shape {expected}, got {tuple(self.U.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), "
                             f"got {tuple(self.bias.shape)}")

    @property
    def rank(self) -> int:
        return self.row_indices.numel() if self.gather else self.R.shape[0]

    @property
    def u_kind(self) -> str:
        return "none" if self.U is None else ("diag" if self.U.dim() == 1 else "full")

    @property
    def healable(self) -> tuple[str, ...]:
        """The factors healing trains: U, the small link, where there is one (C and R then stay
        real columns and rows of W, as in the CURing paper); without U, each factor that is
        not picked rows or columns of a weight (a low-rank layer's C and R)."""
        if self.U is not None:
            return ("U",)
        picked = {"C": self.col_indices is not None,
                  "R": self.gather or self.row_indices is not None}
        return tuple(name for name in ("C", "R") if not picked[name])

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, link: bool = True,
                    **kwargs) -> "CURLinear":
        """Plain truncated SVD (fp64): C = U_r, U = diag(Σ_r), R = V_rᵀ; with `link=False` two
        factors of equal scale, C = U_r·√Σ_r and R = √Σ_r·V_rᵀ."""
        left, sigma, right = truncated_svd(linear.weight, rank)
        if not link:
            (left, right), sigma = split_evenly(left, sigma, right), None
        dtype = linear.weight.dtype
        return cls(left.to(dtype), None if sigma is None else sigma.to(dtype), right.to(dtype),
                   None if linear.bias is None else linear.bias.detach(), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_shrink
        if shared is not None and shared.serves(x):
            return shared.forward_member(self, x)
        # Direct dictionary reads: nn.Module.__getattr__ costs about a microsecond per factor.
        params = self._parameters
        C, U = params["C"], params.get("U")
        if U is not None and U.dim() == 2:
            C, U = self._fold_frozen_link(C, U)
        return cur_linear(x, C, U, params["R"], params.get("bias"),
                          rows=self._buffers.get("row_indices") if self.gather else None,
                          backend=self.backend, check_rows=False, check_factors=False)

    def _fold_frozen_link(self, C: torch.Tensor, U: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A full U that gets no gradient in this call is folded into C (fp64, cached until C or
        U is replaced, moved or changed in place): the kernels then run two stages, not three.
        The cache holds one m×r copy beside C; `fold()` makes it permanent."""
        if torch.compiler.is_compiling():
            return C, U
        if torch.is_grad_enabled() and (U.requires_grad or C.requires_grad):
            return C, U
        key = (C.data_ptr(), U.data_ptr(), C._version, U._version)
        if self.__dict__.get("_folded_key") != key:
            self._folded_C = fold_link(C, U)
            self._folded_key = key
        return self._folded_C, None

    def factor_R(self) -> torch.Tensor:
        return self.R[self.row_indices] if self.gather else self.R

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """The equivalent `nn.Linear` (W = C·U·R formed in fp64, cast back)."""
        C, R = fold_link(self.C.double(), self.U), self.factor_R().double()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.C.device, dtype=self.C.dtype)
        linear.weight.copy_(C @ R)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def fold(self) -> "CURLinear":
        """Fold U into C (C ← C·U, in fp64) for inference: two factors, one fewer stage.

        C no longer holds columns of W afterwards, so `col_indices` is dropped.
        """
        if self.U is None:
            return self
        self.C = nn.Parameter(fold_link(self.C, self.U).contiguous(),
                              requires_grad=self.C.requires_grad)
        self.U = None
        self.col_indices = None
        return self

    @property
    def factor_parameters(self) -> int:
        """Stored factor entries (C, U, R; R counted as r×n in the gather form too)."""
        u = 0 if self.U is None else self.U.numel()
        return self.C.numel() + u + self.rank * self.in_features

    @property
    def dense_parameters(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, inner={self.C.shape[1]}, U={self.u_kind}, "
                f"bias={self.bias is not None}, gather={self.gather}, "
                f"params={self.factor_parameters / self.dense_parameters:.3f} of dense")

