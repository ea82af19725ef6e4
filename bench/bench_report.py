"""Reports of bench/layer_bench.py: JSON (all numbers), markdown table, PNG plot, named by GPU;
and shipping measured runs into the package (decode table, tile configs, group table)."""

import argparse
import json
import re
from pathlib import Path

import torch

from curkernels.ops import tables
from curkernels.ops.tables import DECODE_MAX_ROWS

FUSED = ("triton", "cuda")


def device_slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_") or "device"


def _cell(timing: dict | None) -> str:
    if timing is None or timing["eager_us"] is None:
        return "—"
    if timing["graph_us"] is None:
        return f"({timing['eager_us']:.1f})"
    return f"{timing['graph_us']:.1f} ({timing['eager_us']:.1f})"


def _best(timing: dict | None) -> float | None:
    """The number compared across variants: graph replay where measured, else eager."""
    if timing is None:
        return None
    return timing["graph_us"] if timing["graph_us"] is not None else timing["eager_us"]


def _grouped(results: list[dict]) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for timing in results:
        key = (timing["m"], timing["n"], timing["r"], timing["M"])
        groups.setdefault(key, {})[timing["variant"]] = timing
    return groups


def markdown_table(results: list[dict], floors: dict, meta: dict) -> str:
    variants = list(dict.fromkeys(t["variant"] for t in results))
    lines = [f"{meta['device']}, {meta['dtype']}, torch {meta['torch']} — µs a call, median: "
             "CUDA-graph replay (eager in brackets), cold weights",
             "",
             "| layer (out×in) | r | M | " + " | ".join(variants) + " | floor | fused/chain2 |",
             "|---" * (len(variants) + 5) + "|"]
    for (m, n, r, M), by_variant in _grouped(results).items():
        chain2 = _best(by_variant.get("chain2"))
        fused = [_best(by_variant.get(v)) for v in FUSED if _best(by_variant.get(v)) is not None]
        ratio = f"{min(fused) / chain2:.2f}" if fused and chain2 else "—"
        floor = floors.get((m, n, r, M))
        lines.append(f"| {m}×{n} | {r} | {M} | "
                     + " | ".join(_cell(by_variant.get(v)) for v in variants)
                     + f" | {f'{floor:.1f}' if floor is not None else '—'} | {ratio} |")
    notes = sorted({f"{t['variant']}: {t['note']}" for t in results if t["note"]})
    lines += [""] + [f"- not run: {note}" for note in notes]
    lines += [""] + decode_winner_lines(results, meta)
    return "\n".join(lines)


def decode_winner_lines(results: list[dict], meta: dict) -> list[str]:
    """What curkernels.ops.tables reads from this run: per decode point and mode, the
    fused kernels that took at most WIN_RATIO of chain2's time, fastest first."""
    dtype = getattr(torch, meta["dtype"])
    lines = []
    for mode, timing in tables.DECODE_MODES.items():
        points = tables.decode_points_from_benchmark({"meta": meta, "results": results}, dtype,
                                                     DECODE_MAX_ROWS, mode)
        wins = [p for p in points if p.winners]
        lines += ["", f"Decode table, {mode} (a fused kernel ≤ {tables.WIN_RATIO}× chain2 "
                  f"by {timing}): {len(wins)} of {len(points)} points"]
        lines += [f"- {', '.join(p.winners)}: M = {p.rows}, {p.m}×{p.n}, r = {p.r}"
                  for p in wins]
    return lines[1:]


def ship_decode_table(report_path: Path, into: Path = tables.MEASURED_DIR) -> Path:
    """Copies the decode rows (M ≤ DECODE_MAX_ROWS) of chain2 and of the fused kernels in a
    layer-bench JSON into the package's measured tables, named by GPU; written whole or not at
    all."""
    report = json.loads(report_path.read_text())
    keep = {tables.BASELINE_VARIANT, *tables.FUSED_VARIANTS}
    rows = [row for row in report["results"]
            if row["M"] <= DECODE_MAX_ROWS and row["variant"] in keep]
    return _write_whole(into / f"{device_slug(report['meta']['device'])}.json",
                        {"meta": report["meta"], "results": rows})


