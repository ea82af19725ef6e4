"""Records which backend (and Triton tile config) dispatch picks over a grid of calls.

The grid: the GPUs the package ships measured tables for (and one it ships none for) × dtypes ×
row counts × the shipped layer shapes and ranks × eager / CUDA graph / torch.compile × which
backends can run, for single layers and sibling groups. No GPU is needed: the device's name and
capability and which backends import are faked, as tests/ops/test_dispatch.py fakes them.
"compile" asks what "graph" asks: dispatch decides when the op runs, never while torch.compile
traces, and the code before the ops move counted a decision asked while tracing as a graph one. `python tests/ops/record_dispatch_decisions.py` writes
tests/ops/fixtures/dispatch_decisions.json; tests/ops/test_dispatch_decisions.py checks that the
code still picks the same.
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

from curkernels.ops import dispatch, settings
from curkernels.ops.triton import decode

FIXTURE = Path(__file__).with_name("fixtures") / "dispatch_decisions.json"

DEVICES = {"NVIDIA H100 80GB HBM3": (9, 0), "NVIDIA H200": (9, 0),
           "NVIDIA A100-SXM4-80GB": (8, 0)}  # the last: no table shipped, the rules answer
DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
ROWS = (1, 2, 4, 8, 16, 17, 32, 64, 65, 128, 1024)
MODES = ("eager", "graph", "compile")
# which of the optional backends import: both, Triton only (no extension), neither
AVAILABLE = {"all": ("triton", "curkernels._C"), "triton": ("triton",), "none": ()}
LAYERS = ((1024, 4096), (4096, 4096), (4096, 14336), (14336, 4096))  # Llama-3.1-8B (m, n)
RANKS = (256, 512, 1024, 2048)
GROUPS = {f"qkv-r{r}": ((4096, r), (1024, r), (1024, r)) for r in (256, 512, 1024)} | {
    f"gate_up-r{r}": ((14336, r), (14336, r)) for r in RANKS} | {
    f"qk-r{r}": ((4096, r), (1024, r)) for r in (128, 256)} | {
    "qkv-keep0.5": ((4096, 1024), (1024, 384), (1024, 384)),
    "gate_up-keep0.5": ((14336, 1536), (14336, 1536))}
GROUP_INPUT_FEATURES = 4096
ENVIRONMENT = (settings.ENV_BACKEND, settings.ENV_DECODE_TABLE, settings.ENV_GROUP_TABLE,
               settings.ENV_DECODE_CONFIGS)
DECODE_ROWS = tuple(rows for rows in ROWS if rows <= 64)


class FakeCudaInput:
    """Stands in for a CUDA input: dispatch reads its device, dtype, shape and is_cuda."""
    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, rows: int, features: int, dtype: torch.dtype):
        self.shape = (rows, features)
        self.dtype = dtype


@contextlib.contextmanager
def faked(device: str, available: str = "all", backend: str | None = None):
    """The process as it would be on `device` with the `available` backends importable and
    CURKERNELS_BACKEND=`backend`; the measured tables' environment variables unset; settings
    read again and memoized choices forgotten before and after."""
    def import_error(module: str) -> str | None:
        return None if module in AVAILABLE[available] else f"ImportError: no {module} (faked)"

    def forget() -> None:
        settings.reload()
        decode._device_name.cache_clear()

    environment = {name: None for name in ENVIRONMENT} | {"CURKERNELS_BACKEND": backend}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {}))
        for name, value in environment.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_name",
                                              lambda *_, **__: device))
        stack.enter_context(mock.patch.object(torch.cuda, "get_device_capability",
                                              lambda *_, **__: DEVICES[device]))
        stack.enter_context(mock.patch.object(dispatch, "_import_error", import_error))
        # eager calls: no capture underway (the real query needs a GPU's driver)
        stack.enter_context(mock.patch.object(dispatch, "stream_capturing", lambda: False))
        forget()
        stack.callback(forget)
        yield


def _outcome(choose) -> str:
    try:
        return choose()
    except (TypeError, RuntimeError) as error:  # a named backend that cannot run, float64
        return f"error:{type(error).__name__}"


def single_backend(rows: int, shape: tuple[int, int, int], dtype: torch.dtype,
                   linked: bool, mode: str) -> str:
    """The backend an 'auto' `cur_linear` call of an m×n layer of rank r runs on."""
    return _outcome(lambda: dispatch.single_backend("auto", FakeCudaInput.device, dtype, rows,
                                                    shape, linked, mode != "eager"))


def group_way(rows: int, members: tuple[tuple[int, int], ...], dtype: torch.dtype,
              mode: str) -> str:
    """How a sibling group's call runs: 'members' (each member's own `cur_linear`), or the
    shared path's 'torch' (the shared cuBLAS chain) or 'triton' (one group launch)."""
    x = FakeCudaInput(rows, GROUP_INPUT_FEATURES, dtype)

    def way() -> str:
        if mode == "eager" and not dispatch.group_serves(x, rows, members):
            return "members"
        return dispatch.group_choice(x, rows, members, mode != "eager")[0]
    return _outcome(way)


