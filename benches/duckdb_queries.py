"""DuckDB side of `kiln-bench queries`: runs each SQL line of stdin over the Parquet
segments Kiln persisted (argv[1], a glob) as table `cpu`, and prints, per query, the rows
returned and the seconds taken (query to a whole Arrow result)."""

import sys
import time

import duckdb

con = duckdb.connect()
# Kiln stores time as UTC nanoseconds (TIMESTAMPTZ_NS to DuckDB); the queries compare it
# with literals of that type, so DuckDB prunes the files by it.
con.execute("SET TimeZone = 'UTC'")
con.execute(f"CREATE VIEW cpu AS SELECT * FROM read_parquet('{sys.argv[1]}')")
for line in sys.stdin:
    sql = line.strip()
    if not sql:
        continue
    start = time.perf_counter()
    table = con.sql(sql).to_arrow_table()
    took = time.perf_counter() - start
    print(table.num_rows, f"{took:.6f}", flush=True)
