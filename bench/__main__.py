"""Run every bench/*_bench.py module's main() and print one table of their results."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

COLUMNS = ("bench", "case", "seconds", "baseline", "baseline_seconds", "ratio")


def discover() -> list[str]:
    return sorted(path.stem for path in Path(__file__).parent.glob("*_bench.py"))


def format_table(rows: list[dict[str, Any]]) -> str:
    extra = [key for row in rows for key in row if key not in COLUMNS]
    columns = [c for c in COLUMNS if any(c in row for row in rows)] + list(dict.fromkeys(extra))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def main(names: list[str] | None = None) -> int:
    rows: list[dict[str, Any]] = []
    for name in names or discover():
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        result = importlib.import_module(f"bench.{name}").main()
        rows += list(result or [])
        print(f"== {name} done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
