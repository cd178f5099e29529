"""Send a line-protocol file to an HTTP write endpoint and report rows/s.

An independent client (the Python standard library only): the file is read and cut into
requests of LINES lines before the clock starts, then CONNECTIONS threads, each with one
kept-alive connection, send them in turn. A write counts once its response is a 2xx.

    python3 lp_ingest.py FILE URL [--lines 5000] [--connections 4]

URL is the whole write URL, e.g. http://127.0.0.1:8181/api/v3/write_lp?db=bench or
http://127.0.0.1:8428/write. Prints one line of JSON: rows, seconds, rows_per_s, p50 and
p99 request latency in ms.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("url")
    ap.add_argument("--lines", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=4)
    args = ap.parse_args()

    with open(args.file, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    bodies = [b"".join(lines[i : i + args.lines]) for i in range(0, len(lines), args.lines)]
    rows = len(lines)
    del lines

    url = urllib.parse.urlsplit(args.url)
    target = url.path + ("?" + url.query if url.query else "")
    next_body = iter(range(len(bodies)))
    take = threading.Lock()
    latencies = []
    failures = []

    def worker():
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        while True:
            with take:
                i = next(next_body, None)
            if i is None:
                break
            body = bodies[i]
            while True:
                t0 = time.perf_counter()
                conn.request("POST", target, body=body, headers={"Content-Type": "text/plain"})
                resp = conn.getresponse()
                text = resp.read()
                if resp.status == 429 or resp.status == 503:
                    # Back-pressure: wait as asked and send the same request again.
                    time.sleep(float(resp.getheader("Retry-After", "0.1") or 0.1))
                    continue
                if resp.status // 100 != 2:
                    failures.append(f"{resp.status}: {text[:200]!r}")
                    return
                latencies.append(time.perf_counter() - t0)
                break

    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        print(f"write failed: {failures[0]}", file=sys.stderr)
        sys.exit(1)
    latencies.sort()
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(rows / seconds),
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
