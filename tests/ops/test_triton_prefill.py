"""The Triton prefill kernel (M > 16) against the fp64 reference, outputs poisoned."""

import itertools

import pytest
import torch
from cur_linear_cases import LINKS, assert_matches_reference, kernel_device, make_case

from curkernels.ops import settings
from curkernels.ops.triton import prefill_tuning
from curkernels.ops.triton.prefill import cur_linear_prefill

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = kernel_device()
N, M_OUT = 300, 130  # not multiples of any block size


def run_prefill(case, poisoned):
    y = poisoned(case["x"].shape[0], case["C"].shape[0], case["x"].dtype, case["x"].device)
    cur_linear_prefill(case["x"], case["C"], case["U"], case["R"], case["bias"], case["rows"], y)
    return y


# Every (M, r) pair (r = 100 spans two rank chunks on the CPU); the rest cycles.
GRID = [(M, r, i) for i, (M, r) in enumerate(itertools.product((17, 33), (1, 7, 16, 64, 100)))]


@pytest.mark.parametrize("M,r,i", GRID)
def test_prefill_grid(M, r, i, poisoned):
    case = make_case(M, N, M_OUT, r, (torch.float32, torch.float16)[i % 2], link=LINKS[i % 3],
                     bias=i % 4 < 2, gather=(i // 2) % 2 == 1, device=DEVICE, seed=i)
    assert_matches_reference(run_prefill(case, poisoned), case)


@pytest.mark.parametrize("dtype,link,bias,gather", list(itertools.product(
    (torch.float32, torch.float16), LINKS, (False, True), (False, True))))
def test_prefill_features(dtype, link, bias, gather, poisoned):
    case = make_case(17, N, M_OUT, 100, dtype, link=link, bias=bias, gather=gather, device=DEVICE)
    assert_matches_reference(run_prefill(case, poisoned), case)


def test_prefill_clamps_out_of_range_rows(poisoned):
    case = make_case(20, N, M_OUT, 7, torch.float32, gather=True, device=DEVICE)
    base_rows = case["R"].shape[0]
    case["rows"][0] = base_rows + 7
    y = run_prefill(case, poisoned)
    assert_matches_reference(y, dict(case, rows=case["rows"].clamp(0, base_rows - 1)))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_candidate_configs_keep_the_intermediate_small(dtype):
    """The on-chip intermediate (block_m × r_chunk fp32) stays within the spill-free tiles."""
    for r in (1, 100, 256, 1024):
        configs = prefill_tuning.candidate_configs(64, r, dtype)
        assert prefill_tuning.default_config(64, r, False, dtype) in configs
        assert all(c.block_m * c.r_chunk <= 8192 for c in configs)
        assert all(c.r_chunk <= max(16, 1 << (r - 1).bit_length()) for c in configs)


def test_triton_3_2_never_tries_64_row_tiles_on_hopper(tmp_path, monkeypatch):
    """Triton 3.2 aborts the process compiling them for sm_90: neither the default, nor a
    candidate, nor a config cached by another Triton; sm_80 and other Tritons keep them."""
    monkeypatch.setattr(prefill_tuning, "TRITON_VERSION", (3, 2))
    for dtype in (torch.float32, torch.bfloat16):
        hopper = prefill_tuning.candidate_configs(4096, 1024, dtype, (9, 0))
        assert hopper and all(c.block_m <= 32 for c in hopper)
        assert prefill_tuning.default_config(4096, 1024, False, dtype, (9, 0)) in hopper
    assert {c.block_m for c in prefill_tuning.candidate_configs(4096, 1024, torch.bfloat16,
                                                                  (8, 0))} == {32, 64}
    monkeypatch.setattr(prefill_tuning, "_cache", prefill_tuning.TuningCache(tmp_path / "t.json"))
    monkeypatch.setattr(prefill_tuning, "_memo", {})
    monkeypatch.setattr(prefill_tuning, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "G")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv("CURKERNELS_TRITON_AUTOTUNE", raising=False)
    settings.reload()
    cached = prefill_tuning.PrefillConfig(64, 128, 64, 128, 1, 8, 3)
    prefill_tuning._cache.put("G", "k", cached)
    tuned = prefill_tuning.PrefillConfig(32, 128, 64, 128, 2, 8, 3)
    monkeypatch.setattr(prefill_tuning, "_benchmark", lambda *args: tuned)
    assert prefill_tuning.tuned_config(("k",), torch.device("cuda", 0), torch.bfloat16, 4096,
                                        1024, False, lambda config: None) == tuned
    monkeypatch.setattr(prefill_tuning, "TRITON_VERSION", (3, 6))
    assert {c.block_m for c in prefill_tuning.candidate_configs(4096, 1024, torch.bfloat16,
                                                                  (9, 0))} == {32, 64}


def test_tuning_cache_round_trip(tmp_path):
    cache = prefill_tuning.TuningCache(tmp_path / "tune.json")
    config = prefill_tuning.PrefillConfig(64, 128, 64, 128, 2, 8, 3)
    cache.put("NVIDIA H100 80GB HBM3", "bf16|4096", config)
    reread = prefill_tuning.TuningCache(tmp_path / "tune.json")
    assert reread.get("NVIDIA H100 80GB HBM3", "bf16|4096") == config
    assert reread.get("NVIDIA H200", "bf16|4096") is None


def test_tuning_cache_ignores_a_corrupt_file(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    assert prefill_tuning.TuningCache(path).get("gpu", "key") is None


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
@pytest.mark.parametrize("link", LINKS)
def test_prefill_gpu(dtype, link, poisoned):
    for M, r, seed in ((17, 64, 0), (1000, 256, 1), (300, 1024, 2)):
        case = make_case(M, 4096, 1000, r, dtype, link=link, gather=seed == 1, device="cuda",
                         seed=seed)
        assert_matches_reference(run_prefill(case, poisoned), case)


@gpu
@pytest.mark.gpu
def test_prefill_tuning_caches_the_winner_by_gpu(tmp_path, monkeypatch, poisoned):
    monkeypatch.setenv("CURKERNELS_TRITON_AUTOTUNE", "1")
    settings.reload()
    monkeypatch.setattr(prefill_tuning, "_cache", prefill_tuning.TuningCache(tmp_path / "t.json"))
    monkeypatch.setattr(prefill_tuning, "_memo", {})
    case = make_case(100, 1024, 512, 64, torch.bfloat16, device="cuda")
    assert_matches_reference(run_prefill(case, poisoned), case)
    gpu_name = torch.cuda.get_device_name()
    entries = prefill_tuning.TuningCache(tmp_path / "t.json")._load()[gpu_name]
    assert len(entries) == 1
