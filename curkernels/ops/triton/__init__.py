"""The Triton kernels of `cur_linear` (decode, sibling-group decode, prefill) and their host code."""
