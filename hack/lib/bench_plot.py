"""Latency percentiles per row at the fixed rate, from hack/bench.sh's results.json.

usage: python3 hack/lib/bench_plot.py results.json latency.png
Needs matplotlib (Debian: python3-matplotlib, installed by hack/bench.sh).
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter  # noqa: E402


def nines(p):
    """Percentile -> position on a 'number of nines' axis (50 -> 0.3, 99 -> 2, 99.9 -> 3)."""
    return -math.log10(max(1e-6, 1.0 - p / 100.0))


def main(src, dst):
    with open(src) as f:
        r = json.load(f)
    rows = [x for x in r["rows"] if x.get("fixed_rate") and not x.get("unavailable")]
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    styles = {"anchor": ("black", "-"), "baseline": ("grey", ":"), "peer": ("tab:red", "--")}
    palette = iter(["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:brown", "tab:olive", "tab:pink"])
    for row in rows:
        pts = [(p, v) for p, v in row["fixed_rate"]["percentiles_ms"] if v is not None and p < 100]
        if not pts:
            continue
        color, ls = styles.get(row["group"], (None, "-"))
        if color is None:
            color = next(palette, None)
        label = row["label"]
        if row["fixed_rate"].get("saturated"):
            label += " (saturated)"
            ls = "-."
        ax.plot([nines(p) for p, _ in pts], [max(v, 0.001) for _, v in pts], marker="o", ms=3, lw=1.6, ls=ls, color=color, label=label)
    ticks = [50, 90, 99, 99.9, 99.99]
    ax.xaxis.set_major_locator(FixedLocator([nines(p) for p in ticks]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"p{100 - 10 ** -x:g}"))
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (log; from each request's intended send time)")
    s, m = r["settings"], r["machine"]
    ax.set_title(
        f"authrealm vs nginx vs oauth2-proxy at a fixed {s['fixed_rate']:.0f} req/s, {s['connections']} connections\n"
        f"{m['cpus_online']} × {m['cpu_model']}, {r['date']}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
