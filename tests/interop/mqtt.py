"""MQTT ingest with publishers outside Rust, through Debian's Mosquitto broker:

* paho-mqtt publishes line protocol at QoS 1 while Kiln is `kill -9`ed and restarted:
  every message must be queryable exactly once afterwards;
* pysparkplug (an independent Sparkplug B implementation) plays an edge node with a
  device: births, aliased data, a device death and rebirth, an alias no birth defined
  (Kiln must ask for a rebirth with an NCMD that pysparkplug decodes), the rebirth, and
  the node's death; the data and status tables are checked in SQL.

Both sources come from one `--mqtt-config` file.

usage: mqtt.py KILN
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import paho.mqtt.client as paho
import pysparkplug as psp

from checks import check, finish

KILN = sys.argv[1]
TOTAL = 3000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, what):
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class Kiln:
    def __init__(self, data, config):
        self.log = open(data + ".log", "a")
        self.proc = subprocess.Popen(
            [KILN, "serve", "--data-dir", data, "--http-bind", "127.0.0.1:0",
             "--grpc-bind", "127.0.0.1:0", "--pg-bind", "127.0.0.1:0",
             "--mqtt-config", config],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        first = self.proc.stdout.readline().strip()
        prefix = "Kiln HTTP listening on "
        if not first.startswith(prefix):
            raise RuntimeError(f"kiln did not start: {first!r}; see {data}.log")
        self.http = first[len(prefix):]

    def get(self, path):
        with urllib.request.urlopen(self.http + path, timeout=30) as r:
            return json.loads(r.read())

    def query(self, sql):
        try:
            return self.get("/api/v3/query_sql?" + urllib.parse.urlencode({"db": "plant", "q": sql}))
        except urllib.error.HTTPError:
            return []

    def count(self, table):
        rows = self.query(f"SELECT count(*) AS n FROM {table}")
        return rows[0]["n"] if rows else 0

    def sources(self):
        return {s["client_id"]: s for s in self.get("/api/v3/mqtt")["sources"]}

    def wait_connected(self):
        until(lambda: all(s["connected"] for s in self.sources().values()), "sources connected")

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def until(predicate, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def without_nulls(rows):
    """Rows as Kiln's JSON has them: a null column is left out of its row."""
    return [{k: v for k, v in r.items() if v is not None} for r in rows]


def paho_client(name):
    try:
        return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name)
    except AttributeError:  # paho-mqtt 1.x
        return paho.Client(client_id=name)


def publish_lines(port, stop_at):
    """QoS 1 publishes of one reading each (its own time), paced; waits for every PUBACK."""
    client = paho_client("paho-publisher")
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    for i in range(stop_at):
        line = f"reading,machine=m{i % 5} seq={i}i {1_700_000_000_000 + i}"
        infos.append(client.publish(f"lines/north/m{i % 5}", line, qos=1))
        if i % 100 == 99:
            time.sleep(0.03)
    for info in infos:
        info.wait_for_publish(timeout=60)
    ok = all(info.is_published() for info in infos)
    client.loop_stop()
    client.disconnect()
    return ok


