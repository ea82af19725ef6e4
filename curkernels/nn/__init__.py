"""Drop-in factorized modules and the surgery that puts them into a model."""

from .cur_linear import CURLinear
from .inference import prepare_for_inference
from .narrow_linear import NarrowLinear
from .shared_shrink import share_input_shrinks
from .surgery import find_linears, name_matches, swap_linears

__all__ = ["CURLinear", "NarrowLinear", "find_linears", "name_matches", "prepare_for_inference",
           "share_input_shrinks", "swap_linears"]
