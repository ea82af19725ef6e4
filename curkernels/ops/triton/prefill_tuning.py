"""Launch configs of the Triton prefill kernel, tuned once per GPU model and shape class.

Tuned configs are cached on disk (`$CURKERNELS_CACHE_DIR`, default
~/.cache/curkernels/triton_prefill.json).

CURKERNELS_TRITON_AUTOTUNE=0 skips tuning and uses the default config. No tuning happens while
a CUDA graph is being captured or under the interpreter.
"""

import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import settings
from .runtime import TRITON_VERSION


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    r_chunk: int
    block_k: int
    block_n: int
    split_n: int
    num_warps: int
    num_stages: int


def next_pow2(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def _r_chunk(r: int, largest: int) -> int:
    return min(largest, max(16, next_pow2(r)))


def largest_row_block(capability: tuple[int, int]) -> int:
    """The most input rows a prefill tile may hold on a GPU of this compute capability.
    Triton 3.2 (which torch 2.6 pins) aborts the whole process compiling the chained dot of
    64-row tiles for sm_90 (an assertion in LinearLayout::reshapeOuts; 32-row tiles compile):
    no exception to catch, so those tiles are never tried there."""
    return 32 if TRITON_VERSION == (3, 2) and capability >= (9, 0) else 64


# Tiles that Triton 3.8 compiles for sm_80 and sm_90 without register spills (ptxas resource
# report of an ahead-of-time compile): fp16/bf16 operands go to the tensor cores; fp32 runs
# `input_precision="ieee"` dots on the FMA units, whose operands take more registers.
def default_config(M: int, r: int, interpreting: bool, dtype: torch.dtype = torch.bfloat16,
                   capability: tuple[int, int] = (9, 0)) -> PrefillConfig:
    if interpreting:  # few, large programs: the interpreter pays per program and per op
        return PrefillConfig(32, _r_chunk(r, 64), 64, 64, 1, 4, 1)
    if dtype == torch.float32:
        return PrefillConfig(32, _r_chunk(r, 64), 32, 64, 1, 4, 2)
    return PrefillConfig(largest_row_block(capability), _r_chunk(r, 128), 64, 128, 1, 8, 3)


def candidate_configs(M: int, r: int, dtype: torch.dtype = torch.bfloat16,
                      capability: tuple[int, int] = (9, 0)) -> list[PrefillConfig]:
    """A short list (tuning compiles each one): row blocks × column splits, spill-free tiles."""
    if dtype == torch.float32:
        tiles = [(16, _r_chunk(r, 64), 32, 64, 4, 2), (32, _r_chunk(r, 64), 32, 64, 4, 2),
                 (32, _r_chunk(r, 128), 32, 64, 8, 2)]
    else:
        tiles = [(32, _r_chunk(r, 128), 64, 128, 8, 3), (64, _r_chunk(r, 128), 64, 128, 8, 3)]
    return [PrefillConfig(block_m, r_chunk, block_k, block_n, split_n, warps, stages)
            for block_m, r_chunk, block_k, block_n, warps, stages in tiles
            if block_m <= largest_row_block(capability)
            for split_n in (1, 2, 4)]


class TuningCache:
    """{gpu name: {shape key: config}} in one JSON file, written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, dict[str, dict]] | None = None

    def _load(self) -> dict[str, dict[str, dict]]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):  # missing or unreadable cache: tune again
                self._entries = {}
        return self._entries

    def get(self, gpu: str, key: str) -> PrefillConfig | None:
        entry = self._load().get(gpu, {}).get(key)
        return PrefillConfig(**entry) if entry is not None else None

    def put(self, gpu: str, key: str, config: PrefillConfig) -> None:
        self._load().setdefault(gpu, {})[key] = asdict(config)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False,
                                             suffix=".tmp") as tmp:
                json.dump(self._entries, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)
        except OSError:  # a read-only home still gets the in-memory cache
            pass


_cache = TuningCache(settings.current.cache_dir / "triton_prefill.json")
_memo: dict[tuple, PrefillConfig] = {}


@settings.on_reload
def _forget() -> None:
    global _cache
    _cache = TuningCache(settings.current.cache_dir / "triton_prefill.json")
    _memo.clear()


def tuned_config(key: tuple, device: torch.device, dtype: torch.dtype, M: int, r: int,
                 interpreting: bool, run: Callable[[PrefillConfig], None]) -> PrefillConfig:
    """The fastest candidate for this shape class on this GPU model; `run` launches one config."""
    config = _memo.get(key)
    if config is not None:
        return config
    if interpreting:
        return default_config(M, r, interpreting, dtype)
    capability = _capability(device)
    if not settings.current.autotune or torch.cuda.is_current_stream_capturing():
        return default_config(M, r, interpreting, dtype, capability)
    gpu = torch.cuda.get_device_name(device)
    text_key = "|".join(str(part) for part in key)
    config = _cache.get(gpu, text_key)
    if config is None or config.block_m > largest_row_block(capability):
        config = _benchmark(M, r, dtype, capability, run)
        _cache.put(gpu, text_key, config)
    _memo[key] = config
    return config


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability Triton compiles for at this call: its driver's current target,
    which is what its own launch compiles for (a ROCm target counts as no NVIDIA one)."""
    from triton.runtime import driver

    arch = driver.active.get_current_target().arch
    return divmod(arch, 10) if isinstance(arch, int) else (0, 0)


def _benchmark(M: int, r: int, dtype: torch.dtype, capability: tuple[int, int],
               run: Callable[[PrefillConfig], None]) -> PrefillConfig:
    import triton.testing

    best, best_ms = default_config(M, r, False, dtype, capability), float("inf")
    for config in candidate_configs(M, r, dtype, capability):
        try:
            ms = triton.testing.do_bench(lambda config=config: run(config), warmup=5, rep=20,
                                         return_mode="median")
        except Exception:  # a config the compiler or the GPU rejects (resources) is skipped
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    return best
