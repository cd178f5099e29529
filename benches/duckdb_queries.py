"""DuckDB side of `kiln-bench queries`.

    duckdb_queries.py prepare <glob of Kiln's segments> <dir>
        writes DuckDB's own copy of the data: <dir>/parquet/day-N.parquet (one file a day,
        sorted by hostname then time, `time` a zoneless TIMESTAMP) and <dir>/cpu.duckdb (a
        native table `cpu`, inserted in the same order);
    duckdb_queries.py kiln-segments <glob> | parquet <dir> | native <file>
        runs each SQL line of stdin as table `cpu` over Kiln's segments, over the Parquet
        files `prepare` wrote, or over the native table, and prints, per query, the rows
        returned and the seconds taken (query to a whole Arrow result).
"""

import os
import sys
import time

import duckdb


def prepare(segments, out):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    os.makedirs(f"{out}/parquet", exist_ok=True)
    source = f"""SELECT * REPLACE (time::TIMESTAMP AS time)
                 FROM read_parquet('{segments}')"""
    days = con.sql(
        f"SELECT DISTINCT date_trunc('day', time) AS d FROM ({source}) ORDER BY d"
    ).fetchall()
    for i, (day,) in enumerate(days):
        con.execute(
            f"""COPY (SELECT * FROM ({source})
                      WHERE time >= ? AND time < ? + INTERVAL 1 DAY
                      ORDER BY hostname, time)
                TO '{out}/parquet/day-{i}.parquet' (FORMAT parquet)""",
            [day, day],
        )
    path = f"{out}/cpu.duckdb"
    if os.path.exists(path):
        os.remove(path)
    native = duckdb.connect(path)
    native.execute(
        f"CREATE TABLE cpu AS SELECT * FROM read_parquet('{out}/parquet/*.parquet') "
        "ORDER BY hostname, time"
    )
    native.close()
    print(f"{len(days)} day files and a native table in {out}", file=sys.stderr)


def run(mode, path):
    if mode == "native":
        con = duckdb.connect(path, read_only=True)
    else:
        con = duckdb.connect()
        # Kiln stores time as UTC nanoseconds (TIMESTAMPTZ_NS to DuckDB); queries over
        # its files compare it with literals of that type, so DuckDB prunes files by it.
        con.execute("SET TimeZone = 'UTC'")
        files = path if mode == "kiln-segments" else f"{path}/*.parquet"
        con.execute(f"CREATE VIEW cpu AS SELECT * FROM read_parquet('{files}')")
    for line in sys.stdin:
        sql = line.strip()
        if not sql:
            continue
        start = time.perf_counter()
        table = con.sql(sql).to_arrow_table()
        took = time.perf_counter() - start
        print(table.num_rows, f"{took:.6f}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare(sys.argv[2], sys.argv[3])
    elif sys.argv[1] in ("kiln-segments", "parquet", "native"):
        run(sys.argv[1], sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
