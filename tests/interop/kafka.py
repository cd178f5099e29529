"""Kafka ingest with producers outside Rust, against a Kafka-protocol broker:

* librdkafka's mock cluster (started by `kiln-bench mock-kafka`), produced to with Debian's
  `kcat`, dead letters read back with `kcat`;
* the `tansu` broker (built from crates.io) when its binary is given, produced to and read
  with confluent-kafka (kcat 1.7's handshake fails against tansu), one message per record
  batch (tansu 0.6.0 serves a fetch that starts inside a batch wrongly).

Each: messages produced, Kiln started on the topic, `kill -9` once mid-consumption,
restarted; every message's row must be there exactly once, and the poison message must be
in the dead-letter topic with its error.

usage: kafka.py KILN KILN_BENCH [TANSU]
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from checks import check, finish

KILN, BENCH = sys.argv[1], sys.argv[2]
TANSU = sys.argv[3] if len(sys.argv) > 3 else None
TOTAL = 6000
PARTITIONS = 3


def lines(ids):
    # No timestamp: rows get the time Kiln reads them, so a duplicate would be a second row.
    return [f"reading,id={i} v={i}i" for i in ids]


class Kiln:
    def __init__(self, data, bootstrap, topic):
        self.log = open(data + ".log", "a")
        self.proc = subprocess.Popen(
            [KILN, "serve", "--data-dir", data, "--http-bind", "127.0.0.1:0",
             "--grpc-bind", "127.0.0.1:0", "--pg-bind", "127.0.0.1:0",
             "--kafka-brokers", bootstrap, "--kafka-topics", topic,
             "--kafka-database", "plant", "--kafka-default-time", "ingest",
             "--kafka-batch-messages", "50",
             "--kafka-option", "session.timeout.ms=6000",
             "--kafka-option", "heartbeat.interval.ms=500"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        first = self.proc.stdout.readline().strip()
        prefix = "Kiln HTTP listening on "
        if not first.startswith(prefix):
            raise RuntimeError(f"kiln did not start: {first!r}; see {data}.log")
        self.http = first[len(prefix):]

    def query(self, sql):
        url = self.http + "/api/v3/query_sql?" + urllib.parse.urlencode({"db": "plant", "q": sql})
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            return []

    def count(self):
        rows = self.query("SELECT count(*) AS n FROM reading")
        return rows[0]["n"] if rows else 0

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def wait_for(pred, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def scenario(label, bootstrap, topic, produce, dead_letters):
    """Produce, consume with a kill -9 in the middle, check exactly once and the dead letter."""
    work = tempfile.mkdtemp()
    try:
        produce(topic, {p: lines(range(p, TOTAL, PARTITIONS)) for p in range(PARTITIONS)})
        produce(topic, {1: ["reading,id=poison v=not-a-number"]})
        data = os.path.join(work, "kiln")
        kiln = Kiln(data, bootstrap, topic)
        started = wait_for(lambda: kiln.count() >= TOTAL // 4, 90)
        check(f"{label}: consumption started", started, f"{kiln.count()} rows")
        kiln.kill9()
        kiln = Kiln(data, bootstrap, topic)
        done = wait_for(lambda: kiln.count() >= TOTAL, 120)
        time.sleep(0.5)
        n = kiln.count()
        check(f"{label}: every message written after kill -9", done and n >= TOTAL, f"{n} of {TOTAL}")
        dup = kiln.query("SELECT id, count(*) AS n FROM reading GROUP BY id HAVING count(*) > 1 LIMIT 5")
        distinct = kiln.query("SELECT count(DISTINCT id) AS n FROM reading")
        missing = []
        if distinct[0]["n"] != TOTAL:
            have = {r["id"] for r in kiln.query("SELECT DISTINCT id FROM reading")}
            missing = [(i, i % PARTITIONS) for i in range(TOTAL) if str(i) not in have][:5]
        check(f"{label}: exactly once", n == TOTAL and not dup and distinct[0]["n"] == TOTAL,
              f"count {n}, duplicates {dup}, distinct {distinct}, missing (id, partition) {missing}")
        errors = []
        wait_for(lambda: errors.extend(dead_letters()) or errors, 30)
        log = [l for l in open(data + ".log", errors="replace") if "dead-letter" in l]
        check(f"{label}: poison message dead-lettered with its error",
              any("invalid value" in e for e in errors), f"{errors}; server log: {log[-3:]}")
        kiln.stop()
    finally:
        if os.environ.get("KILN_INTEROP_KEEP"):
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --- librdkafka's mock cluster, with kcat -----------------------------------------------

mock = subprocess.Popen([BENCH, "mock-kafka", "--topic", "telemetry:3", "--topic", "kiln.dead-letter:3"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
mock_bootstrap = mock.stdout.readline().strip().removeprefix("bootstrap=")


def kcat_produce(topic, by_partition):
    for p, msgs in by_partition.items():
        subprocess.run(["kcat", "-P", "-b", mock_bootstrap, "-t", topic, "-p", str(p)],
                       input="\n".join(msgs) + "\n", text=True, check=True)


def kcat_dead_letters():
    out = subprocess.run(["kcat", "-C", "-b", mock_bootstrap, "-t", "kiln.dead-letter", "-e", "-q",
                          "-f", "%h\n"], capture_output=True, text=True, timeout=60)
    return [l for l in out.stdout.splitlines() if l]


try:
    scenario("mock cluster + kcat", mock_bootstrap, "telemetry", kcat_produce, kcat_dead_letters)
finally:
    mock.stdin.close()
    mock.wait(timeout=30)

# --- tansu, with confluent-kafka ---------------------------------------------------------

if TANSU:
    from confluent_kafka import Consumer, Producer, TopicPartition

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    tansu_log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
    broker = subprocess.Popen([TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
                               "--storage-engine", "memory://tansu/"],
                              stdout=tansu_log, stderr=subprocess.STDOUT)
    try:
        up = wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 30)
        check("tansu broker started", up, tansu_log.name)
        for t in ("telemetry", "kiln.dead-letter"):
            subprocess.run([TANSU, "topic", "create", "--broker", url, "--partitions", str(PARTITIONS), t],
                           check=True, capture_output=True, timeout=60)
        bootstrap = f"127.0.0.1:{port}"

        def py_produce(topic, by_partition):
            # One message per record batch: tansu 0.6.0 answers a fetch that starts inside a
            # batch of several records with the partition's last record, over and over (a
            # restarted consumer resumes wherever it stopped). Kafka serves such fetches.
            p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "batch.num.messages": 1})
            failed = []

            def delivered(err, msg):
                if err is not None:
                    failed.append(f"{msg.partition()}: {err}")

            for part, msgs in by_partition.items():
                for m in msgs:
                    while True:
                        try:
                            p.produce(topic, m.encode(), partition=part, on_delivery=delivered)
                            break
                        except BufferError:
                            p.poll(0.05)
                p.poll(0)
            left = p.flush(60)
            if left or failed:
                raise RuntimeError(f"{left} messages not delivered to tansu; failed: {failed[:5]}")

        def py_dead_letters():
            c = Consumer({"bootstrap.servers": bootstrap, "group.id": "dlq-reader",
                          "enable.auto.commit": False})
            c.assign([TopicPartition("kiln.dead-letter", p, 0) for p in range(PARTITIONS)])
            errors, deadline = [], time.time() + 20
            while time.time() < deadline and not errors:
                m = c.poll(0.5)
                if m is not None and not m.error():
                    errors += [v.decode() for k, v in (m.headers() or []) if k == "kiln.error"]
            c.close()
            return errors

        scenario("tansu + confluent-kafka", bootstrap, "telemetry", py_produce, py_dead_letters)
    finally:
        broker.terminate()
        broker.wait(timeout=30)

finish("kafka-interop")
