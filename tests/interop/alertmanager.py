"""Kiln's alerts through a real Prometheus Alertmanager (Debian's prometheus-alertmanager).

Alertmanager routes Kiln's alerts to a webhook receiver run here, grouped by alertname; a
silence set in Alertmanager holds; a resolution reaches the receiver.
    usage: alertmanager.py path/to/kiln workdir
"""
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone

kiln, work = sys.argv[1], sys.argv[2]
os.makedirs(work, exist_ok=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


received = []


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=hook.serve_forever, daemon=True).start()
hook_url = f"http://127.0.0.1:{hook.server_address[1]}/alertmanager"

am_port = free_port()
config = os.path.join(work, "alertmanager.yml")
with open(config, "w") as f:
    f.write(f"""
route:
  receiver: hook
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {hook_url}
        send_resolved: true
""")
am = subprocess.Popen(
    ["prometheus-alertmanager", f"--config.file={config}",
     f"--web.listen-address=127.0.0.1:{am_port}",
     f"--storage.path={os.path.join(work, 'am-data')}", "--cluster.listen-address="],
    stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "alertmanager.log"), "w"))
am_url = f"http://127.0.0.1:{am_port}"

server = subprocess.Popen(
    [kiln, "serve", "--data-dir", os.path.join(work, "data"), "--http-bind", "127.0.0.1:0",
     "--grpc-bind", "127.0.0.1:0", "--pg-bind", "127.0.0.1:0",
     "--alertmanager-url", am_url, "--alert-resend-interval", "1s"],
    stdout=subprocess.PIPE, stderr=open(os.path.join(work, "kiln.log"), "w"), text=True)


def request(method, url, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        text = resp.read()
        if resp.headers.get_content_type() == "application/json":
            return json.loads(text)
        return text.decode()


def wait(what, check, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}; the receiver got {json.dumps(received)}")


try:
    http_url = server.stdout.readline().strip().removeprefix("Kiln HTTP listening on ")
    assert http_url.startswith("http://"), http_url

    def am_ready():
        try:
            request("GET", f"{am_url}/-/ready")
            return True
        except OSError:
            return False
    wait("Alertmanager", am_ready)

    now = datetime.now(timezone.utc)
    request("POST", f"{am_url}/api/v2/silences", {
        "matchers": [{"name": "sensor", "value": "s2", "isRegex": False, "isEqual": True}],
        "startsAt": now.isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat(),
        "createdBy": "kiln interop", "comment": "s2 is in maintenance"})

    def write(lines):
        request("POST", f"{http_url}/api/v3/write_lp?db=plant", lines.encode())
    write("temp,line=l1,sensor=s1 celsius=95\ntemp,line=l1,sensor=s2 celsius=96\n")
    request("POST", f"{http_url}/api/v3/alerts/rules", {
        "name": "too-hot", "database": "plant", "every": "1s", "severity": "critical",
        "sql": "SELECT line, sensor, last(celsius, time) AS value FROM temp GROUP BY line, sensor",
        "condition": "> 90", "summary": "{{ $labels.sensor }} at {{ $value }}"})

    # Both alerts reach Alertmanager; the silenced one is suppressed there.
    def both():
        alerts = request("GET", f"{am_url}/api/v2/alerts")
        by_sensor = {a["labels"].get("sensor"): a for a in alerts}
        return by_sensor if {"s1", "s2"} <= by_sensor.keys() else None
    by_sensor = wait("both alerts in Alertmanager", both)
    assert by_sensor["s1"]["status"]["state"] == "active", by_sensor["s1"]
    assert by_sensor["s2"]["status"]["state"] == "suppressed", by_sensor["s2"]
    assert by_sensor["s2"]["status"]["silencedBy"], by_sensor["s2"]
    s1 = by_sensor["s1"]
    assert s1["labels"]["alertname"] == "too-hot" and s1["labels"]["severity"] == "critical", s1
    assert s1["annotations"]["summary"] == "s1 at 95", s1

    # The receiver gets the group (by alertname) with s1 only.
    firing = wait("the firing group", lambda: [m for m in received if m["status"] == "firing"])
    group = firing[0]
    assert group["groupLabels"] == {"alertname": "too-hot"}, group
    sensors = sorted(a["labels"]["sensor"] for a in group["alerts"])
    assert sensors == ["s1"], f"the silence did not hold: {sensors}"

    # Resolution: Kiln sends endsAt; Alertmanager forwards the resolved group.
    write("temp,line=l1,sensor=s1 celsius=20\n")
    def resolved():
        return [a for m in received if m["status"] == "resolved" for a in m["alerts"]
                if a["labels"]["sensor"] == "s1" and a["status"] == "resolved"]
    wait("the resolution of s1", resolved)
    assert not any(a["labels"]["sensor"] == "s2" for m in received for a in m["alerts"]), received
    print("alertmanager: OK (grouped, silenced, resolved)")
finally:
    server.terminate()
    server.wait(timeout=30)
    am.terminate()
    am.wait(timeout=30)
