"""Decode workspaces reserved ahead: a prepared model's Triton decode calls, single layers and
sibling groups, find their workspace by the reservation their memoized choice holds, never by
a keyed lookup; another stream, or a capture asking first, takes the keyed path."""

import pytest
import torch
from cur_linear_cases import kernel_device
from torch import nn

from curkernels.nn import CURLinear, prepare_for_inference
from curkernels.ops import dispatch, settings, unavailable_reason
from curkernels.ops.triton import decode as decode_host
from curkernels.ops.triton import workspace as workspaces

DEVICE = kernel_device()
ROW_COUNTS = (1, 5, 16, 17, 40, 64)  # every row block, at and past its edges
N, M_OUT = 48, 40

pytestmark = pytest.mark.skipif(unavailable_reason("triton", torch.device(DEVICE)) is not None,
                                reason="needs the Triton interpreter or a CUDA device")


@pytest.fixture(autouse=True)
def fresh_workspaces(monkeypatch):
    """No workspace or reservation from other tests; memoized choices made anew."""
    monkeypatch.setattr(workspaces, "_workspaces", {})
    monkeypatch.setattr(workspaces, "_reserved", {})
    dispatch.choices.clear()
    dispatch.group_choices.clear()


@pytest.fixture
def lookups(monkeypatch):
    """Every keyed workspace lookup, as (r, c, row block)."""
    seen = []
    original = workspaces.decode_workspace

    def spy(device, r, c, rows):
        seen.append((r, c, rows))
        return original(device, r, c, rows)

    monkeypatch.setattr(workspaces, "decode_workspace", spy)
    monkeypatch.setattr(decode_host, "decode_workspace", spy)
    return seen


def _layer(rank: int, seed: int = 0, backend: str = "triton") -> CURLinear:
    generator = torch.Generator().manual_seed(seed)
    return CURLinear(torch.randn(M_OUT, rank, generator=generator) * 0.3,
                     torch.rand(rank, generator=generator) + 0.5,  # a diagonal link: folded
                     torch.randn(rank, N, generator=generator) * 0.3,
                     torch.randn(M_OUT, generator=generator), backend=backend).to(DEVICE)


def _dense(layer: CURLinear, x: torch.Tensor) -> torch.Tensor:
    return layer.to_dense()(x)


def test_prepare_makes_every_row_block_of_a_layer():
    prepare_for_inference(_layer(6))
    assert sorted((key[2], key[3], key[4]) for key in workspaces._workspaces) == [
        (6, 6, 16), (6, 6, 32), (6, 6, 64)]


def test_a_prepared_layer_never_looks_its_workspace_up(lookups):
    layer = prepare_for_inference(_layer(6))
    lookups.clear()
    with torch.no_grad():
        for M in ROW_COUNTS:
            x = torch.randn(M, N, device=DEVICE)
            for _ in range(2):
                torch.testing.assert_close(layer(x), _dense(layer, x), rtol=1e-4, atol=1e-4)
    assert lookups == []


def test_an_unprepared_layer_looks_up_once_per_row_count(lookups):
    """The first call of a row count (warm-up) makes its workspace; later calls find it."""
    layer = _layer(5, backend="triton").requires_grad_(False)
    layer.fold()
    with torch.no_grad():
        for M in (1, 1, 40, 40, 1):
            layer(torch.randn(M, N, device=DEVICE))
    assert lookups == [(5, 5, 16), (5, 5, 64)]


def test_linked_layers_keep_the_keyed_lookup(lookups):
    """A full link left unfolded (fold=False, trained U) has a link width the choice's key does
    not hold: its calls look their workspace up as before."""
    generator = torch.Generator().manual_seed(1)
    layer = CURLinear(torch.randn(M_OUT, 7, generator=generator) * 0.3,
                      torch.randn(7, 5, generator=generator),
                      torch.randn(5, N, generator=generator) * 0.3, backend="triton",
                      trainable=("U",)).to(DEVICE)
    for _ in range(2):  # U trains (grad enabled): not folded per call either
        layer(torch.randn(1, N, device=DEVICE))
    assert lookups == [(5, 7, 16)] * 2


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (_layer(rank, seed, backend="auto")
                                                 for seed, rank in enumerate((4, 6, 5)))


def test_a_prepared_group_never_looks_its_workspace_up(lookups, monkeypatch):
    """Sibling groups run the group kernel where Triton is named (the interpreter on a CPU);
    prepare_for_inference reserves the stacked rank's workspaces as well."""
    attention = _Attention()
    with torch.no_grad():
        inputs = [torch.randn(M, N, device=DEVICE) for M in ROW_COUNTS]
        expected = [[_dense(attention.get_submodule(name), x) for name in ("q_proj", "k_proj",
                                                                           "v_proj")]
                    for x in inputs]
    prepare_for_inference(attention, share_shrinks=True)  # groups form with backend 'auto'
    monkeypatch.setenv(settings.ENV_BACKEND, "triton")
    settings.reload()
    prepare_for_inference(attention)  # now Triton runs them here: their workspaces are made
    assert {key[2:] for key in workspaces._workspaces} >= {(15, 15, 16), (15, 15, 64)}
    lookups.clear()
    with torch.no_grad():
        for x, wanted in zip(inputs, expected, strict=True):
            outputs = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
            for output, reference in zip(outputs, wanted, strict=True):
                torch.testing.assert_close(output, reference, rtol=1e-4, atol=1e-4)
    assert [way for way, _ in dispatch.group_choices.values()] == ["triton"] * len(ROW_COUNTS)
    assert lookups == []
    monkeypatch.delenv(settings.ENV_BACKEND)
    settings.reload()


def test_another_stream_or_a_capture_takes_the_keyed_lookup(monkeypatch):
    """The reservation serves the stream it first met outside a capture; calls on another
    stream, and a capture asking before any stream was bound, get `decode_workspace`'s (a
    capture's temporary is not kept)."""
    current = {"stream": 7, "capturing": False}
    made = []

    def decode_workspace(device, r, c, rows):
        made.append((current["stream"], rows))
        return object()

    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream",
                        lambda index: current["stream"], raising=False)
    monkeypatch.setattr(workspaces, "capturing", lambda device: current["capturing"])
    monkeypatch.setattr(workspaces, "decode_workspace", decode_workspace)
    reserved = workspaces.ReservedWorkspaces(torch.device("cuda", 0), 8, 8)
    current["capturing"] = True
    assert reserved.get(1, 16) is not reserved.get(1, 16)  # nothing kept, nothing bound
    current["capturing"] = False
    first = reserved.get(1, 16)
    assert reserved.get(1, 16) is first and reserved.stream == 7
    current["stream"] = 9
    assert reserved.get(1, 16) is not first
    current["stream"] = 7
    assert reserved.get(2, 16) is not first  # another row count: its own slot, made once
    assert made == [(7, 16), (7, 16), (7, 16), (9, 16), (7, 16)]
