"""Kiln with TLS on every listener and tokens enforced, driven by the clients users have:
curl, Telegraf's request shape, psql, psycopg, psycopg2, SQLAlchemy, asyncpg and pgJDBC
(TLS verified, the token as the password), pyarrow.flight and ADBC Flight SQL over TLS,
grpcurl, influxdb3-python with token=.

Starts its own `kiln serve` with a test CA's certificate (made here with trustme, never
stored anywhere but a temporary directory) and an admin token file.

Usage: secure.py KILN_BINARY WORK_DIR
"""
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

from checks import check, finish  # noqa: E402 - next to this script

kiln, work = sys.argv[1:3]
os.makedirs(work, exist_ok=True)

import trustme  # noqa: E402

ca = trustme.CA()
server_cert = ca.issue_cert("localhost", "127.0.0.1")
ca_pem = os.path.join(work, "ca.pem")
cert_pem = os.path.join(work, "tls.crt")
key_pem = os.path.join(work, "tls.key")
ca.cert_pem.write_to_path(ca_pem)
server_cert.private_key_pem.write_to_path(key_pem)
with open(cert_pem, "wb") as f:
    for blob in server_cert.cert_chain_pems:
        f.write(blob.bytes())
admin = "kiln_" + secrets.token_hex(32)
admin_file = os.path.join(work, "admin-token")
with open(admin_file, "w") as f:
    f.write(admin + "\n")

