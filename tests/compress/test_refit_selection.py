import itertools

import pytest
import torch

from curkernels.compress.calibration import PairedInputStats
from curkernels.compress.refit_selection import greedy_refit_selection


def paired_stats(dense: torch.Tensor, compressed: torch.Tensor) -> PairedInputStats:
    return PairedInputStats(tokens=dense.shape[0], sum=compressed.sum(0), dense_sum=dense.sum(0),
                            gram=compressed.T @ compressed, cross=dense.T @ compressed)


def refit_error(weight, dense, compressed, kept, bias=False):
    """min over Ŵ (and b̂ with `bias`) of the mean ‖Wx − Ŵx̂_K − b̂‖², by least squares on the
    samples."""
    target = dense @ weight.T
    inputs = compressed[:, kept]
    if bias:
        inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)], 1)
    fit = torch.linalg.lstsq(inputs, target).solution
    return float((target - inputs @ fit).square().sum(1).mean())


def correlated_inputs(tokens=400, width=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    dense = torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing
    compressed = dense + 0.3 * torch.randn(dense.shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, width, generator=generator, dtype=torch.float64)
    weight[:, 2] *= 20  # an input the outputs lean on
    return weight, dense, compressed


@pytest.mark.parametrize("bias", [False, True])
def test_each_greedy_pick_is_the_best_next_input_for_the_refit(bias):
    weight, dense, compressed = correlated_inputs()
    if bias:  # inputs far from zero mean: a fit with a bias sees only their spread
        dense, compressed = dense + 3.0, compressed + 3.0
    stats = paired_stats(dense, compressed)
    columns = torch.arange(dense.shape[1])[:, None]
    picks = greedy_refit_selection(weight, stats, columns, 4, ridge=1e-12, centred=bias)
    chosen = []
    for _ in range(4):  # brute force: the least-squares error of every extension
        errors = {c: refit_error(weight, dense, compressed, chosen + [c], bias)
                  for c in range(dense.shape[1]) if c not in chosen}
        chosen.append(min(errors, key=errors.get))
    assert picks.tolist() == sorted(chosen)
    assert chosen[0] == 2


def test_grouped_candidates_keep_their_inputs_together():
    weight, dense, compressed = correlated_inputs(width=8, seed=1)
    stats = paired_stats(dense, compressed)
    columns = torch.tensor([[0, 4], [1, 5], [2, 6], [3, 7]])  # candidate c keeps c and c + 4
    picks = greedy_refit_selection(weight, stats, columns, 2, ridge=1e-12)
    best = min(itertools.combinations(range(4), 2), key=lambda pair: refit_error(
        weight, dense, compressed, columns[list(pair)].flatten().tolist()))
    first = min(range(4), key=lambda c: refit_error(weight, dense, compressed,
                                                    columns[c].tolist()))
    assert first in picks.tolist()
    # greedy is not exhaustive, but on this small case it finds the best pair
    assert picks.tolist() == list(best)


def test_bad_count_is_named():
    weight, dense, compressed = correlated_inputs()
    with pytest.raises(ValueError, match="count must be in"):
        greedy_refit_selection(weight, paired_stats(dense, compressed),
                               torch.arange(9)[:, None], 10, ridge=1e-3)
