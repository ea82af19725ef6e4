"""Time a sibling group (q/k/v, gate/up) the ways a compressed model can run it.

Llama-3.1-8B's sibling projections at the e2e benchmark's settings, each way on the same
factors, checked against an fp64 reference (output poisoned) before it is timed:
  dense    the dense projections, F.linear each
  members  each member's own `cur_linear` (backend 'auto': dispatch's choice) — the model
           without shared shrinks
  chain    the shared cuBLAS chain: one GEMM over the stacked shrink factors, one expand each
  group    the group decode kernel: the whole group in one Triton launch
  modules  the members as two-factor `CURLinear`s called one after another, as a model calls
           them: `members` plus the modules' own host time
  shared   the same modules after `share_input_shrinks`: what a model with shared shrinks runs
           (at decode on a GPU, the group kernel where a measured group table has it win:
           CURKERNELS_GROUP_TABLE), its hand-over included
Timed as layer_bench.py times a layer: eagerly (host overhead included) and as CUDA-graph
replays, over cold weights (copies cycled past twice the L2), medians, µs per group call.
Writes group_bench.json and group_bench.md to --out and prints the table. The JSON is a group
table (curkernels/ops/tables.py): `bench/bench_report.py --groups` ships it.

GPU:    python bench/group_bench.py --out bench/results
CPU:    TRITON_INTERPRET=1 python bench/group_bench.py --smoke --out /tmp/x   (format check)
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_bench import _calls_for, _cold_copies, time_eager_us, time_graph_us  # noqa: E402

from curkernels.nn import CURLinear, share_input_shrinks  # noqa: E402
from curkernels.ops import cur_linear, unavailable_reason  # noqa: E402
from curkernels.ops.tables import WRONG  # noqa: E402
from curkernels.ops.torch_chain import shared_chain  # noqa: E402

# name -> members' (module name, out m, rank r), all reading the 4096-wide hidden state; ranks
# as e2e.py rounds them (keep 0.5: half the parameters, down to a multiple of 64; CURing:
# r = 256)
GROUPS = {
    "qkv keep0.5": (("q_proj", 4096, 1024), ("k_proj", 1024, 384), ("v_proj", 1024, 384)),
    "gate/up keep0.5": (("gate_proj", 14336, 1536), ("up_proj", 14336, 1536)),
    "qk curing": (("q_proj", 4096, 256), ("k_proj", 1024, 256)),
}
HIDDEN = 4096
ROWS = (1, 16, 32)
SMOKE_GROUPS = {"qkv tiny": (("q_proj", 40, 6), ("k_proj", 24, 4), ("v_proj", 24, 5))}
SMOKE_HIDDEN, SMOKE_ROWS = 72, (1, 20)
WAYS = ("dense", "members", "chain", "group", "modules", "shared")


def _modules(names, expands, shrinks, shared: bool) -> list[torch.nn.Module]:
    """The members as two-factor CURLinear children of one parent, their factors shared with the
    other ways' (the shared copy stacks its shrink factors anew)."""
    parent = torch.nn.Module()
    for name, C, R in zip(names, expands, shrinks, strict=True):
        parent.add_module(name, CURLinear(C, None, R, trainable=()))
    if shared:
        share_input_shrinks(parent)
    return [parent.get_submodule(name) for name in names]


def _weights(members, n, dtype, device) -> dict:
    names = [name for name, _, _ in members]
    expands = [torch.randn(m, r, device=device, dtype=dtype) / r ** 0.5 for _, m, r in members]
    shrinks = [torch.randn(r, n, device=device, dtype=dtype) / n ** 0.5 for _, _, r in members]
    return {"dense": [(C.float() @ R.float()).to(dtype) for C, R in zip(expands, shrinks,
                                                                         strict=True)],
            "expands": expands, "shrinks": shrinks, "stacked": torch.cat(shrinks),
            "modules": _modules(names, expands, shrinks, shared=False),
            "shared": _modules(names, expands, shrinks, shared=True)}