def kill9_while_publishing(work, port, config):
    data = os.path.join(work, "kiln")
    kiln = Kiln(data, config)
    kiln.wait_connected()
    result = {}
    publisher = threading.Thread(target=lambda: result.update(ok=publish_lines(port, TOTAL)))
    publisher.start()
    for target in (800, 2000):
        until(lambda: kiln.count("reading") >= target, f"{target} rows")
        kiln.kill9()
        time.sleep(0.3)
        kiln = Kiln(data, config)
    publisher.join()
    check("paho: every QoS 1 publish acknowledged by the broker", result.get("ok"))
    until(lambda: kiln.count("reading") >= TOTAL, "every reading", timeout=60)
    time.sleep(0.5)
    r = kiln.query("SELECT count(*) AS n, count(DISTINCT seq) AS d, sum(seq) AS s FROM reading")[0]
    check("paho: every message queryable exactly once after two kill -9",
          r == {"n": TOTAL, "d": TOTAL, "s": TOTAL * (TOTAL - 1) // 2}, r)
    return kiln


def sparkplug(kiln, port, restart):
    commands = []
    got_command = threading.Event()
    host = psp.Client(client_id="test-scada")

    def on_ncmd(_client, message):
        commands.append(message)
        got_command.set()

    host.subscribe(psp.Topic(message_type=psp.MessageType.NCMD, group_id="plant", edge_node_id="gw1"),
                   psp.QoS.AT_LEAST_ONCE, on_ncmd)
    host.connect("127.0.0.1", port=port, blocking=False)
    node = psp.Client(client_id="gw1")
    node.connect("127.0.0.1", port=port, blocking=False)
    time.sleep(0.5)

    base = 1_700_000_000_000
    I64, F64, I32, BOOL, STR = (psp.DataType.INT64, psp.DataType.DOUBLE, psp.DataType.INT32,
                                psp.DataType.BOOLEAN, psp.DataType.STRING)
    sent = []

    def send(kind, payload, device=None):
        topic = psp.Topic(message_type=kind, group_id="plant", edge_node_id="gw1", device_id=device)
        node.publish(psp.Message(topic=topic, payload=payload, qos=psp.QoS.AT_LEAST_ONCE, retain=False),
                     include_dtypes=True)
        sent.append(kind)
        time.sleep(0.05)

    def m(name, datatype, value, alias=None, at=None):
        return psp.Metric(timestamp=at, name=name, datatype=datatype, value=value, alias=alias)

    def births(bd_seq, at, temp):
        send(psp.MessageType.NBIRTH, psp.NBirth(timestamp=at, seq=0, metrics=(
            m("bdSeq", I64, bd_seq), m("Node Control/Rebirth", BOOL, False, alias=0),
            m("uptime", I64, 1, alias=1))))
        send(psp.MessageType.DBIRTH, psp.DBirth(timestamp=at + 1, seq=1, metrics=(
            m("temp", F64, temp, alias=10), m("rpm", I32, 1450, alias=11),
            m("label", STR, "ok", alias=12))), "press4")

    births(0, base, 20.5)
    # Aliased data: names left out, as edge nodes send it.
    send(psp.MessageType.DDATA, psp.DData(timestamp=base + 2, seq=2, metrics=(
        m(None, F64, 21.5, alias=10), m(None, I32, -3, alias=11))), "press4")
    send(psp.MessageType.NDATA, psp.NData(timestamp=base + 3, seq=3, metrics=(m(None, I64, 5, alias=1),)))
    send(psp.MessageType.DDEATH, psp.DDeath(timestamp=base + 4, seq=4), "press4")
    send(psp.MessageType.DBIRTH, psp.DBirth(timestamp=base + 5, seq=5, metrics=(
        m("temp", F64, 22.0, alias=10), m("rpm", I32, 1460, alias=11),
        m("label", STR, "back", alias=12))), "press4")
    # An alias no birth defined: refused, and Kiln asks the node for a rebirth.
    send(psp.MessageType.DDATA, psp.DData(timestamp=base + 6, seq=6, metrics=(m(None, F64, 99.0, alias=99),)),
         "press4")
    check("sparkplug: an unknown alias makes Kiln send an NCMD", got_command.wait(10))
    rebirth = commands[0].payload.metrics if commands else ()
    check("sparkplug: the NCMD is Node Control/Rebirth = true (decoded by pysparkplug)",
          [(x.name, x.value) for x in rebirth] == [("Node Control/Rebirth", True)],
          [(x.name, x.value) for x in rebirth])
    births(1, base + 10, 23.0)
    send(psp.MessageType.DDATA, psp.DData(timestamp=base + 12, seq=2, metrics=(m(None, F64, 24.5, alias=10),)),
         "press4")
    until(lambda: kiln.sources()["kiln-sparkplug"]["messages"] >= len(sent), "every Sparkplug message")
    s = kiln.sources()["kiln-sparkplug"]
    check("sparkplug: one message refused, one rebirth requested",
          (s["rejected"], s["rebirth_requests"]) == (1, 1), s)

    # Kiln keeps the births on disk: after kill -9, aliased data is written without a rebirth.
    kiln = restart()
    kiln.wait_connected()
    sent.clear()
    send(psp.MessageType.DDATA, psp.DData(timestamp=base + 13, seq=3, metrics=(m(None, F64, 25.0, alias=10),)),
         "press4")
    send(psp.MessageType.NDEATH, psp.NDeath(timestamp=base + 14, bd_seq_metric=m("bdSeq", I64, 1)))
    until(lambda: kiln.sources()["kiln-sparkplug"]["messages"] >= len(sent), "the messages after the restart")
    s = kiln.sources()["kiln-sparkplug"]
    check("sparkplug: after kill -9 the births still resolve aliases (nothing refused, no rebirth)",
          (s["rejected"], s["rebirth_requests"]) == (0, 0), s)
    rows = kiln.query("SELECT device, temp, rpm, label, uptime FROM sparkplug ORDER BY time")
    want = [
        {"device": None, "temp": None, "rpm": None, "label": None, "uptime": 1},
        {"device": "press4", "temp": 20.5, "rpm": 1450, "label": "ok", "uptime": None},
        {"device": "press4", "temp": 21.5, "rpm": -3, "label": None, "uptime": None},
        {"device": None, "temp": None, "rpm": None, "label": None, "uptime": 5},
        {"device": "press4", "temp": 22.0, "rpm": 1460, "label": "back", "uptime": None},
        {"device": None, "temp": None, "rpm": None, "label": None, "uptime": 1},
        {"device": "press4", "temp": 23.0, "rpm": 1450, "label": "ok", "uptime": None},
        {"device": "press4", "temp": 24.5, "rpm": None, "label": None, "uptime": None},
        {"device": "press4", "temp": 25.0, "rpm": None, "label": None, "uptime": None},
    ]
    check("sparkplug: births and aliased data as rows, tags group/edge_node/device",
          rows == without_nulls(want), rows)
    status = kiln.query("SELECT edge_node, device, online, bd_seq FROM sparkplug_status ORDER BY time, device")
    check("sparkplug: births and deaths in the status table", status == without_nulls([
        {"edge_node": "gw1", "device": None, "online": True, "bd_seq": 0},
        {"edge_node": "gw1", "device": "press4", "online": True, "bd_seq": None},
        {"edge_node": "gw1", "device": "press4", "online": False, "bd_seq": None},
        {"edge_node": "gw1", "device": "press4", "online": True, "bd_seq": None},
        {"edge_node": "gw1", "device": None, "online": True, "bd_seq": 1},
        {"edge_node": "gw1", "device": "press4", "online": True, "bd_seq": None},
        # One time, and nulls sort last.
        {"edge_node": "gw1", "device": "press4", "online": False, "bd_seq": None},
        {"edge_node": "gw1", "device": None, "online": False, "bd_seq": 1},
    ]), status)
    inventory = kiln.query("SELECT tag, value, sparkplug_online FROM system.devices ORDER BY tag")
    check("sparkplug: the node's death takes node and device offline in system.devices", inventory == [
        {"tag": "device", "value": "press4", "sparkplug_online": "false"},
        {"tag": "edge_node", "value": "gw1", "sparkplug_online": "false"},
    ], inventory)
    node.disconnect()
    host.disconnect()
    return kiln


def main():
    work = tempfile.mkdtemp(prefix="kiln-mqtt-")
    port = free_port()
    conf = os.path.join(work, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"allow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
                f"listener {port} 127.0.0.1\n")
    broker = subprocess.Popen(["/usr/sbin/mosquitto", "-c", conf],
                              stdout=subprocess.DEVNULL, stderr=open(conf + ".log", "w"))
    kiln = None
    try:
        wait_port(port, "mosquitto")
        config = os.path.join(work, "mqtt.toml")
        with open(config, "w") as f:
            f.write(f"""
[[mqtt]]
broker = "mqtt://127.0.0.1:{port}"
topics = ["lines/#"]
database = "plant"
client_id = "kiln-lines"
topic_template = "lines/{{site}}/+"

[[mqtt]]
broker = "mqtt://127.0.0.1:{port}"
topics = ["spBv1.0/plant/#"]
database = "plant"
client_id = "kiln-sparkplug"
format = "sparkplug_b"
protocol = "5"
""")
        kiln = kill9_while_publishing(work, port, config)
        sites = kiln.query("SELECT DISTINCT site FROM reading")
        check("paho: the topic template's {site} level is a tag", sites == [{"site": "north"}], sites)
        kiln.wait_connected()

        def restart():
            kiln.kill9()
            return Kiln(os.path.join(work, "kiln"), config)

        kiln = sparkplug(kiln, port, restart)
    finally:
        if kiln is not None:
            kiln.stop()
        broker.kill()
        broker.wait()
        shutil.rmtree(work, ignore_errors=True)
    finish("mqtt")


if __name__ == "__main__":
    main()
