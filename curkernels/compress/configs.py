"""Typed method configs: one dataclass per compression method, every option checked on creation.

    ck.compress(model, ck.SVDLLMConfig(keep=0.5, weighting="fisher"), calib=batches)

The fields shared by every method (`keep`, `targets`, `exclude`, `layers`, `preset`,
`rank_multiple`) sit on the base class, as torchao keeps a whole setting in one config; the
rest are the method's options. Adding a method is one class here plus its name in `CONFIGS`.
"""

import functools
import math
import types
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

from torch import nn

from .calibration import ENCODER_TARGETS
from .curing import PAPER_MAX_RANK, SVD_ALGORITHMS
from .deim import SELECTIONS
from .lpaf import IMPORTANCES
from .pairwise import ALLOCATIONS as PAIRWISE_ALLOCATIONS
from .pairwise import SELECTIONS as PAIRWISE_SELECTIONS
from .pairwise import TOKEN_WEIGHTINGS as PAIRWISE_TOKEN_WEIGHTINGS
from .rom import ROM_PRESETS
from .svdllm import ALLOCATIONS, WEIGHTINGS


@dataclass(frozen=True)
class Bounds:
    """An interval a number option must lie in; None leaves that side open."""
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def __contains__(self, value) -> bool:
        low_ok = self.low is None or (value >= self.low if self.low_inclusive
                                      else value > self.low)
        high_ok = self.high is None or (value <= self.high if self.high_inclusive
                                        else value < self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            return f"{'≥' if self.low_inclusive else '>'} {self.low:g}"
        return (f"in {'[' if self.low_inclusive else '('}{self.low:g}, {self.high:g}"
                f"{']' if self.high_inclusive else ')'}")


def option(default, *, bounds: Bounds | None = None, choices: Iterable[str] | None = None):
    """A dataclass field whose value must lie in `bounds` or be one of `choices`."""
    return field(default=default, metadata={
        "bounds": bounds, "choices": None if choices is None else tuple(choices)})


POSITIVE = Bounds(low=1)
ABOVE_ZERO = Bounds(low=0, low_inclusive=False)
NON_NEGATIVE = Bounds(low=0)
FRACTION = Bounds(low=0, high=1, low_inclusive=False)  # (0, 1]


def _alternatives(hint) -> tuple:
    """The members of a union hint (`int | None` → (int, NoneType)), else (hint,)."""
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _matches(value, hint) -> bool:
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float; NaN and Inf are no option's value
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    return isinstance(value, hint)


_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "True or False",
               str: "a string", type(None): "None", nn.Module: "an nn.Module",
               Iterable: "an iterable of input dicts", tuple[str, ...]: "a list of strings",
               tuple[int, ...]: "a list of integers"}


def _describe(hint, spec: dict) -> str:
    kinds = []
    for alternative in _alternatives(hint):
        if alternative is str and spec.get("choices"):
            kinds.append(f"one of {list(spec['choices'])}")
        elif alternative in (int, float) and spec.get("bounds") is not None:
            kinds.append(f"{_KIND_NAMES[alternative]} {spec['bounds']}")
        else:
            kinds.append(_KIND_NAMES[alternative])
    return " or ".join(kinds)