def _write_whole(target: Path, payload: dict) -> Path:
    """`payload` as JSON at `target`, written whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=1) + "\n")
    partial.replace(target)
    return target


def ship_decode_configs(sweep_path: Path, into: Path = tables.CONFIGS_DIR) -> Path:
    """Copies a decode-sweep run (bench/decode_sweep.py) into the package's measured configs,
    named by GPU: its configs, and per point each config's time, error and failure; written
    whole or not at all."""
    sweep = json.loads(sweep_path.read_text())
    names = list(sweep["configs"])
    rows = [{key: row[key] for key in ("M", "m", "n", "r", "chain2", "errors", "failures", *names)
             if key in row} for row in sweep["rows"]]
    kept = {"device": sweep["device"], "dtype": sweep.get("dtype", "bfloat16"),
            "torch": sweep.get("torch"), "configs": sweep["configs"], "rows": rows}
    return _write_whole(into / f"{device_slug(sweep['device'])}.json", kept)


def ship_group_table(report_path: Path, into: Path = tables.GROUPS_DIR) -> Path:
    """Copies a group-bench run (bench/group_bench.py) into the package's measured group
    tables, named by GPU: the rows of the ways tables.py compares; written whole or not
    at all."""
    report = json.loads(report_path.read_text())
    ways = {tables.GROUP_WAY, *(way for _, others in tables.GROUP_MODES.values()
                                     for way in others)}
    rows = [row for row in report["results"] if row["way"] in ways and "members" in row]
    return _write_whole(into / f"{device_slug(report['meta']['device'])}.json",
                        {"meta": report["meta"], "results": rows})


def plot(results: list[dict], floors: dict, meta: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = list(dict.fromkeys((t["m"], t["n"]) for t in results))
    ranks = list(dict.fromkeys(t["r"] for t in results))
    variants = list(dict.fromkeys(t["variant"] for t in results))
    groups = _grouped(results)
    figure, axes = plt.subplots(len(ranks), len(shapes), squeeze=False,
                                figsize=(4 * len(shapes), 3 * len(ranks)))
    for row, r in enumerate(ranks):
        for col, (m, n) in enumerate(shapes):
            ax = axes[row][col]
            rows = sorted(M for (mm, nn, rr, M) in groups if (mm, nn, rr) == (m, n, r))
            for variant in variants:
                points = [(M, _best(groups[(m, n, r, M)].get(variant))) for M in rows]
                points = [(M, us) for M, us in points if us is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=variant)
            floor_points = [(M, floors.get((m, n, r, M))) for M in rows]
            floor_points = [(M, us) for M, us in floor_points if us is not None]
            if floor_points:
                ax.plot(*zip(*floor_points, strict=True), "k--", label="floor")
            ax.set(xscale="log", yscale="log", title=f"{m}×{n}, r={r}", xlabel="M",
                   ylabel="µs a call")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize="small")
    figure.suptitle(f"{meta['device']} {meta['dtype']}: CUDA-graph replay (eager where no graph), cold weights")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True


def write_reports(results: list[dict], floors: dict, meta: dict, out_dir: Path) -> str:
    """Writes <gpu>.json, <gpu>.md and <gpu>.png into out_dir; returns the markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / device_slug(meta["device"])
    table = markdown_table(results, floors, meta)
    floor_rows = [{"m": m, "n": n, "r": r, "M": M, "floor_us": us}
                  for (m, n, r, M), us in floors.items()]
    Path(f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "results": results, "floors": floor_rows}, indent=1))
    Path(f"{stem}.md").write_text(table + "\n")
    if not plot(results, floors, meta, Path(f"{stem}.png")):
        table += "\n(matplotlib is not installed: no PNG)"
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Ship a layer-bench run's decode measurements as the package's dispatch "
                    "table, a decode sweep's as its tile configs, and a group benchmark's as "
                    "its group table")
    parser.add_argument("report", type=Path, nargs="?",
                        help="<gpu>.json written by bench/layer_bench.py")
    parser.add_argument("--sweep", type=Path, help="decode_sweep.json written by "
                        "bench/decode_sweep.py")
    parser.add_argument("--groups", type=Path, help="group_bench.json written by "
                        "bench/group_bench.py")
    args = parser.parse_args()
    if args.report is None and args.sweep is None and args.groups is None:
        parser.error("give a layer-bench report, --sweep, --groups, or several")
    if args.report is not None:
        print(f"wrote {ship_decode_table(args.report)}")
    if args.sweep is not None:
        print(f"wrote {ship_decode_configs(args.sweep)}")
    if args.groups is not None:
        print(f"wrote {ship_group_table(args.groups)}")
