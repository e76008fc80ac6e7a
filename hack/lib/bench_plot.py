"""Latency percentiles per row at the fixed rate, from hack/bench.sh's results.json.

usage: python3 hack/lib/bench_plot.py results.json latency.png
       python3 hack/lib/bench_plot.py --readme README.md docs/bench/results.md
           (replaces the text between the bench markers in README.md with results.md)
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


PALETTE = ["tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:cyan", "tab:brown", "tab:olive", "tab:pink"]
STYLES = {"anchor": ("black", "-"), "baseline": ("grey", ":"), "peer": ("tab:red", "--")}


def colors(rows):
    """One colour per row, the same in both panels."""
    out, palette = {}, iter(PALETTE)
    for row in rows:
        out[row["id"]] = STYLES.get(row["group"], (next(palette, "tab:gray"), "-"))
    return out


def draw(ax, rows, key, title, style):
    for row in rows:
        fr = row.get(key) or (row.get("fixed_rate") if key == "own_rate" and row["group"] == "anchor" else None)
        if not fr:
            continue
        pts = [(p, v) for p, v in fr["percentiles_ms"] if v is not None and p < 100]
        if not pts:
            continue
        color, ls = style[row["id"]]
        label = row["label"]
        if key == "own_rate":
            label += f" @ {fr['rate']:.0f}/s"
        if fr.get("saturated"):
            label += " (saturated)"
            ls = "-."
        ax.plot([nines(p) for p, _ in pts], [max(v, 0.001) for _, v in pts], marker="o", ms=3, lw=1.6, ls=ls, color=color, label=label)
    ticks = [50, 90, 99, 99.9, 99.99]
    ax.xaxis.set_major_locator(FixedLocator([nines(p) for p in ticks]))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"p{100 * (1 - 10 ** -x):.6g}"))
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms (log), from the intended send time")
    ax.set_title(title, fontsize=9.5)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)


def main(src, dst):
    with open(src) as f:
        r = json.load(f)
    rows = [x for x in r["rows"] if x.get("fixed_rate") and not x.get("unavailable")]
    s, m = r["settings"], r["machine"]
    own = any(x.get("own_rate") for x in rows)
    style = colors(rows)
    fig, axes = plt.subplots(1, 2 if own else 1, figsize=(15 if own else 10, 8), dpi=100, squeeze=False)
    draw(axes[0][0], rows, "fixed_rate", style=style, title=f"every row at {s['fixed_rate']:.0f} req/s ({s['rate_fraction_of_anchor'] * 100:.0f}% of nginx's maximum)")
    if own:
        draw(
            axes[0][1],
            rows,
            "own_rate",
            style=style,
            title=f"rows saturated on the left, at {s['rate_fraction_of_anchor'] * 100:.0f}% of their own maximum (nginx for reference)",
        )
    fig.suptitle(
        f"authrealm, nginx and oauth2-proxy: latency percentiles at a fixed rate, open loop, {s['connections']} connections; "
        f"{m['cpus_online']} × {m['cpu_model']}, {r['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")


BEGIN = "<!-- bench:begin (written by hack/bench.sh --publish) -->"
END = "<!-- bench:end -->"


def readme(path, results_md):
    with open(results_md) as f:
        md = f.read().splitlines()
    # Drop the H1 title; demote the results' own headings below the README's "## Performance".
    body = []
    for line in md:
        if line.startswith("# "):
            body.append(f"**{line[2:]}** (`hack/bench.sh --publish`, default settings; full results: `docs/bench/results.md`, `results.json`)")
        elif line.startswith("## "):
            body.append("#" + line)
        else:
            body.append(line)
    block = "\n".join([BEGIN, "", *body, "", "![latency percentiles at the fixed rate](docs/bench/latency.png)", "", END])
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{path}: no bench markers ({BEGIN} … {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + block + tail)
    print(f"updated {path}")


if __name__ == "__main__":
    if sys.argv[1] == "--readme":
        readme(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2])
