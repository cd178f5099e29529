"""Kiln's query protocols driven by the clients analysts and tools already use:
psql, psycopg 3, psycopg2, SQLAlchemy and asyncpg over the PostgreSQL wire protocol, with
the catalog queries of Grafana, SQLAlchemy's inspector and DBeaver;
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


def psycopg2_cursor():
    """A psycopg2 connection in autocommit, as Grafana and DBeaver use it, and a cursor."""
    import psycopg2

    conn = psycopg2.connect(DSN)
    conn.autocommit = True
    return conn, conn.cursor()


def psycopg2_grafana():
    conn, cur = psycopg2_cursor()
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


# Grafana's PostgreSQL data source: the metadata queries its query builder sends
# (postgresMetaQuery.ts), replayed as it sends them. The schema constraint resolves the
# search path with current_setting('search_path').
GRAFANA_SEARCH_PATH = """quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )"""


def grafana_tables_query():
    return f"""SELECT
    CASE WHEN {GRAFANA_SEARCH_PATH}
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS "table"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN {GRAFANA_SEARCH_PATH} THEN 0 ELSE 1 END, 1"""


def grafana_columns_query(table):
    quoted = "'" + table.replace("'", "''") + "'"
    return f"""SELECT quote_ident(column_name) AS "column", data_type AS "type"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident({quoted}),1) = 2
        THEN quote_ident(table_schema) = (parse_ident({quoted}))[1]
          AND quote_ident(table_name) = (parse_ident({quoted}))[2]
        ELSE quote_ident(table_name) = {quoted}
          AND {GRAFANA_SEARCH_PATH}
      END"""


CPU_COLUMN_TYPES = {
    "time": "timestamp with time zone",
    "host": "text",
    "region": "text",
    "usage": "double precision",
    "load": "bigint",
}


def grafana_catalog():
    conn, cur = psycopg2_cursor()
    cur.execute("SELECT current_setting('server_version_num')::int/100 as version")
    version = cur.fetchone()[0]
    check("Grafana server version (current_setting)", version == 1600, version)
    cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    check("Grafana TimescaleDB probe finds none", cur.fetchall() == [])
    cur.execute(grafana_tables_query())
    tables = cur.fetchall()
    # Kiln's own tables (schema `system`, outside the search path) come qualified.
    system = [(f"system.{t}",) for t in
              ("alert_events", "alert_rules", "alerts", "data_quality", "deletes", "devices",
               "ingesters", "series", "views")]
    check("Grafana table picker", tables == [("cpu",)] + system, tables)
    for table in ("cpu", "public.cpu"):
        cur.execute(grafana_columns_query(table))
        columns = dict(cur.fetchall())
        check(
            f"Grafana column picker ({table}): PostgreSQL type names",
            columns == CPU_COLUMN_TYPES,
            columns,
        )
    cur.execute("SELECT current_setting('TimeZone'), current_setting('DateStyle')")
    check("Grafana session settings", cur.fetchone() == ("UTC", "ISO, MDY"))
    conn.close()


def sqlalchemy():
    import sqlalchemy as sa

    engine = sa.create_engine(f"postgresql+psycopg2://analyst@{pg_host}:{pg_port}/plant")
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        tables = inspector.get_table_names()
        check("SQLAlchemy inspector lists tables", "cpu" in tables, tables)
        columns = {c["name"]: c for c in inspector.get_columns("cpu")}
        types = {name: type(c["type"]).__name__ for name, c in columns.items()}
        check(
            "SQLAlchemy get_columns: types and nullability",
            types
            == {
                "time": "TIMESTAMP",
                "host": "TEXT",
                "region": "TEXT",
                "usage": "DOUBLE_PRECISION",
                "load": "BIGINT",
            }
            and columns["time"]["type"].timezone
            and not columns["time"]["nullable"]
            and columns["usage"]["nullable"]
            and all(c["default"] is None for c in columns.values()),
            columns,
        )
        reflected = {
            "pk": inspector.get_pk_constraint("cpu")["constrained_columns"],
            "indexes": inspector.get_indexes("cpu"),
            "foreign keys": inspector.get_foreign_keys("cpu"),
            "unique": inspector.get_unique_constraints("cpu"),
            "check": inspector.get_check_constraints("cpu"),
            "comment": inspector.get_table_comment("cpu")["text"],
            "schemas": inspector.get_schema_names(),
        }
        check(
            "SQLAlchemy keys, indexes, constraints, comment, schemas",
            reflected
            == {
                "pk": [],
                "indexes": [],
                "foreign keys": [],
                "unique": [],
                "check": [],
                "comment": None,
                "schemas": ["public", "system"],
            },
            reflected,
        )
        # What pandas' read_sql_table does: reflect the table, then select it.
        table = sa.Table("cpu", sa.MetaData(), autoload_with=conn)
        rows = conn.execute(sa.select(table).order_by(table.c.time)).fetchall()
        check(
            "SQLAlchemy reflected table (pandas read_sql_table)",
            [c.name for c in table.columns] == list(CPU_COLUMN_TYPES) and len(rows) == 3,
            (table.columns, rows),
        )
        n = conn.execute(sa.text("SELECT count(*) FROM cpu WHERE load >= :load"), {"load": 4}).scalar()
        check("SQLAlchemy query with a bound parameter", n == 2, n)


def dbeaver():
    """DBeaver's navigator queries for a table, as DBeaver sends them (simple protocol)."""
    conn, cur = psycopg2_cursor()
    cur.execute("SELECT c.oid FROM pg_catalog.pg_class c WHERE c.relname = 'cpu'")
    oid = cur.fetchone()[0]
    queries = {
        "startup": "SELECT current_schema(),session_user",
        "schemas": "SELECT n.oid,n.*,d.description FROM pg_catalog.pg_namespace n LEFT OUTER JOIN "
        "pg_catalog.pg_description d ON d.objoid=n.oid AND d.objsubid=0 AND "
        "d.classoid='pg_namespace'::regclass ORDER BY nspname",
        "settings": "SELECT * FROM pg_catalog.pg_settings where name='standard_conforming_strings'",
        "tables": "SELECT c.oid,c.*,d.description,pg_catalog.pg_get_expr(c.relpartbound, c.oid) as "
        "partition_expr, pg_catalog.pg_get_partkeydef(c.oid) as partition_key FROM "
        "pg_catalog.pg_class c LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=c.oid AND "
        "d.objsubid=0 AND d.classoid='pg_class'::regclass WHERE c.relname='cpu' AND c.relkind "
        "not in ('i','I','c')",
        "columns": "SELECT c.relname,a.*,pg_catalog.pg_get_expr(ad.adbin, ad.adrelid, true) as "
        "def_value,dsc.description FROM pg_catalog.pg_attribute a INNER JOIN pg_catalog.pg_class c "
        "ON (a.attrelid=c.oid) LEFT OUTER JOIN pg_catalog.pg_attrdef ad ON (a.attrelid=ad.adrelid "
        f"AND a.attnum = ad.adnum) LEFT OUTER JOIN pg_catalog.pg_description dsc ON "
        f"(c.oid=dsc.objoid AND a.attnum = dsc.objsubid) WHERE NOT a.attisdropped AND c.oid={oid} "
        "ORDER BY a.attnum",
        "indexes": "SELECT i.*,i.indkey as keys,c.relname,c.relnamespace,c.relam,c.reltablespace,"
        "tc.relname as tabrelname,dsc.description,pg_catalog.pg_get_expr(i.indpred, i.indrelid) as "
        "pred_expr,pg_catalog.pg_get_expr(i.indexprs, i.indrelid, true) as expr,"
        "pg_catalog.pg_relation_size(i.indexrelid) as index_rel_size,"
        "pg_catalog.pg_stat_get_numscans(i.indexrelid) as index_num_scans FROM "
        "pg_catalog.pg_index i INNER JOIN pg_catalog.pg_class c ON c.oid=i.indexrelid INNER JOIN "
        "pg_catalog.pg_class tc ON tc.oid=i.indrelid LEFT OUTER JOIN pg_catalog.pg_description dsc "
        f"ON i.indexrelid=dsc.objoid WHERE i.indrelid={oid} ORDER BY tabrelname, c.relname",
        "constraints": "SELECT c.oid,c.*,t.relname as tabrelname,rt.relnamespace as refnamespace,"
        "d.description, case when c.contype='c' then \"substring\"(pg_get_constraintdef(c.oid), "
        "7) else null end consrc_copy FROM pg_catalog.pg_constraint c INNER JOIN "
        "pg_catalog.pg_class t ON t.oid=c.conrelid LEFT OUTER JOIN pg_catalog.pg_class rt ON "
        "rt.oid=c.confrelid LEFT OUTER JOIN pg_catalog.pg_description d ON d.objoid=c.oid AND "
        f"d.objsubid=0 AND d.classoid='pg_constraint'::regclass WHERE c.conrelid={oid} ORDER BY "
        "c.oid",
    }
    rows = {}
    for name, sql in queries.items():
        cur.execute(sql)
        names = [d.name for d in cur.description]
        rows[name] = [dict(zip(names, r)) for r in cur.fetchall()]
    check(
        "DBeaver navigator: schemas, table, columns, no indexes or constraints",
        [r["nspname"] for r in rows["schemas"]] == ["pg_catalog", "public", "system"]
        and [r["attname"] for r in rows["columns"]] == list(CPU_COLUMN_TYPES)
        and len(rows["tables"]) == 1
        and len(rows["columns"]) == 5
        and rows["indexes"] == []
        and rows["constraints"] == [],
        rows,
    )
    conn.close()


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
    ("Grafana catalog", grafana_catalog),
    ("SQLAlchemy", sqlalchemy),
    ("DBeaver", dbeaver),
    ("asyncpg", asyncpg_client),
    ("ADBC Flight SQL", adbc),
    ("pyarrow.flight", pyarrow_flight),
    ("influxdb3-python", influxdb3),
]:
    attempt(name, fn)

finish("sql-clients")
