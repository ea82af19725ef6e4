"""Field checks for `compression_config` entries: each raises CheckpointError naming the field
(e.g. `modules['model.layers.0.mlp.up_proj'].rank`) and what was expected.

JSON gives ints, floats, strings, bools, lists and dicts: a rank must be a real int (not 21.0,
"21" or true), indices a list of distinct ints in range, so that nothing malformed reaches
torch (which fails deep inside with "negative dimension" or "too many dimensions 'str'").
"""

from collections import Counter
from collections.abc import Callable

from .errors import CheckpointError

FieldCheck = Callable[[str, object], None]


def shown(value, limit: int = 60) -> str:
    """A value's repr, cut short: an index list can hold thousands of entries."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a 1


def positive_int(label: str, value) -> None:
    if not is_int(value) or value < 1:
        raise CheckpointError(f"{label} must be a positive int, got {shown(value)}")


def boolean(label: str, value) -> None:
    if not isinstance(value, bool):
        raise CheckpointError(f"{label} must be true or false, got {shown(value)}")


def one_of(*choices: str) -> FieldCheck:
    def check(label: str, value) -> None:
        if not isinstance(value, str) or value not in choices:
            raise CheckpointError(f"{label} must be one of {list(choices)}, got {shown(value)}")
    return check


def optional(check: FieldCheck) -> FieldCheck:
    def check_optional(label: str, value) -> None:
        if value is not None:
            check(label, value)
    return check_optional


def index_list(label: str, value) -> None:
    """A JSON list of ints (their count, range and distinctness are checked against the
    module's shapes by `check_indices`)."""
    if not isinstance(value, list):
        raise CheckpointError(f"{label} must be a list of ints, got {shown(value)}")
    for position, index in enumerate(value):
        if not is_int(index):
            raise CheckpointError(f"{label}[{position}] must be an int, got {shown(index)}")


def check_indices(label: str, indices: list[int], count: int, bound: int, what: str) -> None:
    """`count` distinct indices in [0, bound): they address `what`."""
    if len(indices) != count:
        raise CheckpointError(f"{label} must hold {count} indices, got {len(indices)}")
    for position, index in enumerate(indices):
        if not 0 <= index < bound:
            raise CheckpointError(f"{label}[{position}] = {index} is out of range: it must index "
                                  f"{what}, [0, {bound})")
    if len(set(indices)) != len(indices):
        repeated = sorted(i for i, times in Counter(indices).items() if times > 1)
        raise CheckpointError(f"{label} must not repeat an index, got {shown(repeated)} "
                              f"more than once")


def check_fields(label: str, spec: dict, fields: dict[str, FieldCheck]) -> None:
    """Exactly `fields` (and `type`) present, each passing its check."""
    missing = [field for field in fields if field not in spec]
    if missing:
        raise CheckpointError(f"{label} lacks {missing} (a {spec['type']} spec has "
                              f"{sorted(fields)})")
    unknown = sorted(set(spec) - set(fields) - {"type"})
    if unknown:
        raise CheckpointError(f"{label} has fields a {spec['type']} spec does not have: {unknown}")
    for field, check in fields.items():
        check(f"{label}.{field}", spec[field])
