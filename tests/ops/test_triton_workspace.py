"""Kernel workspaces: zeroed buffers of the asked sizes and dtypes (the CUDA-graph pool rules
are tested on a GPU in test_gpu_model_capture.py)."""

import torch

from curkernels.ops.triton.workspace import capturing, persistent_zeros, zeros


def test_buffers_are_zeroed_with_the_asked_sizes_and_dtypes():
    for make in (zeros, persistent_zeros):
        sync, sums = make((4, 6), (torch.int32, torch.float32), torch.device("cpu"))
        assert (sync.dtype, sums.dtype) == (torch.int32, torch.float32)
        assert sync.shape == (4,) and sums.shape == (6,)
        assert not sync.any() and not sums.any()


def test_cpu_tensors_are_never_being_captured():
    assert not capturing(torch.device("cpu"))
