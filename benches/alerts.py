"""Alert rules under ingest load (benches/RESULTS.md, "Alerting"): TSBS cpu-only ingest
rate with no rules, with RULES rules over SCALE series evaluated every EVERY (default
settings: the rules read the table's default last-value cache), and with the same rules
over a cache keyed by hostname alone, created by hand; and, while ingest runs, the delay
from a crossing row's write to its webhook.

    usage: alerts.py KILN KILN_BENCH   (env: RUNS SCALE DURATION REPEAT RULES EVERY)
"""
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

KILN, BENCH = sys.argv[1], sys.argv[2]
RUNS = int(os.environ.get("RUNS", "3"))
SCALE = int(os.environ.get("SCALE", "10000"))
DURATION = os.environ.get("DURATION", "2h")
REPEAT = int(os.environ.get("REPEAT", "6"))
RULES = int(os.environ.get("RULES", "1000"))
EVERY = os.environ.get("EVERY", "10s")

received = {}  # (sensor, status) -> wall time of the first webhook
lock = threading.Lock()


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with lock:
            received.setdefault((body["labels"].get("sensor"), body["status"]), time.time())
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
threading.Thread(target=hook.serve_forever, daemon=True).start()
HOOK = f"http://127.0.0.1:{hook.server_address[1]}/hook"


def request(method, url, body=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read()
        return json.loads(text) if text and resp.headers.get_content_type() == "application/json" else None


def ingest(url, seed, duration):
    out = subprocess.run([BENCH, "ingest", "--url", url, "--scale", str(SCALE), "--duration",
                          duration, "--seed", str(seed)], capture_output=True, text=True, check=True)
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return int(fields["rows"]), float(fields["elapsed"].rstrip("s"))


def probe(url, stop, delays):
    """A new sensor crosses the probe rule's threshold every second (so crossings fall at
    every phase of the rule's interval); each one's delay is from its write to its firing
    webhook."""
    written = {}
    n = 0
    while not stop.is_set():
        n += 1
        sensor = f"s{n}"
        written[sensor] = time.time()
        request("POST", f"{url}/api/v3/write_lp?db=benchmark", f"probe,sensor={sensor} v=1".encode())
        stop.wait(1.0)
    # Crossings written in the last interval get their evaluation too.
    deadline = time.time() + 30
    while time.time() < deadline and any((s, "firing") not in received for s in written):
        time.sleep(0.1)
    with lock:
        delays.extend(received[(s, "firing")] - t for s, t in written.items()
                      if (s, "firing") in received)


def run(mode, work):
    data = os.path.join(work, mode)
    with lock:
        received.clear()
    server = subprocess.Popen(
        [KILN, "serve", "--data-dir", data, "--http-bind", "127.0.0.1:0", "--grpc-bind",
         "127.0.0.1:0", "--pg-bind", "127.0.0.1:0", "--alert-webhook-url", HOOK],
        stdout=subprocess.PIPE, stderr=open(data + ".log", "w"), text=True)
    try:
        url = server.stdout.readline().strip().removeprefix("Kiln HTTP listening on ")
        ingest(url, 1, "10s")  # every host's series exists
        request("POST", f"{url}/api/v3/write_lp?db=benchmark", b"probe,sensor=s0 v=0")
        delays, stop = [], threading.Event()
        prober = None
        if mode != "none":
            if mode == "rules+cache":
                request("POST", f"{url}/api/v3/configure/last_cache",
                        {"db": "benchmark", "table": "cpu", "key_columns": ["hostname"]})
            per_rule = max(1, SCALE // RULES)
            for i in range(RULES):
                hosts = ", ".join(f"'host_{h}'" for h in range(i * per_rule, (i + 1) * per_rule))
                request("POST", f"{url}/api/v3/alerts/rules", {
                    "name": f"cpu-{i}", "database": "benchmark", "every": EVERY,
                    "sql": "SELECT DISTINCT ON (hostname) hostname, usage_user AS value FROM cpu "
                           f"WHERE hostname IN ({hosts}) ORDER BY hostname, time DESC",
                    "condition": "> 100"})
            request("POST", f"{url}/api/v3/alerts/rules", {
                "name": "probe", "database": "benchmark", "every": EVERY,
                "sql": "SELECT sensor, last(v, time) AS value FROM probe GROUP BY sensor",
                "condition": "> 0.5"})
            prober = threading.Thread(target=probe, args=(url, stop, delays))
            prober.start()
        rows = seconds = 0
        repeats = []
        for r in range(REPEAT):
            n, s = ingest(url, 100 + r, DURATION)
            rows, seconds = rows + n, seconds + s
            repeats.append(n / s)
        stop.set()
        if prober:
            prober.join()
        evaluations = 0
        if mode != "none":
            (status, body) = (None, request("GET", f"{url}/api/v3/alerts/rules"))
            evaluations = sum(1 for r in body if r["last_evaluated_at"])
        return rows / seconds, delays, evaluations, repeats
    finally:
        server.terminate()
        server.wait(timeout=120)
        shutil.rmtree(data, ignore_errors=True)


def p99(v):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))] if v else float("nan")


work = tempfile.mkdtemp(prefix="kiln-alerts-")
modes = ["none", "rules", "rules+cache"]
rates = {m: [] for m in modes}
delays = {m: [] for m in modes}
try:
    for i in range(RUNS):
        for mode in (modes if i % 2 == 0 else list(reversed(modes))):
            rate, d, evaluated, repeats = run(mode, work)
            rates[mode].append(rate)
            delays[mode].extend(d)
            print(f"run {i + 1} {mode}: {rate:,.0f} rows/s, {len(d)} crossings"
                  + (f", median delay {statistics.median(d):.2f} s, max {max(d):.2f} s" if d else "")
                  + (f", {evaluated} rules evaluated" if mode != "none" else "")
                  + " (each ingest: " + " ".join(f"{r / 1000:.0f}k" for r in repeats) + ")",
                  flush=True)
finally:
    shutil.rmtree(work, ignore_errors=True)

base = statistics.median(rates["none"])
print(f"\nscale {SCALE} series, {RULES} rules every {EVERY}, {RUNS} runs of {REPEAT} x {DURATION}")
print("| | rows/s (median) | vs no rules | crossing → webhook, median | p99 |")
print("|---|---:|---:|---:|---:|")
for m in modes:
    r = statistics.median(rates[m])
    d = delays[m]
    med = f"{statistics.median(d):.2f} s" if d else "-"
    print(f"| {m} | {r:,.0f} | {r / base:.2f}x | {med} | {p99(d):.2f} s |" if d else
          f"| {m} | {r:,.0f} | {r / base:.2f}x | - | - |")
