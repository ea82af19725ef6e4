"""`compress(model, method=..., keep=..., calib=...)`: the one-call user API."""

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

from torch import nn

from .asvd import compress_asvd
from .calibration import check_finite_parameters, is_causal_lm
from .calibration_sources import as_batches, check_token_ids
from .configs import MethodConfig, config_class
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


def default_method(model: nn.Module) -> str:
    """The best method for the model's kind: pairwise for decoder LMs, svd otherwise."""
    return DECODER_DEFAULT if is_causal_lm(model) else OTHER_DEFAULT


def compress(model: nn.Module, method: "str | MethodConfig | None" = None, keep: float | None = None,
             calib=None, *, targets=None, exclude=(), layers=None, preset: str | None = None,
             rank_multiple: int = 1, tokenizer=None, seq_len: int = 256, batch_size: int = 16,
             num_samples: int | None = None, **opts) -> CompressionReport:
    """Factor the target Linears of `model` in place and return a `CompressionReport`.

    Two forms: `compress(model, ck.CURingConfig(keep=0.5, selection="qdeim"), calib)` (the
    config holds keep, targets, ... and the method's options; give none of them beside it),
    or `compress(model, "curing", keep=0.5, calib=..., selection="qdeim")`, whose arguments
    build that config. Unknown options and ill-typed values are errors either way.

    Args:
        method: one of `METHODS` (svd, asvd, svdllm, curing, rom, lpaf, pairwise), or its
            config; None picks the best for the model: pairwise for decoder LMs, svd otherwise.
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
        rank_multiple: round ranks down to a multiple (8–128 suits tensor cores); a module
            where not even one multiple fits its budget is an error.
        opts: the method's options, the fields of its config class (`CONFIGS[method]`: e.g.
            `CURingConfig.selection`, `SVDLLMConfig.weighting`, `LPAFConfig.sparsity`).
    """
    config = method_config(model, method, keep=keep, targets=targets, exclude=exclude,
                           layers=layers, preset=preset, rank_multiple=rank_multiple, **opts)
    return _compress(model, config, calib, tokenizer=tokenizer, seq_len=seq_len,
                     batch_size=batch_size, num_samples=num_samples)


def method_config(model: nn.Module, method: "str | MethodConfig | None", **given
                  ) -> MethodConfig:
    """The config of `compress`'s two forms: `method` itself when it is a config (then no
    common field or option may be given beside it), else the named method's config (the
    model's default method when None) built from the common fields and options in `given`."""
    if isinstance(method, MethodConfig):
        defaults = {f.name: f.default for f in fields(MethodConfig)}
        extra = [name for name, value in given.items()
                 if name not in defaults or value != defaults[name]]
        if extra:
            raise ValueError(f"compress(model, config) takes {extra} from the config: set "
                             f"them there, not as arguments")
        return method
    return config_class(default_method(model) if method is None else method)(**given)


@dataclass(frozen=True)
class CompressionPlan:
    """What a config resolves to on one model: the budget, the blocks and the Linears."""
    keep: float
    layers: list[int] | None
    target_patterns: tuple[str, ...] | None
    targets: dict[str, nn.Linear]


def calibration_batches(model: nn.Module, config: MethodConfig, calib, **calib_format
                        ) -> list[dict] | None:
    """`calib` as a list of input dicts, checked against the model's vocabulary; an error
    when the method needs calibration and none is given."""
    batches = None if calib is None else as_batches(calib, **calib_format)
    if METHODS[config.method][1] and batches is None:
        raise ValueError(f"method {config.method!r} needs calibration data: pass calib=")
    if batches is not None:
        check_token_ids(batches, model)
    return batches


def plan_compression(model: nn.Module, config: MethodConfig, batches,
                     layer_scores: Callable = angular_layer_scores) -> CompressionPlan:
    """Resolve the preset, default keep, default targets and layers (`layer_scores(model,
    batches)` scores the blocks when a count of them is to be picked) into the Linears."""
    keep, layers = config.keep, config.layers
    if config.preset is not None:
        keep = ROM_PRESETS[config.preset].keep
        layers = ROM_PRESETS[config.preset].layers(len(block_list(model)[1]))
    keep = 0.5 if keep is None else keep
    default_targets, default_layer_count = default_scope(config.method, model)
    targets = default_targets if config.targets is None else config.targets
    if layers is None:
        layers = default_layer_count
    if isinstance(layers, int):
        if batches is None:
            raise ValueError("layers=N picks blocks by angular distance and needs calib=; "
                             "pass block indices to choose them yourself")
        layers = select_layers(layer_scores(model, batches), layers)
    layers = None if layers is None else sorted(int(i) for i in layers)
    chosen = resolve_targets(model, targets, config.exclude, layers)
    return CompressionPlan(keep, layers, None if targets is None else tuple(targets), chosen)


def compression_metadata(config: MethodConfig, plan: CompressionPlan) -> dict:
    """How the checkpoint was made, as config.json's `compression_config` records it."""
    return {"method": config.method, "keep": plan.keep, "rank_multiple": config.rank_multiple,
            "layers": plan.layers, "preset": config.preset,
            "targets": None if plan.target_patterns is None else list(plan.target_patterns),
            "options": _json_safe(config.options())}


def _compress(model: nn.Module, config: MethodConfig, calib, **calib_format
              ) -> CompressionReport:
    run, needs_calibration = METHODS[config.method]
    check_finite_parameters(model)
    batches = calibration_batches(model, config, calib, **calib_format)
    plan = plan_compression(model, config, batches)
    start = time.perf_counter()
    data = {"calib": batches} if needs_calibration else {}
    modules = run(model, plan.targets, plan.keep, rank_multiple=config.rank_multiple, **data,
                  **config.options())
    report = CompressionReport(config.method, plan.keep, modules, time.perf_counter() - start)
    model_config = getattr(model, "config", None)
    if model_config is not None:
        model_config.compression_config = compression_metadata(config, plan)
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