def _check_value(label: str, value, hint, spec: dict) -> None:
    choices, bounds = spec.get("choices"), spec.get("bounds")
    fits = any(_matches(value, alternative) for alternative in _alternatives(hint))
    if fits and isinstance(value, str) and choices is not None:
        fits = value in choices
    if fits and isinstance(value, (int, float)) and bounds is not None:
        fits = value in bounds
    if not fits:
        raise ValueError(f"{label} must be {_describe(hint, spec)}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """What every method shares. `keep`: fraction of the targeted Linears' weight entries that
    remain (default 0.5, or the preset's); `targets` / `exclude`: name patterns of the Linears
    to factor / leave dense (None: the method's default targets); `layers`: block indices, or
    a count N of blocks to pick by angular distance; `preset`: one of `ROM_PRESETS` (sets keep
    and layers); `rank_multiple`: ranks are rounded down to a multiple of it."""
    method: ClassVar[str]
    keep: float | None = option(None, bounds=FRACTION)
    targets: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    layers: tuple[int, ...] | int | None = None
    preset: str | None = option(None, choices=ROM_PRESETS)
    rank_multiple: int = option(1, bounds=POSITIVE)

    def __post_init__(self):
        # the user's forms, normalised: one pattern for a list of them, lists for tuples
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.layers, (list, tuple, range)):
            object.__setattr__(self, "layers", tuple(self.layers))
        hints = get_type_hints(type(self))
        common = self.common_names()
        for f in fields(self):
            value = getattr(self, f.name)
            label = f.name if f.name in common else f"{self.method} option {f.name}"
            _check_value(label, value, hints[f.name], f.metadata)
            if float in _alternatives(hints[f.name]) and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))
        if self.preset is not None and (self.keep is not None or self.layers is not None):
            raise ValueError(f"preset={self.preset!r} sets keep and layers: give neither with it")

    @classmethod
    def common_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(MethodConfig))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The method's own options (the fields past the common ones)."""
        return tuple(f.name for f in fields(cls) if f.name not in cls.common_names())

    def options(self) -> dict[str, Any]:
        """The method's options by name (values as they are: a teacher model is not copied)."""
        return {name: getattr(self, name) for name in self.option_names()}


def check_option_names(cls: type[MethodConfig], names: Iterable[str]) -> None:
    """A misspelled or unknown option is an error naming the valid ones (Python's own
    TypeError for a dataclass names only the bad keyword)."""
    unknown = sorted(set(names) - {f.name for f in fields(cls)})
    if unknown:
        own = cls.option_names()
        raise ValueError(f"unknown option{'s' * (len(unknown) > 1)} {unknown} for method "
                         f"{cls.method!r}: " + (f"its options are {list(own)}" if own else
                                                "it has no options of its own")
                         + f" (besides the common fields {list(cls.common_names())})")


def method_config(cls: type) -> type[MethodConfig]:
    """The decorator every method config takes: a frozen keyword-only dataclass whose
    unknown options are errors naming the valid ones."""
    cls = dataclass(frozen=True, kw_only=True)(cls)
    init = cls.__init__

    @functools.wraps(init)
    def checked_init(self, **values):
        check_option_names(cls, values)
        init(self, **values)

    cls.__init__ = checked_init
    return cls


@method_config
class SVDConfig(MethodConfig):
    """Plain truncated SVD (no calibration)."""
    method: ClassVar[str] = "svd"


@method_config
class ASVDConfig(MethodConfig):
    """Activation-aware SVD: input channels scaled by E|x|^alpha before the SVD."""
    method: ClassVar[str] = "asvd"
    alpha: float = option(0.5, bounds=NON_NEGATIVE)


@method_config
class SVDLLMConfig(MethodConfig):
    """SVD-LLM (truncation-aware whitening); see `compress_svdllm` for each option."""
    method: ClassVar[str] = "svdllm"
    damping: float = option(1e-4, bounds=NON_NEGATIVE)
    allocation: str = option("uniform", choices=ALLOCATIONS)
    sequential: bool = False
    weighting: str = option("inputs", choices=WEIGHTINGS)
    fisher_damping: float = option(1e-2, bounds=NON_NEGATIVE)
    encoder_target: str = option("tokens", choices=ENCODER_TARGETS)
    centered: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_target != "tokens" and self.weighting != "fisher":
            raise ValueError(f"encoder_target={self.encoder_target!r} sets the Fisher's loss: "
                             f"it needs weighting='fisher'")


@method_config
class CURingConfig(MethodConfig):
    """CURing: rows and columns picked by `selection` on the Wanda score; rank capped at
    `max_rank` (None: no cap) and, with `energy`, by the energy rule."""
    method: ClassVar[str] = "curing"
    selection: str = option("deim", choices=SELECTIONS)
    max_rank: int | None = option(PAPER_MAX_RANK, bounds=POSITIVE)
    energy: float | None = option(None, bounds=FRACTION)
    svd: str = option("randomized", choices=SVD_ALGORITHMS)


@method_config
class ROMConfig(MethodConfig):
    """ROM: each Linear's outputs projected on their principal directions, layer by layer."""
    method: ClassVar[str] = "rom"


@method_config
class LPAFConfig(MethodConfig):
    """LPAF: first-order pruning (scored on the whole model's loss, or on each block's output
    with importance="block", which streams), importance-weighted factoring, optional
    mixed-rank fine-tuning (`mixed_rank_steps` > 0) on `train_data` towards `teacher`."""
    method: ClassVar[str] = "lpaf"
    importance: str = option("loss", choices=IMPORTANCES)
    sparsity: float = option(0.3, bounds=Bounds(low=0, high=1, high_inclusive=False))
    weight_floor: float = option(0.1, bounds=NON_NEGATIVE)
    sweeps: int = option(4, bounds=NON_NEGATIVE)
    mixed_rank_steps: int = option(0, bounds=NON_NEGATIVE)
    lr: float = option(1e-4, bounds=Bounds(low=0, low_inclusive=False))
    min_rank_fraction: float = option(0.5, bounds=FRACTION)
    full_rank_steps: int | None = option(None, bounds=NON_NEGATIVE)
    teacher: nn.Module | None = None
    train_data: Iterable | None = None
    seed: int = 0


@method_config
class PairwiseConfig(MethodConfig):
    """Pair-wise structured selection (the default for decoder LMs): real rows of q/k, v and
    gate/up kept, their partners o_proj and down_proj refit; see `compress_pairwise`."""
    method: ClassVar[str] = "pairwise"
    ridge: float = option(1e-2, bounds=ABOVE_ZERO)
    damping: float = option(5e-2, bounds=ABOVE_ZERO)
    refit: bool = True
    selection: str = option("greedy", choices=PAIRWISE_SELECTIONS)
    token_weighting: str = option("output_norm", choices=PAIRWISE_TOKEN_WEIGHTINGS)
    sequential: bool = True
    allocation: str = option("importance", choices=PAIRWISE_ALLOCATIONS)
    temperature: float = option(0.1, bounds=ABOVE_ZERO)
    # attention drops half the MLP's fraction (SmolLM2-135M, keep 0.5: 3.46× dense
    # perplexity against 4.58× with even drops; bench/results/lm_quality_method.md)
    qk_drop: float = option(0.5, bounds=NON_NEGATIVE)
    vo_drop: float = option(0.5, bounds=NON_NEGATIVE)


CONFIGS: dict[str, type[MethodConfig]] = {
    cls.method: cls for cls in (SVDConfig, ASVDConfig, SVDLLMConfig, CURingConfig, ROMConfig,
                                LPAFConfig, PairwiseConfig)}
# The config classes that `curkernels` and `curkernels.compress` export (by this list alone).
__all__ = ["MethodConfig", *(cls.__name__ for cls in CONFIGS.values())]


def config_class(method: str) -> type[MethodConfig]:
    if method not in CONFIGS:
        raise ValueError(f"method must be one of {sorted(CONFIGS)}, got {method!r}")
    return CONFIGS[method]


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def option_from_text(method: str, name: str, text: str):
    """The value of option `name` of `method` written as text (the CLI's KEY=VALUE), parsed
    by the field's type; range and choice checks follow when the config is built."""
    cls = config_class(method)
    check_option_names(cls, [name])
    if name in cls.common_names():
        raise ValueError(f"{name} is set by its own argument, not as a method option")
    hint = get_type_hints(cls)[name]
    kinds = _alternatives(hint)
    lowered = text.strip().lower()
    if type(None) in kinds and lowered in ("none", "null"):
        return None
    if bool in kinds and lowered in _TRUE + _FALSE:
        return lowered in _TRUE
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                continue
    if str in kinds:
        return text
    spec = next(f.metadata for f in fields(cls) if f.name == name)
    raise ValueError(f"{method} option {name} must be {_describe(hint, spec)}, got {text!r}"
                     + ("" if kinds[0] in (int, float, bool) else
                        ": it cannot be given on the command line"))
