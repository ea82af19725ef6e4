"""CURLinear folds a frozen full U into C for the kernels, and refolds when a factor changes."""

import torch
from cur_linear_cases import make_case

from curkernels.nn import cur_linear as cur_linear_module
from curkernels.nn.cur_linear import CURLinear


def _module(trainable=("U",)):
    case = make_case(2, 40, 24, 6, torch.float64, link="full", bias=True)
    return CURLinear(case["C"], case["U"], case["R"], case["bias"], trainable=trainable), case


def _seen_factors(monkeypatch):
    seen = []
    original = cur_linear_module.cur_linear

    def spy(x, C, U, R, bias, **kwargs):
        seen.append((C, U))
        return original(x, C, U, R, bias, **kwargs)

    monkeypatch.setattr(cur_linear_module, "cur_linear", spy)
    return seen


def test_inference_runs_two_factors_with_the_same_output(monkeypatch):
    module, case = _module()
    seen = _seen_factors(monkeypatch)
    with torch.no_grad():
        folded = module(case["x"])
    assert seen[-1][1] is None and seen[-1][0].shape == (24, 6)
    unfolded = case["x"] @ case["R"].t() @ case["U"].t() @ case["C"].t() + case["bias"]
    torch.testing.assert_close(folded, unfolded)


def test_training_u_keeps_three_factors(monkeypatch):
    module, case = _module()
    seen = _seen_factors(monkeypatch)
    module(case["x"]).sum().backward()
    assert seen[-1][1] is module.U
    assert module.U.grad is not None


def test_frozen_factors_fold_even_with_grad_enabled(monkeypatch):
    module, case = _module(trainable=())
    seen = _seen_factors(monkeypatch)
    module(case["x"])
    assert seen[-1][1] is None


def test_in_place_update_of_u_refolds():
    module, case = _module()
    with torch.no_grad():
        before = module(case["x"])
        module.U.mul_(2.0)
        after = module(case["x"])
    torch.testing.assert_close(after - case["bias"], 2 * (before - case["bias"]))
