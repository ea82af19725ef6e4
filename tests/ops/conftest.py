"""Kernel tests: without a GPU the Triton kernels run on CPU tensors through the interpreter,
which must be switched on before the kernels are defined, hence here. Prefill tuning is off
(the default config is tested; one test switches tuning on): tuning compiles every candidate."""

import os

import pytest
import torch

from curkernels.ops import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CURKERNELS_TRITON_AUTOTUNE", "0")
settings.reload()  # the ops layer read the environment when tests elsewhere imported it


@pytest.fixture
def poisoned():
    """An output buffer full of NaN: any element a kernel fails to write shows up."""
    def make(M, m, dtype, device):
        return torch.full((M, m), float("nan"), dtype=dtype, device=device)
    return make
