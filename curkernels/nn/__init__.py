"""Drop-in factorized modules and the surgery that puts them into a model."""

from .cur_linear import CURLinear
from .inference import prepare_for_inference
from .low_rank_linear import LowRankLinear
from .narrow_linear import NarrowLinear
from .shared_shrink import share_input_shrinks
from .surgery import find_linears, name_matches, swap_linears

FACTORED_MODULES = (CURLinear, LowRankLinear)

__all__ = ["FACTORED_MODULES", "CURLinear", "LowRankLinear", "NarrowLinear", "find_linears",
           "name_matches", "prepare_for_inference", "share_input_shrinks", "swap_linears"]
