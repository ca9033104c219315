"""Run every benchmark and print a markdown report for docs/benchmarks.md (`make bench`).

Each benchmark also writes its raw numbers to benchmarks/results/<name>.json.
"""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import bench_attribution
import bench_conservation
import bench_graph
import bench_ig_prefix
import bench_ig_rule
import bench_load
import bench_memory
import bench_parallel
import bench_rules
import bench_sweep
from common import machine

BENCHMARKS = [
    bench_load,
    bench_attribution,
    bench_rules,
    bench_conservation,
    bench_parallel,
    bench_graph,
    bench_memory,
    bench_ig_rule,
    bench_ig_prefix,
    bench_sweep,
]


def main() -> None:
    only = set(sys.argv[1:])  # e.g. `python benchmarks/run.py bench_memory bench_parallel`
    print(f"Machine: {machine()}  \nDate: {date.today().isoformat()}  \nCommand: `make bench`\n")
    for bench in BENCHMARKS:
        if only and bench.__name__ not in only:
            continue
        section = bench.main()
        print(f"### {section['title']}\n\n| measurement | value |\n|---|---|")
        for name, value in section["rows"]:
            print(f"| {name} | {value} |")
        print()


if __name__ == "__main__":
    main()
