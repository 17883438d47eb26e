"""What every benchmark shares: the machine's name, statistics over repeated runs, and a
writer that appends one CSV row per case (flushed at once, so a run cut short keeps what
it measured) and renders the same rows as a markdown table."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.devices import cpu_name, hardware  # noqa: F401 - the machine's name, shared with instantid eval

# Columns every CSV row has, before the benchmark's own.
COMMON_COLUMNS = ("bench", "case", "status", "hardware", "device", "date", "commit", "torch", "repeats", "warmup",
                  "load_avg_1m")
STAT_COLUMNS = ("median", "p95", "min", "max", "spread_pct")


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if head.returncode:
            return ""
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except Exception:  # pragma: no cover
        return ""


def load_average() -> float | None:
    """The machine's 1-minute load average when the benchmark started (how busy it was)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Iterable[float], prefix: str = "") -> dict[str, float]:
    """median, p95, min, max and spread ((max - min) / median, in %) of ``values``."""
    values = [float(v) for v in values]
    if not values:
        return {f"{prefix}{k}": "" for k in STAT_COLUMNS}
    median = statistics.median(values)
    return {
        f"{prefix}median": median,
        f"{prefix}p95": percentile(values, 95),
        f"{prefix}min": min(values),
        f"{prefix}max": max(values),
        f"{prefix}spread_pct": (max(values) - min(values)) / median * 100 if median else 0.0,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.6g}"
    return str(value)


class Results:
    """One benchmark's rows: ``{out}/{name}.csv`` (written as rows come) and
    ``{out}/{name}.md`` (on :meth:`close`). Every row has every column; a missing value
    is an error in the benchmark, not an empty cell, unless it is declared optional."""

    def __init__(self, out_dir: str | Path, name: str, columns: Sequence[str], *, table: Sequence[str] | None = None,
                 optional: Sequence[str] = (), repeats: int = 0, warmup: int = 0, title: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.columns = [*COMMON_COLUMNS, *(c for c in columns if c not in COMMON_COLUMNS)]
        self.table = list(table or columns)
        self.optional = set(optional)
        self.title = title or name
        self.footer = ""
        self.rows: list[dict[str, str]] = []
        self.base = {"bench": name, **hardware(), "date": now(), "commit": git_commit(), "torch": torch_version(),
                     "repeats": repeats, "warmup": warmup, "status": "ok", "load_avg_1m": load_average()}
        self.csv_path = self.out_dir / f"{name}.csv"
        self.md_path = self.out_dir / f"{name}.md"
        with open(self.csv_path, "w", newline="") as handle:
            csv.writer(handle).writerow(self.columns)

    def add(self, **values: Any) -> dict[str, str]:
        row = {**self.base, **values}
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.name}: columns not declared: {sorted(unknown)}")
        skipped = str(row.get("status", "ok")) != "ok"
        missing = [c for c in self.columns if c not in row and c not in self.optional and not skipped]
        if missing:
            raise KeyError(f"{self.name}: row {row.get('case')!r} lacks {missing}")
        cells = {c: _cell(row.get(c)) for c in self.columns}
        self.rows.append(cells)
        with open(self.csv_path, "a", newline="") as handle:
            csv.writer(handle).writerow([cells[c] for c in self.columns])
        print(f"[{self.name}] {cells['case']}: " + ", ".join(f"{c}={cells[c]}" for c in self.table if cells[c]),
              flush=True)
        return cells

    def markdown(self) -> str:
        base = self.base
        lines = [f"### {self.title}", "",
                 f"{base['hardware']}; device {base['device']}; torch {base['torch']}; {base['date']}; "
                 f"commit {base['commit'] or '?'}; {base['repeats']} timed runs after {base['warmup']} warm-up; "
                 f"load average {base['load_avg_1m']} at the start",
                 "", "| case | " + " | ".join(self.table) + " | status |",
                 "|---|" + "---|" * (len(self.table) + 1)]
        for row in self.rows:
            lines.append(f"| {row['case']} | " + " | ".join(_short(row[c]) for c in self.table) + f" | {row['status']} |")
        if self.footer:
            lines += ["", self.footer]
        return "\n".join(lines) + "\n"

    def close(self) -> Path:
        self.md_path.write_text(self.markdown())
        return self.md_path


def _short(cell: str) -> str:
    try:
        value = float(cell)
    except ValueError:
        return cell
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"
