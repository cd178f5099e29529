"""Kiln's gRPC ingest service driven by clients that know nothing of Kiln's Rust code:
a Python grpcio stub generated from the .proto file, and grpcurl through server reflection.

Usage: grpc_client.py PROTO_ROOT GRPC_ADDR HTTP_URL
"""
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

proto_root, grpc_addr, http_url = sys.argv[1:4]

from checks import check, finish  # noqa: E402 - next to this script


def query(db, sql):
    url = f"{http_url}/api/v3/query_sql?" + urllib.parse.urlencode({"db": db, "q": sql})
    with urllib.request.urlopen(url) as resp:
        return json.loads(resp.read())


# A stub generated independently from the .proto file.
out = tempfile.mkdtemp()
from grpc_tools import protoc  # noqa: E402

rc = protoc.main(["protoc", f"-I{proto_root}", f"--python_out={out}", f"--grpc_python_out={out}",
                  "kiln/ingest/v1/ingest.proto"])
check("protoc generates the Python stub", rc == 0, f"exit {rc}")
sys.path.insert(0, out)
import grpc  # noqa: E402
from kiln.ingest.v1 import ingest_pb2 as pb  # noqa: E402
from kiln.ingest.v1 import ingest_pb2_grpc as pb_grpc  # noqa: E402

channel = grpc.insecure_channel(grpc_addr)
stub = pb_grpc.WriteServiceStub(channel)

rows = pb.Rows(rows=[
    pb.Row(table="opcua", tags={"plant": "p1", "tag": f"t{i}"},
           fields=[pb.Field(name="value", float=i * 1.5), pb.Field(name="quality", integer=192)],
           time_unix_nano=1_700_000_000_000_000_000 + i)
    for i in range(10)
])
resp = stub.Write(pb.WriteRequest(batch_id=7, database="py", rows=rows), timeout=30)
check("unary Write with typed rows", resp.batch_id == 7 and resp.rows_written == 10, str(resp))

def stream():
    for b in range(5):
        yield pb.WriteRequest(batch_id=100 + b, database="py",
                              line_protocol=pb.LineProtocol(text=f"opcua,plant=p2,tag=s{b} value={b}.5 {b}",
                                                            precision="s"))
acks = list(stub.WriteStream(stream(), timeout=30))
check("WriteStream acks every batch once durable",
      [a.batch_id for a in acks] == [100, 101, 102, 103, 104] and all(a.durable for a in acks), str(acks))

try:
    stub.Write(pb.WriteRequest(batch_id=8, database="py", line_protocol=pb.LineProtocol(text="opcua value=oops")),
               timeout=30)
    check("bad rows are INVALID_ARGUMENT", False, "no error")
except grpc.RpcError as e:
    check("bad rows are INVALID_ARGUMENT", e.code() == grpc.StatusCode.INVALID_ARGUMENT, str(e))

got = query("py", "SELECT plant, count(*) AS n, sum(value) AS s FROM opcua GROUP BY plant ORDER BY plant")
check("rows written by Python read back over HTTP",
      got == [{"plant": "p1", "n": 10, "s": 67.5}, {"plant": "p2", "n": 5, "s": 12.5}], str(got))

# grpcurl, with no .proto file: server reflection and the health service.
grpcurl = shutil.which("grpcurl")
if grpcurl is None:
    check("grpcurl installed", False, "not on PATH")
else:
    listed = subprocess.run([grpcurl, "-plaintext", grpc_addr.replace("http://", ""), "list"],
                            capture_output=True, text=True)
    check("grpcurl lists services through reflection",
          "kiln.ingest.v1.WriteService" in listed.stdout and "grpc.health.v1.Health" in listed.stdout,
          listed.stdout + listed.stderr)
    health = subprocess.run([grpcurl, "-plaintext", "-d", '{"service": "kiln.ingest.v1.WriteService"}',
                             grpc_addr.replace("http://", ""), "grpc.health.v1.Health/Check"],
                            capture_output=True, text=True)
    check("grpcurl health check says SERVING", "SERVING" in health.stdout, health.stdout + health.stderr)
    wrote = subprocess.run([grpcurl, "-plaintext", "-d",
                            '{"batch_id": 1, "database": "py", "line_protocol": {"text": "curl v=1i 1"}}',
                            grpc_addr.replace("http://", ""), "kiln.ingest.v1.WriteService/Write"],
                           capture_output=True, text=True)
    check("grpcurl writes through reflection", '"rowsWritten": "1"' in wrote.stdout, wrote.stdout + wrote.stderr)

finish("grpc-interop")
