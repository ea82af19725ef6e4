"""One budget vocabulary: `keep` = fraction of a target's weight entries that remain,
counting every stored factor (indices and bias excluded)."""

import math


def check_keep(keep: float) -> float:
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return float(keep)


def factor_parameters(m: int, n: int, rank: int, u_kind: str) -> int:
    """Entries stored for an m×n weight at `rank`: C (m×r), R (r×n) and U (r×r, r or none)."""
    link = {"full": rank * rank, "diag": rank, "none": 0}[u_kind]
    return rank * (m + n) + link


def rank_for_keep(m: int, n: int, keep: float, u_kind: str = "none", multiple: int = 1, *,
                  module: str | None = None) -> int:
    """The largest rank whose factors fit in keep·m·n entries (and at most min(m, n)), rounded
    down to `multiple`; raises when that leaves rank 0, naming `module` when given."""
    check_keep(keep)
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    budget = keep * m * n
    if u_kind == "full":  # r² + r(m+n) ≤ budget
        rank = int((-(m + n) + math.sqrt((m + n) ** 2 + 4 * budget)) / 2)
    elif u_kind in ("diag", "none"):
        rank = int(budget // (m + n + (u_kind == "diag")))
    else:
        raise ValueError(f"u_kind must be 'full', 'diag' or 'none', got {u_kind!r}")
    while factor_parameters(m, n, rank + 1, u_kind) <= budget:
        rank += 1
    while rank > 0 and factor_parameters(m, n, rank, u_kind) > budget:
        rank -= 1
    fitting = min(rank, m, n)
    rank = fitting // multiple * multiple
    if rank == 0:
        what = f"{module!r} ({m}×{n})" if module is not None else f"a {m}×{n} weight"
        raise ValueError(
            f"{what} has no rank left at keep={keep:g}: " + (
                f"its largest fitting rank {fitting} rounds down to 0 at rank_multiple="
                f"{multiple}; lower rank_multiple or raise keep" if fitting else
                f"even rank 1 needs more than keep·m·n = {budget:.0f} entries; raise keep"))
    return rank
