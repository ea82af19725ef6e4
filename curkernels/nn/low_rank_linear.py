"""`LowRankLinear`: a drop-in `nn.Linear` storing W ≈ A·B (two factors)."""

import torch
from torch import nn

from ..ops import cur_linear
from .cur_linear import _truncated_svd


class LowRankLinear(nn.Module):
    """y = x·(A·B)ᵀ + b, computed as (x·Bᵀ)·Aᵀ + b. A is (m, r), B is (r, n)."""

    SHRINK_FACTOR, EXPAND_FACTOR = "B", "A"  # the parameters `share_input_shrinks` works on
    HEALABLE = ("A", "B")  # what healing trains

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None, *,
                 backend: str = "auto"):
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(f"A (m×r) and B (r×n) must share r, got A {tuple(A.shape)} and "
                             f"B {tuple(B.shape)}")
        self.in_features = B.shape[1]
        self.out_features = A.shape[0]
        self.backend = backend
        self.shared_shrink = self.shared_index = None  # see shared_shrink.py
        self.A = nn.Parameter(A.detach().contiguous())
        self.B = nn.Parameter(B.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous())
        if self.bias is not None and tuple(self.bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), "
                             f"got {tuple(self.bias.shape)}")

    @property
    def rank(self) -> int:
        return self.B.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **kwargs) -> "LowRankLinear":
        """Truncated SVD split evenly: A = U_r·√Σ, B = √Σ·V_rᵀ (computed in fp64)."""
        left, sigma, right = _truncated_svd(linear.weight, rank)
        root = sigma.sqrt()
        dtype = linear.weight.dtype
        return cls((left * root).to(dtype), (root[:, None] * right).to(dtype),
                   None if linear.bias is None else linear.bias.detach(), **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_shrink
        if shared is not None and shared.serves(x):
            return shared.forward_member(self, x)
        params = self._parameters  # direct: nn.Module.__getattr__ costs µs per factor
        return cur_linear(x, params["A"], None, params["B"], params.get("bias"),
                          backend=self.backend, check_factors=False)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.A.device, dtype=self.A.dtype)
        linear.weight.copy_(self.A.double() @ self.B.double())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def fold(self) -> "LowRankLinear":
        """Already two factors: nothing to fold."""
        return self

    @property
    def factor_parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    @property
    def dense_parameters(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, "
                f"params={self.factor_parameters / self.dense_parameters:.3f} of dense")
