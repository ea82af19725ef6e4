"""`compress(model, method=..., keep=..., calib=...)`: the one-call user API."""

import json
import time
from collections.abc import Callable

from torch import nn

from .asvd import compress_asvd
from .budget import check_keep
from .calibration import is_causal_lm
from .calibration_sources import as_batches
from .curing import compress_curing
from .layer_selection import angular_layer_scores, block_list, select_layers
from .lpaf import compress_lpaf
from .pairwise import compress_pairwise
from .report import CompressionReport
from .rom import ROM_PRESETS, compress_rom
from .svd import compress_svd
from .svdllm import compress_svdllm
from .targets import default_scope, resolve_targets

# method name -> (compress function, needs calibration)
METHODS: dict[str, tuple[Callable, bool]] = {
    "svd": (compress_svd, False),
    "asvd": (compress_asvd, True),
    "svdllm": (compress_svdllm, True),
    "curing": (compress_curing, True),
    "rom": (compress_rom, True),
    "lpaf": (compress_lpaf, True),
    "pairwise": (compress_pairwise, True),
}
# the best method for a decoder LM (`method=None`); other models keep the plain SVD default
DECODER_DEFAULT, OTHER_DEFAULT = "pairwise", "svd"


def compress(model: nn.Module, method: str | None = None, keep: float | None = None, calib=None, *,
             targets=None, exclude=(), layers=None, preset: str | None = None,
             rank_multiple: int = 1, tokenizer=None, seq_len: int = 256, batch_size: int = 16,
             num_samples: int | None = None, **opts) -> CompressionReport:
    """Factor the target Linears of `model` in place and return a `CompressionReport`.

    Args:
        method: one of `METHODS` (svd, asvd, svdllm, curing, rom, lpaf, pairwise); None picks
            the best for the model: pairwise for decoder LMs, svd otherwise.
        keep: fraction of the targeted Linears' weight entries that remain, counting every
            stored factor (0 < keep ≤ 1; default 0.5). CURing also caps its rank at
            `max_rank=256` (the paper's rule is keep=1.0: the break-even rank, capped).
        calib: calibration data — an iterable of input dicts (input_ids, attention_mask), or a
            list of strings / a text-file path / a datasets name with `tokenizer=` (cut to
            `num_samples` texts of at most `seq_len` tokens, `batch_size` a batch).
        targets: name patterns (globs or suffixes) of the Linears to factor; the method's
            default when None (CURing on decoder LMs: q_proj, k_proj, gate_proj; otherwise
            every Linear inside the repeated blocks). exclude: patterns to leave dense.
        layers: block indices to compress, or a count N to pick the N blocks of smallest
            angular distance (first and last excluded; needs calib). Default: all blocks, or
            10 picked blocks for CURing on decoder LMs.
        preset: one of `ROM_PRESETS` ("90%", "80%", "50%"), the ROM paper's settings named
            by the fraction of the whole model that remains: sets `keep` and `layers` (the
            last blocks), so neither may be given with it. Any method accepts it.
        rank_multiple: round ranks down to a multiple (8–128 suits tensor cores).
        opts: method options (e.g. selection="qdeim"|"greedy", max_rank=, energy=, svd= for
            curing; alpha= for asvd; damping=, allocation="global", sequential=True,
            weighting="fisher", fisher_damping= for svdllm; sparsity=,
            sweeps=, mixed_rank_steps=, lr= for lpaf; ridge=, damping=, refit=, sequential=,
            allocation=, temperature= for pairwise).
    """
    if method is None:
        method = DECODER_DEFAULT if is_causal_lm(model) else OTHER_DEFAULT
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if preset is not None:
        if preset not in ROM_PRESETS:
            raise ValueError(f"preset must be one of {sorted(ROM_PRESETS)}, got {preset!r}")
        if keep is not None or layers is not None:
            raise ValueError(f"preset={preset!r} sets keep and layers: give neither with it")
        keep = ROM_PRESETS[preset].keep
        layers = ROM_PRESETS[preset].layers(len(block_list(model)[1]))
    keep = check_keep(0.5 if keep is None else keep)
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive integer, got {rank_multiple!r}")
    run, needs_calibration = METHODS[method]
    batches = None if calib is None else as_batches(
        calib, tokenizer, seq_len=seq_len, batch_size=batch_size, num_samples=num_samples)
    if needs_calibration and batches is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calib=")
    default_targets, default_layer_count = default_scope(method, model)
    if isinstance(targets, str):
        targets = [targets]
    if targets is None:
        targets = default_targets
    if layers is None:
        layers = default_layer_count
    if isinstance(layers, int) and not isinstance(layers, bool):
        if batches is None:
            raise ValueError("layers=N picks blocks by angular distance and needs calib=; "
                             "pass block indices to choose them yourself")
        layers = select_layers(angular_layer_scores(model, batches), layers)
    layers = None if layers is None else sorted(int(i) for i in layers)
    chosen = resolve_targets(model, targets, exclude, layers)
    start = time.perf_counter()
    modules = run(model, chosen, keep, calib=batches, rank_multiple=rank_multiple, **opts)
    report = CompressionReport(method, keep, modules, time.perf_counter() - start)
    config = getattr(model, "config", None)
    if config is not None:
        config.compression_config = {
            "method": method, "keep": keep, "rank_multiple": rank_multiple,
            "layers": layers, "preset": preset,
            "targets": None if targets is None else list(targets),
            "options": _json_safe(opts)}
    model.compression_report = report
    return report


def _json_safe(opts: dict) -> dict:
    """The options that survive a JSON round trip (tensors, models and callables do not)."""
    safe = {}
    for key, value in opts.items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        safe[key] = value
    return safe