def tile_config(rows: int, shape: tuple[int, int, int], dtype: torch.dtype) -> str:
    """The Triton decode kernel's tile config for this call, as 'field=value ...'."""
    config = decode._measured_config(torch.device("cuda", 0), dtype, rows, shape)
    return " ".join(f"{field}={value}" for field, value in sorted(vars(config).items()))


def decisions() -> dict:
    single, groups, tiles = {}, {}, {}
    for device in DEVICES:
        for available in AVAILABLE:
            for mode in MODES:
                for dtype in DTYPES:
                    with faked(device, available):
                        for m, n in LAYERS:
                            for r in RANKS:
                                for linked in (False, True):
                                    key = f"{device}|{available}|{mode}|{dtype}|{m}x{n}r{r}"
                                    single[f"{key}|{'linked' if linked else 'folded'}"] = [
                                        single_backend(rows, (m, n, r), dtype, linked, mode)
                                        for rows in ROWS]
                    for backend in ("auto", "triton"):
                        with faked(device, available, None if backend == "auto" else backend):
                            for name, members in GROUPS.items():
                                groups[f"{device}|{available}|{mode}|{dtype}|{backend}|{name}"] \
                                    = [group_way(rows, members, dtype, mode) for rows in ROWS]
        for dtype in DTYPES[:3]:
            with faked(device):
                for m, n in LAYERS:
                    for r in RANKS:
                        tiles[f"{device}|{dtype}|{m}x{n}r{r}"] = [
                            tile_config(rows, (m, n, r), dtype) for rows in DECODE_ROWS]
    # one string a point: row counts in ROWS order (DECODE_ROWS for tile configs), tile
    # configs by their index in "tile_config_fields"
    fields = sorted({config for configs in tiles.values() for config in configs})
    return {"single": {key: " ".join(ways) for key, ways in single.items()},
            "groups": {key: " ".join(ways) for key, ways in groups.items()},
            "tile_configs": {key: " ".join(str(fields.index(config)) for config in configs)
                             for key, configs in tiles.items()},
            "tile_config_fields": {str(index): config for index, config in enumerate(fields)},
            "rows": {"single": " ".join(map(str, ROWS)), "groups": " ".join(map(str, ROWS)),
                     "tile_configs": " ".join(map(str, DECODE_ROWS))}}


def _lines(section) -> str:
    """A section of the fixture with one point a line: a changed decision reads off the diff."""
    return "{\n" + ",\n".join(f"{json.dumps(key)}: {json.dumps(value)}"
                               for key, value in sorted(section.items())) + "\n}"


def main() -> None:
    FIXTURE.parent.mkdir(exist_ok=True)
    sections = sorted(decisions().items())
    FIXTURE.write_text("{\n" + ",\n".join(f"{json.dumps(name)}: {_lines(section)}"
                                            for name, section in sections) + "\n}\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
