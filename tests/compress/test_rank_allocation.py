import copy

import pytest
import torch

import curkernels as ck
from curkernels.compress.budget import factor_parameters, rank_for_keep
from curkernels.compress.lowrank import allocate_ranks


def test_global_allocation_fits_budget_and_favours_slow_spectra():
    flat = torch.ones(32)  # every component matters equally
    steep = 0.5 ** torch.arange(32, dtype=torch.float64)  # two components hold nearly all
    ranks = allocate_ranks({"flat": (flat, 32, 32), "steep": (steep, 32, 32)}, keep=0.5)
    assert ranks["flat"] > ranks["steep"] >= 1
    assert (ranks["flat"] + ranks["steep"]) * 64 <= 0.5 * 2 * 32 * 32


def test_global_allocation_respects_multiple():
    ranks = allocate_ranks({"a": (torch.rand(40).sort(descending=True).values, 40, 40),
                            "b": (torch.rand(40).sort(descending=True).values, 40, 60)},
                           keep=0.6, multiple=4)
    assert all(r % 4 == 0 and r >= 4 for r in ranks.values())


def test_svdllm_global_allocation_keeps_the_budget(tiny_bert, batches):
    uniform = copy.deepcopy(tiny_bert)
    a = ck.compress(uniform, "svdllm", 0.4, batches)
    b = ck.compress(tiny_bert, "svdllm", 0.4, batches, allocation="global")
    assert b.params_after <= 0.4 * b.params_before
    assert len({m.rank for m in b.modules}) > 1
    assert tiny_bert.config.compression_config["options"] == ck.SVDLLMConfig(
        allocation="global").options()
    assert a.params_before == b.params_before


def test_bad_allocation(tiny_bert, batches):
    with pytest.raises(ValueError, match="allocation"):
        ck.compress(tiny_bert, "svdllm", 0.4, batches, allocation="best")


def test_absolute_allocation_compares_spectra_as_they_are():
    """Same shape of spectrum, ten times the scale: as shares they tie, as absolute σ² (loss
    units, e.g. Fisher-weighted) the louder module takes more of the budget."""
    spectrum = 0.8 ** torch.arange(32, dtype=torch.float64)
    spectra = {"quiet": (spectrum, 32, 32), "loud": (10 * spectrum, 32, 32)}
    shares = allocate_ranks(spectra, keep=0.4)
    assert shares["quiet"] == shares["loud"]
    absolute = allocate_ranks(spectra, keep=0.4, relative=False)
    assert absolute["loud"] > absolute["quiet"]
    assert sum(absolute.values()) * 64 <= 0.4 * 2 * 32 * 32


def test_global_allocation_stops_at_the_breakeven_rank():
    """A flat spectrum next to a steep one would take every component; past 16 (32·32 entries
    = 16·(32 + 32)) its factors would outgrow the dense weight, so it stops there and the
    steep module gets the rest."""
    flat = torch.ones(32, dtype=torch.float64)
    steep = 1e-3 * 0.5 ** torch.arange(64, dtype=torch.float64)
    ranks = allocate_ranks({"flat": (flat, 32, 32), "steep": (steep, 64, 64)}, keep=0.9,
                           relative=False)
    assert ranks["flat"] == 16
    assert ranks["steep"] == int((0.9 * (32 * 32 + 64 * 64) - 16 * 64) // 128)


@pytest.mark.parametrize("u_kind", ["none", "diag", "full"])
def test_rank_for_keep_rounds_down_within_the_budget(u_kind):
    for m, n, keep, multiple in ((100, 300, 0.5, 32), (4096, 11008, 0.3, 128), (64, 96, 0.9, 8)):
        rank = rank_for_keep(m, n, keep, u_kind, multiple)
        assert rank % multiple == 0 and factor_parameters(m, n, rank, u_kind) <= keep * m * n
    # rounding down leaves nothing: an error, not a rank above the budget (this was 64: 2×
    # the dense weight's entries)
    with pytest.raises(ValueError, match="'layer' .*rank_multiple=128"):
        rank_for_keep(64, 64, 0.5, u_kind, 128, module="layer")
    with pytest.raises(ValueError, match="raise keep"):
        rank_for_keep(64, 64, 0.001, u_kind)


def test_allocation_refuses_a_multiple_past_the_breakeven_rank():
    spectra = {"small": (torch.rand(16).sort(descending=True).values, 16, 16),
               "big": (torch.rand(256).sort(descending=True).values, 256, 256)}
    with pytest.raises(ValueError, match=r"rank_multiple=16 .*\['small'\]"):
        allocate_ranks(spectra, keep=0.9, multiple=16)
    with pytest.raises(ValueError, match="keep=0.01 cannot give each module"):
        allocate_ranks({"big": spectra["big"]}, keep=0.01, multiple=16)