def _way(name: str):
    """fn(x, weights) -> the members' outputs."""
    if name == "dense":
        return lambda x, w: [F.linear(x, W) for W in w["dense"]]
    if name == "members":
        return lambda x, w: [cur_linear(x, C, None, R, check_factors=False)
                             for C, R in zip(w["expands"], w["shrinks"], strict=True)]
    if name == "chain":
        return lambda x, w: shared_chain(x, w["stacked"], w["expands"], [None] * len(w["expands"]))
    if name in ("modules", "shared"):
        return lambda x, w: [module(x) for module in w[name]]
    from curkernels.ops.triton.decode import cur_linear_group_triton
    return lambda x, w: cur_linear_group_triton(x, w["stacked"], w["expands"],
                                                [None] * len(w["expands"]))


def relative_error(fn, x, w) -> float:
    """Largest ‖y − ref‖ / ‖ref‖ over the members, fp64 reference from the factors."""
    outputs = fn(x, w)
    errors = []
    for y, C, R in zip(outputs, w["expands"], w["shrinks"], strict=True):
        reference = F.linear(F.linear(x.double(), R.double()), C.double())
        errors.append(((y.double() - reference).norm() / reference.norm()).item())
    return max(errors)


def run(groups, n, rows, dtype, device, repeats, budget_s=None) -> list[dict]:
    started = time.perf_counter()
    l2_bytes = (torch.cuda.get_device_properties(device).L2_cache_size
                if device.type == "cuda" else 0)
    results = []
    for name, members in groups.items():
        factor_bytes = sum(m * r + r * n for _, m, r in members) * dtype.itemsize
        sets = [_weights(members, n, dtype, device)
                for _ in range(_cold_copies(factor_bytes, l2_bytes))]
        for M in rows:
            x = torch.randn(M, n, device=device, dtype=dtype)
            for way in WAYS:
                row = {"group": name, "M": M, "n": n,
                       "members": [[m, r] for _, m, r in members], "way": way,
                       "eager_us": None, "graph_us": None, "error": None, "note": ""}
                results.append(row)
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    row["note"] = "time budget spent"
                    continue
                if way == "group" and (reason := unavailable_reason("triton", device)):
                    row["note"] = reason
                    continue
                fn = _way(way)
                row["error"] = relative_error(fn, x, sets[0])
                calls = 2 if device.type == "cpu" else _calls_for(M, len(sets))
                row["eager_us"] = time_eager_us(fn, x, sets, calls, repeats)
                if device.type == "cuda":
                    row["graph_us"] = time_graph_us(fn, x, sets, calls, repeats)
        del sets
    return results


def markdown_table(results: list[dict], meta: dict) -> str:
    lines = [f"{meta['device']}, {meta['dtype']}, torch {meta['torch']} — µs a group call, "
             "median: CUDA-graph replay (eager in brackets), cold weights; largest relative "
             "error of a member against fp64 last",
             "", "| group | M | " + " | ".join(WAYS) + " |", "|---" * (len(WAYS) + 2) + "|"]
    cells: dict[tuple, dict[str, str]] = {}
    for row in results:
        if row["eager_us"] is None:
            cell = "—"
        elif row["graph_us"] is None:
            cell = f"({row['eager_us']:.1f})"
        else:
            cell = f"{row['graph_us']:.1f} ({row['eager_us']:.1f})"
        if row["error"] is not None:
            cell += f" e={row['error']:.0e}" + (" WRONG" if row["error"] >= WRONG else "")
        cells.setdefault((row["group"], row["M"]), {})[row["way"]] = cell
    for (group, M), by_way in cells.items():
        lines.append(f"| {group} | {M} | " + " | ".join(by_way.get(w, "—") for w in WAYS) + " |")
    notes = sorted({f"{row['way']}: {row['note']}" for row in results if row["note"]})
    return "\n".join(lines + [""] + [f"- not run: {note}" for note in notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for JSON and markdown")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU allowed")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the remaining points are skipped")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: the benchmark needs a GPU (use --smoke for a check)")
    # CPU matmuls and the Triton interpreter lack bf16 arithmetic
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    groups, n, rows = ((SMOKE_GROUPS, SMOKE_HIDDEN, SMOKE_ROWS) if args.smoke
                       else (GROUPS, HIDDEN, ROWS))
    started = time.perf_counter()
    with torch.no_grad():
        results = run(groups, n, rows, dtype, device, args.repeats or (2 if args.smoke else 7),
                      args.budget)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, meta)
    (out / "group_bench.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=1) + "\n")
    (out / "group_bench.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
