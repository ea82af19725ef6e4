import pytest
import torch

from curkernels.compress.deim import deim_select, deim_select_reference, greedy_select, qdeim_select


def orthonormal(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("m,k", [(50, 1), (64, 16), (300, 40), (1000, 128)])
def test_fast_deim_matches_textbook(m, k):
    V = orthonormal(m, k, seed=m + k)
    assert deim_select(V).tolist() == deim_select_reference(V).tolist()


@pytest.mark.parametrize("select", [deim_select, qdeim_select, greedy_select])
def test_indices_distinct_and_in_range(select):
    V = orthonormal(200, 60, seed=3)
    picks = select(V)
    assert picks.dtype == torch.int64 and picks.numel() == 60
    assert picks.unique().numel() == 60
    assert 0 <= int(picks.min()) and int(picks.max()) < 200


@pytest.mark.parametrize("select", [deim_select, qdeim_select])
def test_selected_rows_interpolate_well(select):
    # DEIM / Q-DEIM picks give a well-conditioned interpolation matrix V[picks]
    V = orthonormal(400, 30, seed=5)
    sub = V[select(V)]
    assert torch.linalg.cond(sub) < 1e3


def test_reference_deim_by_hand():
    # column 1 peaks at row 2; the residual of column 2 after interpolating at row 2 peaks at 0
    V = torch.tensor([[0.1, 1.0], [0.2, 0.1], [0.9, 0.5]], dtype=torch.float64)
    assert deim_select_reference(V).tolist() == [2, 0] == deim_select(V).tolist()


def test_deim_on_float32_basis_matches_float64():
    V = orthonormal(500, 50, seed=9)
    assert deim_select(V.float()).tolist() == deim_select(V).tolist()


@pytest.mark.parametrize("shape", [(3, 5), (0, 0), (10, 0)])
def test_bad_basis_shape_raises(shape):
    with pytest.raises(ValueError, match="basis"):
        deim_select(torch.zeros(shape))


def test_nan_basis_raises():
    V = orthonormal(20, 4)
    V[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        qdeim_select(V)
