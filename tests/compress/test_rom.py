import copy

import pytest
import torch

import curkernels as ck
from curkernels.compress.calibration import collect_linear_stats
from curkernels.compress.rom import rom_factors
from curkernels.compress.targets import resolve_targets
from curkernels.nn import LowRankLinear


def test_full_rank_reproduces_outputs(tiny_bert, batches):
    linear = tiny_bert.encoder.layer[0].intermediate.dense  # 64×32: outputs span ≤ 32 dims
    s = collect_linear_stats(tiny_bert, {"l": linear}, batches, outputs=True)["l"]
    A, B, bias = rom_factors(linear.weight, linear.bias, s.output_mean, s.output_covariance,
                             linear.out_features)
    module = LowRankLinear(A.float(), B.float(), bias.float())
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
