"""`compress(model, method=..., keep=..., calib=...)`: the one-call user API."""

import time
from collections.abc import Callable

from torch import nn

from .budget import check_keep
from .report import CompressionReport
from .svd import compress_svd
from .targets import resolve_targets

# method name -> (compress function, needs calibration)
METHODS: dict[str, tuple[Callable, bool]] = {
    "svd": (compress_svd, False),
}


def compress(model: nn.Module, method: str = "svd", keep: float = 0.5, calib=None, *,
             targets=None, exclude=(), rank_multiple: int = 1, **opts) -> CompressionReport:
    """Factor the target Linears of `model` in place and return a `CompressionReport`.

    Args:
        method: one of `METHODS`.
        keep: fraction of the targeted Linears' weight entries that remain (0 < keep ≤ 1).
        calib: calibration batches (dicts with input_ids / attention_mask) for methods that
            need them.
        targets: name patterns (globs or suffixes) of the Linears to factor; the method's
            default when None. exclude: patterns to leave dense.
        rank_multiple: round ranks down to a multiple (8–128 suits tensor cores).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    keep = check_keep(keep)
    run, needs_calibration = METHODS[method]
    if needs_calibration and calib is None:
        raise ValueError(f"method {method!r} needs calibration data: pass calib=")
    chosen = resolve_targets(model, targets, exclude)
    start = time.perf_counter()
    modules = run(model, chosen, keep, calib=calib, rank_multiple=rank_multiple, **opts)
    report = CompressionReport(method, keep, modules, time.perf_counter() - start)
    config = getattr(model, "config", None)
    if config is not None:
        config.compression_config = {"method": method, "keep": keep}
    model.compression_report = report
    return report
