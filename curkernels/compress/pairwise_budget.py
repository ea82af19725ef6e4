"""Where pair-wise compression spends its budget: the matrix groups of a decoder block that
share an inner dimension, each block's kept fraction and each group's inside its block, and the
groups that must stay whole (q/k under per-head norms)."""

import torch
from torch import nn

ATTENTION_QK, ATTENTION_VO = ("q_proj", "k_proj"), ("v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def target_groups(local_names: set[str]) -> list[tuple[str, ...]]:
    """The (q, k), (v, o) and (gate, up, down) groups among a block's targets (local names);
    a target whose partners are not all targets is an error."""
    groups, used = [], set()
    for members in (ATTENTION_QK, ATTENTION_VO, MLP):
        for name in local_names:
            if not name.endswith("." + members[0]) and name != members[0]:
                continue
            parent = name[: -len(members[0])]
            group = tuple(parent + member for member in members)
            missing = [g for g in group if g not in local_names]
            if missing:
                raise ValueError(f"pairwise compresses {'/'.join(members)} together: "
                                 f"{parent or '(block)'} has targets {sorted(set(group) - set(missing))}"
                                 f" but not {missing}; target all of them or none")
            groups.append(group)
            used.update(group)
    unknown = sorted(local_names - used)
    if unknown:
        raise ValueError(f"pairwise compresses q_proj/k_proj, v_proj/o_proj and gate_proj/"
                         f"up_proj/down_proj of decoder blocks; it cannot compress {unknown}")
    return groups


def spread_drop(weights: torch.Tensor, sizes: list[int], keep: float, floor: float = 0.05
                ) -> list[float]:
    """Each part's kept fraction when the dropped share is ∝ `weights` (water-filling: a part
    whose drop would leave less than `floor`, or whose weight is 0, keeps what it can and the
    others drop the rest), with Σ keepᵢ·sizeᵢ = keep·Σ sizeᵢ where the bounds allow it."""
    weights = weights.double()
    size = torch.tensor(sizes, dtype=torch.float64)
    drop_total = (1 - keep) * float(size.sum())
    free = weights > 0
    drop = torch.zeros(len(sizes), dtype=torch.float64)
    for _ in range(len(sizes)):
        if not free.any():
            break
        left = drop_total - float((drop * size)[~free].sum())
        drop[free] = left * weights[free] / float((weights * size)[free].sum())
        over, under = drop > 1 - floor, drop < 0
        if not (over | under).any():
            break
        drop = drop.clamp(0, 1 - floor)
        free &= ~(over | under)
    return (1 - drop).tolist()


def block_keeps(scores: torch.Tensor, sizes: list[int], keep: float, temperature: float,
                floor: float = 0.05) -> list[float]:
    """Each block's kept fraction: the dropped share ∝ softmax(−score/temperature) (MoDeGPT's
    allocation: a block that changes the hidden state little loses more), each kept fraction
    within [floor, 1], and Σ keepᵢ·sizeᵢ = keep·Σ sizeᵢ."""
    return spread_drop(torch.softmax(-scores.double() / temperature, 0), sizes, keep, floor)


def group_keeps(groups: list[tuple[str, ...]], sizes: list[int], keep: float, qk_drop: float,
                vo_drop: float) -> list[float]:
    """Each group's kept fraction inside a block that keeps `keep`: q/k's and v/o's dropped
    fractions are `qk_drop` and `vo_drop` times the MLP's (1, 1: every matrix drops the same
    fraction), the block's total unchanged."""
    ratio = {ATTENTION_QK[0]: qk_drop, ATTENTION_VO[0]: vo_drop, MLP[0]: 1.0}
    weights = torch.tensor([next(r for first, r in ratio.items() if group[0].endswith(first))
                            for group in groups])
    keeps = spread_drop(weights, sizes, keep)
    if sum(k * s for k, s in zip(keeps, sizes, strict=True)) > keep * sum(sizes) * (1 + 1e-9):
        raise ValueError(f"qk_drop={qk_drop:g}, vo_drop={vo_drop:g}: a block that keeps "
                         f"{keep:.3f} of its weights cannot drop enough from the groups allowed "
                         f"to drop (each keeps at least 5 %); raise qk_drop or vo_drop")
    return keeps


QK_NORMS = ("q_norm", "k_norm")


def normalises_query_key(block: nn.Module, q_local: str) -> bool:
    """Whether the attention module holding `q_local` normalises q or k after projecting
    them (a `q_norm` or `k_norm` submodule), which rules out dropping their dimensions."""
    attention = block.get_submodule(q_local.rpartition(".")[0]) if "." in q_local else block
    return any(isinstance(getattr(attention, norm, None), nn.Module) for norm in QK_NORMS)


def dense_groups(block: nn.Module, groups: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The q/k groups of `block` left dense: those whose attention normalises q/k."""
    return [group for group in groups
            if group[0].endswith(ATTENTION_QK[0]) and normalises_query_key(block, group[0])]


def smallest_block_keep(block: nn.Module, targets: dict[str, nn.Linear],
                        floor: float = 0.05) -> float:
    """The least fraction of `targets` (local names) a block can keep: its dense groups whole
    and `floor` of the rest."""
    fixed = {local for group in dense_groups(block, target_groups(set(targets)))
             for local in group}
    sizes = {local: linear.weight.numel() for local, linear in targets.items()}
    kept = sum(sizes[local] if local in fixed else floor * sizes[local] for local in sizes)
    return kept / sum(sizes.values())


def keep_floor(blocks, per_block: dict[int, dict[str, nn.Linear]], keep: float) -> float:
    """The least keep every block of `per_block` (block index -> local name -> Linear) can
    reach (`smallest_block_keep`: a block whose q/k stay dense cannot go below their share);
    a `keep` below it is refused by name."""
    floor = max(smallest_block_keep(blocks[i], targets) for i, targets in per_block.items())
    if keep < floor:
        raise ValueError(f"keep={keep:g} is below the {floor:.3f} these blocks can keep "
                         f"(every group keeps at least 5 %, and q_proj/k_proj stay whole "
                         f"where attention normalises q and k per head)")
    return floor
