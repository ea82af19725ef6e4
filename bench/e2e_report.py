"""Turn the end-to-end measurements into speedups beside their bounds, the issue's pass/fail
checks, a markdown table and a plot."""

from pathlib import Path

MEMORY_SLACK = 1.10  # peak ≤ parameters + KV cache + 10%
# (path, metric, batch, setting, least speedup over dense) the issue asks for
TARGETS = [("compiled", "decode_tokens_per_s", 1, "keep0.5", 1.5),
           ("compiled", "decode_tokens_per_s", 1, "curing", 1.05),
           ("compiled", "prefill_ms", 1, "keep0.5", 1.6)]
LABELS = {"prefill_ms": "prefill ms", "decode_tokens_per_s": "decode tok/s"}


def _groups(summary: dict) -> dict[tuple, dict[str, dict]]:
    groups: dict[tuple, dict[str, dict]] = {}
    for r in summary["results"]:
        groups.setdefault((r["path"], r["metric"], r["batch"]), {})[r["setting"]] = r
    return groups


def comparisons(summary: dict) -> list[dict]:
    """Each compressed setting against dense in the same path, measurement and batch: the
    speedup, and its bound (bytes read per decode step, or prefill FLOPs)."""
    settings = summary["settings"]
    rows = []
    for (path, metric, batch), by_setting in _groups(summary).items():
        dense = by_setting["dense"]["value"]
        for name, record in by_setting.items():
            if name == "dense":
                continue
            if metric == "prefill_ms":
                speedup = dense / record["value"]
                bound = settings["dense"]["prefill_flops"] / settings[name]["prefill_flops"]
            else:
                speedup = record["value"] / dense
                bound = settings["dense"]["decode_bytes"] / settings[name]["decode_bytes"]
            rows.append({"path": path, "metric": metric, "batch": batch, "setting": name,
                         "speedup": speedup, "bound": bound})
    return rows


def checks(summary: dict) -> list[dict]:
    """The issue's must-show items; `passed` is None where the run did not measure one, and
    for every item when the targets do not apply (small shapes or no GPU)."""
    if not summary["targets_apply"]:
        return [{**c, "passed": None} for c in _checks(summary)]
    return _checks(summary)


def _checks(summary: dict) -> list[dict]:
    found = {(c["path"], c["metric"], c["batch"], c["setting"]): c["speedup"]
             for c in summary["comparisons"]}
    out = []
    for path, metric, batch, setting, least in TARGETS:
        measured = found.get((path, metric, batch, setting))
        out.append({"check": f"{path} {LABELS[metric]} batch {batch}: {setting} ≥ {least}× dense",
                    "measured": measured,
                    "passed": None if measured is None else measured >= least})
    for path in ("eager", "compiled"):
        speedups = [(k, v) for k, v in found.items()
                    if k[0] == path and (path == "eager" or k[3] == "curing")]
        who = "every compressed setting" if path == "eager" else "curing"
        slowest = min(speedups, key=lambda kv: kv[1], default=None)
        out.append({"check": f"{path}: {who} never slower than dense",
                    "measured": None if slowest is None else slowest[1],
                    "passed": None if slowest is None else slowest[1] >= 1.0})
    peaks = [r for r in summary["results"]
             if r["setting"] != "dense" and r["peak_memory_bytes"] is not None]
    worst = max(peaks, default=None, key=lambda r: r["peak_memory_bytes"]
                / (r["parameter_bytes"] + r["kv_cache_bytes"]))
    ratio = None if worst is None else (worst["peak_memory_bytes"]
                                        / (worst["parameter_bytes"] + worst["kv_cache_bytes"]))
    out.append({"check": "peak GPU memory ≤ parameters + KV cache + 10% (compressed)",
                "measured": ratio, "passed": None if ratio is None else ratio <= MEMORY_SLACK})
    return out


def _cell(record: dict, comparison: dict | None) -> str:
    value = f"{record['value']:.1f}" if record["value"] >= 10 else f"{record['value']:.3g}"
    if comparison is None:
        return value
    return f"{value} ({comparison['speedup']:.2f}× / bound {comparison['bound']:.2f}×)"