out = open(os.path.join(work, "stdout"), "w+")
log = open(os.path.join(work, "server.log"), "w")
proc = subprocess.Popen(
    [kiln, "serve", "--data-dir", os.path.join(work, "data"),
     "--http-bind", "127.0.0.1:0", "--grpc-bind", "127.0.0.1:0", "--pg-bind", "127.0.0.1:0",
     "--tls-cert", cert_pem, "--tls-key", key_pem, "--admin-token-file", admin_file],
    stdout=out, stderr=log,
)
try:
    for _ in range(100):
        out.seek(0)
        lines = out.read().splitlines()
        if len(lines) >= 3:
            break
        time.sleep(0.1)
    urls = {l.split(" listening on ")[0].split()[-1]: l.split(" listening on ")[1] for l in lines}
    http_url = urls["HTTP"].replace("127.0.0.1", "localhost")
    grpc_port = urls["gRPC"].rsplit(":", 1)[1]
    pg_port = urls["PostgreSQL"].rsplit(":", 1)[1]
    context = ssl.create_default_context(cafile=ca_pem)

    def http(method, path, token=None, body=None, scheme="Bearer", content_type=None):
        req = urllib.request.Request(http_url + path, data=body, method=method)
        if token:
            req.add_header("Authorization", f"{scheme} {token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=context) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def create(name, body):
        status, text = http("POST", "/api/v3/tokens", admin, json.dumps(dict(name=name, **body)).encode(),
                            content_type="application/json")
        assert status == 201, (status, text)
        return json.loads(text)["token"]

    writer = create("gateway", {"databases": ["plant"], "permissions": ["write"]})
    reader = create("grafana", {"databases": ["plant"], "permissions": ["read"]})

    # curl, verifying the server against the test CA.
    def curl(*args):
        return subprocess.run(["curl", "-s", "--cacert", ca_pem, *args], capture_output=True, text=True, timeout=30)

    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-XPOST", f"{http_url}/api/v3/write_lp?db=plant",
             "-H", f"Authorization: Bearer {writer}", "--data-binary", "cpu,host=a usage=1.5 1714557600000000000")
    check("curl --cacert: write with a write token", r.stdout == "204", r.stdout + r.stderr)
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-XPOST", f"{http_url}/api/v3/write_lp?db=plant",
             "--data-binary", "cpu,host=x usage=9 1714557600000000000")
    check("curl --cacert: write without a token is 401", r.stdout == "401", r.stdout + r.stderr)
    r = curl("-G", f"{http_url}/api/v3/query_sql", "-H", f"Authorization: Bearer {reader}",
             "--data-urlencode", "db=plant", "--data-urlencode", "q=SELECT count(*) AS n FROM cpu")
    check("curl --cacert: query with a read token", json.loads(r.stdout or "[{}]")[0].get("n") == 1, r.stdout + r.stderr)

    # Telegraf's request: InfluxDB v2 write with `Authorization: Token`.
    status, _ = http("POST", "/api/v2/write?bucket=plant&org=any&precision=s", writer,
                     b"cpu,host=b usage=2.5 1714557610", scheme="Token")
    check("Telegraf request shape (Authorization: Token) over TLS", status == 204, status)
    status, _ = http("POST", "/api/v2/write?bucket=plant&org=any&precision=s", reader,
                     b"cpu,host=c usage=3.5 1714557620", scheme="Token")
    check("a read token cannot write (403)", status == 403, status)

    # psql with sslmode=verify-full, the token as the password.
    env = dict(os.environ, PGPASSWORD=reader)
    r = subprocess.run(
        ["psql", f"host=localhost port={pg_port} dbname=plant user=grafana sslmode=verify-full sslrootcert={ca_pem}",
         "-X", "-tA", "-c", "SELECT count(*) FROM cpu"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    check("psql sslmode=verify-full with the token as password", r.stdout.strip() == "2", r.stdout + r.stderr)

    import psycopg

    dsn = f"host=localhost port={pg_port} dbname=plant user=grafana sslmode=verify-full sslrootcert={ca_pem}"
    with psycopg.connect(dsn, password=reader) as conn:
        n = conn.execute("SELECT count(*) FROM cpu").fetchone()[0]
        check("psycopg verify-full with the token as password", n == 2, n)
    try:
        psycopg.connect(dsn, password="kiln_wrong").close()
        check("psycopg: a wrong token is refused", False, "connected")
    except psycopg.OperationalError as e:
        check("psycopg: a wrong token is refused (28P01)", "28P01" in str(getattr(e, "sqlstate", "")) or "password authentication failed" in str(e), e)

    import psycopg2

    conn = psycopg2.connect(dsn, password=reader)
    cur = conn.cursor()
    cur.execute("SELECT count(*) FROM cpu")
    n = cur.fetchone()[0]
    check("psycopg2 verify-full with the token as password", n == 2, n)
    conn.close()

    import sqlalchemy as sa

    engine = sa.create_engine(
        f"postgresql+psycopg2://grafana:{reader}@localhost:{pg_port}/plant",
        connect_args={"sslmode": "verify-full", "sslrootcert": ca_pem},
    )
    with engine.connect() as conn:
        columns = [c["name"] for c in sa.inspect(conn).get_columns("cpu")]
        check("SQLAlchemy over TLS with a token: inspector", columns == ["time", "host", "usage"], columns)
    engine.dispose()

    import asyncio

    import asyncpg

    async def asyncpg_count():
        conn = await asyncpg.connect(host="localhost", port=int(pg_port), user="grafana", database="plant",
                                     password=reader, ssl=ssl.create_default_context(cafile=ca_pem))
        try:
            return await conn.fetchval("SELECT count(*) FROM cpu")
        finally:
            await conn.close()

    n = asyncio.run(asyncpg_count())
    check("asyncpg over TLS with the token as password", n == 2, n)

    jar = os.environ.get("KILN_PGJDBC_JAR")
    if jar:
        r = subprocess.run(
            ["java", "-cp", jar, os.path.join(os.path.dirname(__file__), "JdbcMetadata.java"),
             f"localhost:{pg_port}", reader, ca_pem],
            capture_output=True, text=True, timeout=300,
        )
        check("pgJDBC over TLS with the token as password", r.returncode == 0, r.stdout + r.stderr)

    # pyarrow.flight over TLS with a bearer header.
    import pyarrow.flight as flight

    with open(ca_pem, "rb") as f:
        root = f.read()
    fc = flight.FlightClient(f"grpc+tls://localhost:{grpc_port}", tls_root_certs=root)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {reader}".encode())])
    ticket = flight.Ticket(json.dumps({"database": "plant", "sql_query": "SELECT count(*) AS n FROM cpu",
                                       "query_type": "sql"}))
    table = fc.do_get(ticket, options).read_all()
    check("pyarrow.flight over TLS with a bearer token", table.column("n").to_pylist() == [2], table)
    fc.close()

    # ADBC Flight SQL over TLS, with the token as the authorization header.
    import adbc_driver_flightsql.dbapi as flightsql
    from adbc_driver_flightsql import DatabaseOptions

    with open(ca_pem) as f:
        ca_text = f.read()
    with flightsql.connect(
        f"grpc+tls://localhost:{grpc_port}",
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: ca_text,
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {reader}",
            "adbc.flight.sql.rpc.call_header.database": "plant",
        },
        autocommit=True,
    ) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT host FROM cpu ORDER BY time")
            hosts = [r[0] for r in cur.fetchall()]
            check("ADBC Flight SQL over TLS with a token", hosts == ["a", "b"], hosts)

    # grpcurl over TLS, the write token in the metadata.
    request = json.dumps({"database": "plant", "lineProtocol": {"text": "cpu,host=d usage=4.5 1714557630000000000"}})
    r = subprocess.run(
        ["grpcurl", "-cacert", ca_pem, "-H", f"authorization: Bearer {writer}", "-d", request,
         f"localhost:{grpc_port}", "kiln.ingest.v1.WriteService/Write"],
        capture_output=True, text=True, timeout=60,
    )
    check("grpcurl -cacert with a token writes", r.returncode == 0 and "rowsWritten" in r.stdout, r.stdout + r.stderr)
    r = subprocess.run(
        ["grpcurl", "-cacert", ca_pem, "-d", request, f"localhost:{grpc_port}", "kiln.ingest.v1.WriteService/Write"],
        capture_output=True, text=True, timeout=60,
    )
    check("grpcurl without a token: Unauthenticated", "Unauthenticated" in r.stderr + r.stdout, r.stdout + r.stderr)

    # influxdb3-python: token= over TLS.
    from influxdb_client_3 import InfluxDBClient3, flight_client_options

    client = InfluxDBClient3(
        host=f"https://localhost:{grpc_port}", database="plant", token=reader,
        flight_client_options=flight_client_options(tls_root_certs=ca_text),
    )
    table = client.query("SELECT count(*) AS n FROM cpu")
    check("influxdb3-python token= over TLS", table.to_pylist() == [{"n": 3}], table)
    client.close()
finally:
    proc.terminate()
    proc.wait(timeout=60)

with open(os.path.join(work, "server.log")) as f:
    server_log = f.read()
check("no token in the server log", all(t not in server_log for t in (admin, writer, reader)))
finish("secure")
