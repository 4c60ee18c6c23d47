"""The end-of-run table (terminal and Markdown), the JSON record and the time-vs-T plot."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import List

from rich.console import Console
from rich.table import Table

COLUMNS = ["shape", "B", "T", "dtype", "contender", "ms/call", "x mlx-lm", "GB/s", "% copy BW", "note"]


def _fmt_ms(s) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def rows(results: List[dict]) -> List[List[str]]:
    """One row per (cell, contender) in run order; non-timed entries say why in `note`."""
    out = []
    for r in results:
        c = r["config"]
        note = r.get("reason") or r.get("error") or ""
        if r.get("auto"):
            note = ("auto's choice; " + note).rstrip("; ")
        if r["status"] == "ok":
            cells = [_fmt_ms(r["time_s"]), f"{r['speedup']:.2f}" if r.get("speedup") else "-",
                     f"{r['GBps']:.2f}", f"{100 * r['copy_frac']:.1f}" if r.get("copy_frac") else "-"]
        else:
            cells = [r["status"], "-", "-", "-"]
        if r.get("gpu_us") is not None:
            note = (f"GPU {r['gpu_us']:.1f} us in {r['launches']:g} launches; " + note).rstrip("; ")
        out.append([c["shape"], str(c["B"]), str(c["T"]), c["dtype"], r["contender"], *cells, note])
    return out


def print_table(results: List[dict], console: Console, title: str = "") -> None:
    t = Table(title=title or None, show_lines=False)
    t.add_column("cell", overflow="fold")
    for col in COLUMNS[4:]:
        t.add_column(col, justify="left" if col in ("contender", "note") else "right", overflow="fold")
    last = None
    for row in rows(results):
        cell = f"{row[0]} B{row[1]} T{row[2]} {row[3]}"
        if last is not None and cell != last:
            t.add_section()
        t.add_row(cell if cell != last else "", *row[4:])
        last = cell
    console.print(t)


def markdown(results: List[dict]) -> str:
    """The same table as GitHub Markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows(results):
        lines.append("| " + " | ".join(x.replace("|", "/") for x in row) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def plot(results: List[dict], path: str, title: str = "") -> None:
    """PNG of median time vs T, one panel per (shape, B, dtype), one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(lambda: defaultdict(list))
    family = {}
    for r in results:
        if r["status"] == "ok":
            c = r["config"]
            groups[f"{c['shape']} B{c['B']} {c['dtype']}"][r["contender"]].append((c["T"], r["time_s"] * 1e3))
            family[r["contender"]] = r.get("family", "")
    # One colour per contender across panels; line style per family (ours solid, peers broken).
    names = sorted(family)
    cmap = plt.get_cmap("tab20")
    color = {n: cmap(i % 20) for i, n in enumerate(names)}
    style = {"mlx-gdn": "-", "mlx-lm": "--", "mlx": ":", "fla": "-."}
    n = max(1, len(groups))
    cols = min(n, 2)
    rows_ = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols + 3, 4.2 * rows_), squeeze=False)
    for ax, (g, lines) in zip(axes.flat, sorted(groups.items())):
        for name, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=name, color=color[name],
                    ls=style.get(family[name], "-"))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per call)")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(g)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=color[nm], ls=style.get(family[nm], "-"), marker="o", ms=4) for nm in names]
    fig.legend(handles, names, loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (6 * cols + 3), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
