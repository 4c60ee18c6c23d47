"""`--compare A.json B.json`: two recorded runs side by side, cell by cell."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table


def load(path: str) -> dict:
    with open(path) as f:
        rec = json.load(f)
    if "results" not in rec or "environment" not in rec:
        raise ValueError(f"{path} is not a benchmark record (no 'results'/'environment')")
    return rec


def compare(path_a: str, path_b: str, console: Console) -> list:
    """Print and return rows (cell, contender, A ms, B ms, A/B) for cells timed in both runs."""
    a, b = load(path_a), load(path_b)
    for tag, path, rec in (("A", path_a, a), ("B", path_b, b)):
        env = rec["environment"]
        console.print(f"[bold]{tag}[/] {path}: {env.get('device')}, mlx {env.get('versions', {}).get('mlx')}, "
                      f"commit {str(env.get('git_commit'))[:10]}, {env.get('date')}")
    index_b = {(r["key"], r["contender"]): r for r in b["results"]}
    t = Table(title="A vs B (A/B > 1: B is faster)")
    for col in ("cell", "contender", "A ms", "B ms", "A/B"):
        t.add_column(col, justify="left" if col in ("cell", "contender") else "right")
    out = []
    for ra in a["results"]:
        rb = index_b.get((ra["key"], ra["contender"]))
        if rb is None:
            continue
        ta = ra.get("time_s") if ra["status"] == "ok" else None
        tb = rb.get("time_s") if rb["status"] == "ok" else None
        ratio = ta / tb if ta and tb else None
        out.append((ra["key"], ra["contender"], ta, tb, ratio))
        t.add_row(ra["key"], ra["contender"],
                  f"{ta * 1e3:.3f}" if ta else ra["status"], f"{tb * 1e3:.3f}" if tb else rb["status"],
                  f"{ratio:.2f}" if ratio else "-")
    console.print(t)
    if not out:
        console.print("no cell and contender in common")
    return out
