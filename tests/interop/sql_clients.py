"""Kiln's query protocols driven by the clients analysts and tools already use:
psql, psycopg 3, psycopg2, SQLAlchemy and asyncpg over the PostgreSQL wire protocol;
ADBC's Flight SQL driver and pyarrow.flight over Arrow Flight; the influxdb3 Python client.

Usage: sql_clients.py HTTP_URL PG_ADDR GRPC_ADDR
"""
import asyncio
import json
import subprocess
import sys
import urllib.request

http_url, pg_addr, grpc_addr = sys.argv[1:4]
pg_host, pg_port = pg_addr.rsplit(":", 1)
DSN = f"host={pg_host} port={pg_port} dbname=plant user=analyst"

from checks import check, finish  # noqa: E402 - next to this script


def attempt(name, fn):
    """Runs one client's checks; an exception is that client's failure, not the script's."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - report and carry on with the next client
        check(name, False, f"{type(e).__name__}: {e}")


# Three readings of two hosts, written through the HTTP API.
LINES = (
    "cpu,host=a,region=eu usage=1.5,load=3i 1714557600000000000\n"
    "cpu,host=b,region=us usage=2.5,load=4i 1714557610000000000\n"
    "cpu,host=a,region=eu usage=3.5,load=5i 1714557620000000000\n"
)
req = urllib.request.Request(
    f"{http_url}/api/v3/write_lp?db=plant", data=LINES.encode(), method="POST"
)
with urllib.request.urlopen(req) as resp:
    assert resp.status == 204, resp.status

# PostgreSQL type OIDs.
TEXT, INT8, FLOAT8, TIMESTAMPTZ = 25, 20, 701, 1184


def psql():
    base = ["psql", "-h", pg_host, "-p", pg_port, "-U", "analyst", "-d", "plant", "-X"]
    run = lambda *args: subprocess.run(  # noqa: E731
        base + list(args), capture_output=True, text=True, timeout=60
    )
    out = run("-c", r"\dt")
    check("psql \\dt lists cpu", out.returncode == 0 and "cpu" in out.stdout, out.stdout + out.stderr)
    out = run("-c", r"\d cpu")
    check(
        "psql \\d cpu describes its columns",
        out.returncode == 0 and all(c in out.stdout for c in ("usage", "double precision", "host")),
        out.stdout + out.stderr,
    )
    out = run("-tA", "-c", "SELECT count(*), max(usage) FROM cpu")
    check("psql query", out.stdout.strip() == "3|3.5", out.stdout + out.stderr)


def psycopg3():
    import psycopg

    with psycopg.connect(DSN) as conn:
        # Server-side parameters, extended protocol; binary results too.
        rows = conn.execute(
            "SELECT host, usage, load FROM cpu WHERE host = %s ORDER BY time", ["a"]
        ).fetchall()
        check("psycopg 3 parameters", rows == [("a", 1.5, 3), ("a", 3.5, 5)], rows)
        cur = conn.cursor(binary=True)
        cur.execute("SELECT time, usage FROM cpu WHERE usage > %s ORDER BY time", [2.0])
        rows = cur.fetchall()
        check(
            "psycopg 3 binary results",
            len(rows) == 2 and rows[0][0].isoformat() == "2024-05-01T10:00:10+00:00" and rows[1][1] == 3.5,
            rows,
        )
        try:
            conn.execute("SELECT * FROM nope")
            check("psycopg 3 undefined table", False, "no error")
        except psycopg.errors.UndefinedTable:
            check("psycopg 3 undefined table", True)
            conn.rollback()


def psycopg2_grafana():
    import psycopg2

    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    cur = conn.cursor()
    # What Grafana's PostgreSQL data source sends for a time-series panel (simple protocol).
    cur.execute(
        'SELECT floor(extract(epoch from time)/60)*60 AS "time", host AS metric, '
        'max(usage) AS "usage" FROM cpu '
        "WHERE time BETWEEN '2024-05-01T10:00:00Z' AND '2024-05-01T11:00:00Z' "
        "GROUP BY 1, 2 ORDER BY 1, 2"
    )
    types = [d.type_code for d in cur.description]
    rows = cur.fetchall()
    check(
        "psycopg2 Grafana time series: typed columns",
        [d.name for d in cur.description] == ["time", "metric", "usage"]
        and types == [FLOAT8, TEXT, FLOAT8],
        types,
    )
    check(
        "psycopg2 Grafana time series: rows",
        rows == [(1714557600.0, "a", 3.5), (1714557600.0, "b", 2.5)],
        rows,
    )
    cur.execute("SELECT time, host, usage FROM cpu ORDER BY time DESC LIMIT 1")
    check(
        "psycopg2 table panel: timestamp column",
        [d.type_code for d in cur.description] == [TIMESTAMPTZ, TEXT, FLOAT8]
        and cur.fetchone()[0].isoformat() == "2024-05-01T10:00:20+00:00",
    )
    conn.close()


def sqlalchemy():
    import sqlalchemy as sa

    engine = sa.create_engine(f"postgresql+psycopg2://analyst@{pg_host}:{pg_port}/plant")
    with engine.connect() as conn:
        tables = sa.inspect(conn).get_table_names()
        check("SQLAlchemy inspector lists tables", "cpu" in tables, tables)
        n = conn.execute(sa.text("SELECT count(*) FROM cpu WHERE load >= :load"), {"load": 4}).scalar()
        check("SQLAlchemy query with a bound parameter", n == 2, n)


def asyncpg_client():
    import asyncpg

    async def main():
        conn = await asyncpg.connect(
            host=pg_host, port=int(pg_port), user="analyst", database="plant"
        )
        rows = await conn.fetch("SELECT host, usage FROM cpu WHERE load > $1 ORDER BY time", 3)
        check("asyncpg prepared query", [tuple(r) for r in rows] == [("b", 2.5), ("a", 3.5)], rows)
        await conn.close()

    asyncio.run(main())


def adbc():
    import adbc_driver_flightsql.dbapi as flightsql

    with flightsql.connect(
        f"grpc://{grpc_addr}",
        db_kwargs={"adbc.flight.sql.rpc.call_header.database": "plant"},
        autocommit=True,
    ) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT host, usage FROM cpu ORDER BY time")
            table = cur.fetch_arrow_table()
            check(
                "ADBC Flight SQL query",
                table.column("host").to_pylist() == ["a", "b", "a"]
                and table.column("usage").to_pylist() == [1.5, 2.5, 3.5],
                table,
            )
        with conn.cursor() as cur:
            cur.execute("SELECT usage FROM cpu WHERE host = $1 ORDER BY time", ("a",))
            usage = cur.fetch_arrow_table().column("usage").to_pylist()
            check("ADBC Flight SQL bound parameter", usage == [1.5, 3.5], usage)
    # Tags as dictionaries on request: replacement dictionaries batch after batch.
    with flightsql.connect(
        f"grpc://{grpc_addr}",
        db_kwargs={
            "adbc.flight.sql.rpc.call_header.database": "plant",
            "adbc.flight.sql.rpc.call_header.kiln-dictionaries": "keep",
        },
        autocommit=True,
    ) as conn:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT c.host FROM cpu c CROSS JOIN generate_series(1, 20000) g"
                " ORDER BY g.value, c.time"
            )
            table = cur.fetch_arrow_table()
            host = table.column("host")
            check(
                "ADBC Flight SQL tags as dictionaries",
                str(host.type) == "dictionary<values=string, indices=int32, ordered=0>"
                and host.num_chunks > 1
                and host.to_pylist() == ["a", "b", "a"] * 20000,
                (host.type, host.num_chunks, host.to_pylist()[:6]),
            )
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        names = [
            t["table_name"]
            for c in objects
            for s in (c["catalog_db_schemas"] or [])
            if s["db_schema_name"] == "plant"
            for t in (s["db_schema_tables"] or [])
        ]
        check("ADBC get_objects lists tables", names == ["cpu"], objects)


def pyarrow_flight():
    import pyarrow.flight as flight

    client = flight.FlightClient(f"grpc+tcp://{grpc_addr}")
    ticket = flight.Ticket(
        json.dumps({"database": "plant", "sql_query": "SELECT sum(load) AS l FROM cpu", "query_type": "sql"})
    )
    table = client.do_get(ticket).read_all()
    check("pyarrow.flight JSON ticket", table.column("l").to_pylist() == [12], table)


def influxdb3():
    from influxdb_client_3 import InfluxDBClient3

    client = InfluxDBClient3(host=f"http://{grpc_addr}", database="plant", token="unused")
    table = client.query("SELECT host, load FROM cpu WHERE host = 'b'")
    check("influxdb3-python query", table.to_pylist() == [{"host": "b", "load": 4}], table)
    client.close()


for name, fn in [
    ("psql", psql),
    ("psycopg 3", psycopg3),
    ("psycopg2", psycopg2_grafana),
    ("SQLAlchemy", sqlalchemy),
    ("asyncpg", asyncpg_client),
    ("ADBC Flight SQL", adbc),
    ("pyarrow.flight", pyarrow_flight),
    ("influxdb3-python", influxdb3),
]:
    attempt(name, fn)

finish("sql-clients")
