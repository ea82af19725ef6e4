import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import curkernels as ck
from curkernels.compress import rank_for_keep
from curkernels.compress.calibration import collect_linear_stats
from curkernels.compress.rom import ROM_PRESETS, rom_factors
from curkernels.compress.targets import resolve_targets
from curkernels.nn import CURLinear


def test_full_rank_reproduces_outputs(tiny_bert, batches):
    linear = tiny_bert.encoder.layer[0].intermediate.dense  # 64×32: outputs span ≤ 32 dims
    s = collect_linear_stats(tiny_bert, {"l": linear}, batches, outputs=True)["l"]
    A, B, bias = rom_factors(linear.weight, linear.bias, s.output_mean, s.output_covariance,
                             linear.out_features)
    module = CURLinear(A.float(), None, B.float(), bias.float())
    x = torch.randn(5, 32)
    torch.testing.assert_close(module(x), linear(x), rtol=1e-4, atol=1e-5)


def test_low_rank_outputs_recovered_and_mean_kept():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 24)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 4) @ torch.randn(4, 16))  # rank 4
    x = torch.randn(500, 16)
    y = linear(x).double().detach()
    mean = y.mean(0)
    cov = torch.cov(y.T, correction=0)
    A, B, bias = rom_factors(linear.weight, linear.bias, mean, cov, 4)
    approx = x.double() @ (A @ B).T + bias
    torch.testing.assert_close(approx, y, rtol=1e-4, atol=1e-5)
    # at a rank below the output rank the mean output is still preserved exactly
    A, B, bias = rom_factors(linear.weight, linear.bias, mean, cov, 2)
    torch.testing.assert_close((x.double() @ (A @ B).T + bias).mean(0), mean)


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_llama"])
def test_rom_error_falls_as_keep_grows(fixture, batches, request):
    dense = request.getfixturevalue(fixture)
    with torch.no_grad():
        reference = dense(**batches[0])[0]
    errors = []
    for keep in (0.2, 0.5, 0.9):
        model = copy.deepcopy(dense)
        report = ck.compress(model, "rom", keep, batches)
        assert report.kept <= keep and len(report.modules) == len(resolve_targets(dense))
        with torch.no_grad():
            out = model(**batches[0])[0]
        errors.append(float((out - reference).norm() / reference.norm()))
    assert errors == sorted(errors, reverse=True)


def test_rom_forward_order_and_layerwise_inputs(tiny_bert, batches):
    report = ck.compress(tiny_bert, "rom", 0.5, batches)
    names = [m.name for m in report.modules]
    assert names[0].startswith("encoder.layer.0.attention.self")
    assert names[-1] == "encoder.layer.2.output.dense"


def test_presets_give_the_paper_ranks():
    """ROM on LLaMA-7B: r = ⌊budget·mn/(m+n)⌋ — the paper lists 1228/954/675 (4096×4096; the
    rule gives 942 at 0.46) and 1791/1373/985 (4096×11008)."""
    square = [rank_for_keep(4096, 4096, ROM_PRESETS[p].keep) for p in ("90%", "80%", "50%")]
    mlp = [rank_for_keep(4096, 11008, ROM_PRESETS[p].keep) for p in ("90%", "80%", "50%")]
    assert square == [1228, 942, 675] and mlp == [1791, 1373, 985]
    assert [ROM_PRESETS[p].layers(32) for p in ("90%", "80%", "50%")] == [
        list(range(24, 32)), list(range(20, 32)), list(range(8, 32))]


def test_presets_leave_the_named_fraction_of_llama_7b():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    for name, target in (("90%", 0.90), ("80%", 0.80), ("50%", 0.50)):
        preset = ROM_PRESETS[name]
        chosen = resolve_targets(model, layers=preset.layers(32))
        assert len(chosen) == 7 * len(preset.layers(32))
        removed = sum(m * n - rank_for_keep(m, n, preset.keep) * (m + n)
                      for m, n in (linear.weight.shape for linear in chosen.values()))
        assert (total - removed) / total == pytest.approx(target, abs=0.02)


@pytest.mark.parametrize("preset,layers", [("90%", [4]), ("80%", [3, 4]), ("50%", [1, 2, 3, 4])])
def test_preset_compresses_the_last_blocks_at_its_budget(tiny_llama, batches, preset, layers):
    report = ck.compress(tiny_llama, "rom", calib=batches, preset=preset)
    keep = ROM_PRESETS[preset].keep
    config = tiny_llama.config.compression_config
    assert config["preset"] == preset and config["layers"] == layers and config["keep"] == keep
    assert {int(m.name.split(".")[2]) for m in report.modules} == set(layers)
    assert len(report.modules) == 7 * len(layers)
    assert all(m.rank == rank_for_keep(*m.shape, keep) for m in report.modules)
    assert report.params_after <= keep * report.params_before


def test_preset_conflicts_and_unknown_names(tiny_llama, batches):
    with pytest.raises(ValueError, match="sets keep and layers"):
        ck.compress(tiny_llama, "rom", 0.5, batches, preset="80%")
    with pytest.raises(ValueError, match="sets keep and layers"):
        ck.compress(tiny_llama, "rom", calib=batches, preset="80%", layers=[2, 3])
    with pytest.raises(ValueError, match="preset must be one of"):
        ck.compress(tiny_llama, "rom", calib=batches, preset="70%")
