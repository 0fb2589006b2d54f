"""Readers of a Parquet file that a writer keeps replacing by rename (what a sweep does to trials.parquet).

pyarrow / pandas / DuckDB given a *path* open it twice (footer, then data); a rename in between pairs one
version's footer with the next version's bytes. Reading through one open handle
(:func:`skinsweep.files.read_parquet_once`) sees one whole version. Prints failed/total reads per reader.

    .venv/bin/python benchmarks/bench_reader_race.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from skinsweep.files import atomic_path, read_parquet_once


def table(n: int) -> pa.Table:
    return pa.table({"trial_id": [f"id{i:05d}" for i in range(n)], "x": [float(i) for i in range(n)],
                     "s": ["abc" * i for i in range(n)]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="reading time per reader")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trials.parquet")
        pq.write_table(table(5), path)
        stop = threading.Event()

        def writer() -> None:  # 1..300 rows, replaced by rename as the results store does
            n = 5
            while not stop.is_set():
                n = n % 300 + 1
                with atomic_path(path) as tmp:
                    pq.write_table(table(n), tmp)

        readers = {
            "pyarrow.parquet.read_table(path)": lambda: pq.read_table(path, columns=["trial_id"]),
            "pandas.read_parquet(path)": lambda: pd.read_parquet(path),
            "duckdb read_parquet(path) with a filter":
                lambda: duckdb.sql(f"SELECT trial_id, x FROM read_parquet('{path}') WHERE x > 3 ORDER BY s").fetchall(),
            "skinsweep read_parquet_once (one handle)": lambda: read_parquet_once(path, columns=["trial_id"]),
        }
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            for name, read in readers.items():
                ok = failed = 0
                last = ""
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    try:
                        read()
                        ok += 1
                    except Exception as e:  # noqa: BLE001 - counted and reported
                        failed += 1
                        last = f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"
                print(f"{name:44s} failed {failed:>6,} of {ok + failed:>6,} reads" + (f"  ({last})" if last else ""))
        finally:
            stop.set()
            thread.join(timeout=10)


if __name__ == "__main__":
    main()