def markdown(summary: dict) -> str:
    env, settings = summary["environment"], list(summary["settings"])
    found = {(c["path"], c["metric"], c["batch"], c["setting"]): c
             for c in summary["comparisons"]}
    lines = [f"# End-to-end: {summary['shape']} shapes, random weights",
             "",
             f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}; "
             f"{summary['dtype']}, attention {summary['attention']}; "
             f"{summary['options']['rounds']} alternating rounds "
             f"({summary['options'].get('eager_decode_rounds') or summary['options']['rounds']}"
             f" for eager decode) after "
             f"{summary['options']['warmup']} warm-ups, medians. Cells: value (speedup over "
             f"dense / its bound: bytes per decode step, FLOPs per prefill).",
             "",
             "| path | measure | batch | " + " | ".join(settings) + " |",
             "|---|---|---|" + "---|" * len(settings)]
    for (path, metric, batch), by_setting in _groups(summary).items():
        cells = [_cell(by_setting[s], found.get((path, metric, batch, s)))
                 if s in by_setting else "not timed" for s in settings]
        lines.append(f"| {path} | {LABELS[metric]} | {batch} | " + " | ".join(cells) + " |")
    for job in summary.get("skipped", []):
        lines.append(f"| {job['path']} | {LABELS[job['metric']]} | {job['batch']} | "
                     f"skipped ({job['why']}) |" + " |" * (len(settings) - 1))
    lines += ["", "| setting | built with | parameters GB | peak GB (largest run) |",
              "|---|---|---|---|"]
    for name, info in summary["settings"].items():
        peaks = [r["peak_memory_bytes"] for r in summary["results"]
                 if r["setting"] == name and r["peak_memory_bytes"] is not None]
        peak = f"{max(peaks) / 1e9:.2f}" if peaks else "n/a (CPU)"
        lines.append(f"| {name} | {info['built_with']} | {info['parameter_bytes'] / 1e9:.3f} | "
                     f"{peak} |")
    lines += ["", "| check | measured | result |", "|---|---|---|"]
    for c in summary["checks"]:
        measured = "not measured" if c["measured"] is None else f"{c['measured']:.2f}"
        result = {None: "—", True: "pass", False: "FAIL"}[c["passed"]]
        if not summary["targets_apply"] and c["measured"] is not None:
            result = "n/a: targets are for 8B shapes on a GPU"
        lines.append(f"| {c['check']} | {measured} | {result} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> bool:
    """Speedup over dense per setting, one panel per path, bounds as black ticks; False when
    matplotlib (an optional bench dependency) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    paths = list(dict.fromkeys(c["path"] for c in summary["comparisons"]))
    settings = [s for s in summary["settings"] if s != "dense"]
    figure, axes = plt.subplots(1, max(len(paths), 1), figsize=(6 * max(len(paths), 1), 4),
                                squeeze=False)
    for axis, name in zip(axes[0][:len(paths)], paths, strict=True):
        rows = [c for c in summary["comparisons"] if c["path"] == name]
        groups = list(dict.fromkeys((c["metric"], c["batch"]) for c in rows))
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            for j, group in enumerate(groups):
                match = [c for c in rows if (c["metric"], c["batch"]) == group
                         and c["setting"] == setting]
                if not match:
                    continue
                x = j + (i - (len(settings) - 1) / 2) * width
                axis.bar(x, match[0]["speedup"], width, color=f"C{i}",
                         label=setting if j == 0 else None)
                axis.plot([x - width / 2, x + width / 2], [match[0]["bound"]] * 2, "k-")
        axis.axhline(1.0, color="grey", lw=0.8, ls="--")
        axis.set_xticks(range(len(groups)),
                        [f"{LABELS[m].split()[0]}\nbatch {b}" for m, b in groups])
        axis.set_title(f"{name} — {summary['environment']['device']}")
        axis.set_ylabel("speedup over dense (black: bound)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
