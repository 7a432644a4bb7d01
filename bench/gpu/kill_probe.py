#!/usr/bin/env python3
"""kill -9 of one rank under load, seen from the clients (issue 14's rank-failure line).

  python3 bench/gpu/kill_probe.py --url http://127.0.0.1:8101 --rank 1 [--streams 4]

Starts `--streams` streamed greedy chat requests (long outputs), waits until each has streamed
tokens, then kill -9s the worker of `--rank` (its pid from /health) and reports, per stream, how
many seconds after the kill it ended and how (an error event, `[DONE]`, or a broken
connection); then how long until /health says serving again, and whether a new request then
succeeds. Exit 1 if a stream did not end within 5 s or the new request failed.
"""
import argparse
import json
import os
import signal
import threading
import time
import urllib.request


def health(url):
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return json.loads(r.read())["replicas"][0]


def stream(url, model, out, i):
    body = {"model": model, "stream": True, "max_tokens": 4000, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Count from {i} onwards, one number per line."}]}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    out[i] = {"tokens": 0, "end": None, "how": None}
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    out[i]["how"] = out[i]["how"] or "[DONE]"
                    break
                ev = json.loads(data)
                if "error" in ev:
                    out[i]["how"] = f"error event: {ev['error'].get('message', '')[:120]}"
                    continue
                out[i]["tokens"] += 1
    except Exception as e:  # a broken connection counts as an ending, reported as such
        out[i]["how"] = f"connection: {e}"[:140]
    out[i]["end"] = time.time()


ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8101")
ap.add_argument("--rank", type=int, default=1)
ap.add_argument("--streams", type=int, default=4)
a = ap.parse_args()
pids = health(a.url)["worker_pids"]
with urllib.request.urlopen(f"{a.url}/v1/models", timeout=30) as r:
    model = json.loads(r.read())["data"][0]["id"]
out = {}
threads = [threading.Thread(target=stream, args=(a.url, model, out, i)) for i in range(a.streams)]
for t in threads:
    t.start()
deadline = time.time() + 120
while time.time() < deadline and not all(out.get(i, {}).get("tokens", 0) >= 5 for i in range(a.streams)):
    if any(out.get(i, {}).get("end") for i in range(a.streams)):
        raise SystemExit(f"a stream ended before the kill: {out}")
    time.sleep(0.05)
print(f"{a.streams} streams running ({[out[i]['tokens'] for i in range(a.streams)]} tokens); "
      f"kill -9 of rank {a.rank} (pid {pids[a.rank]}) of {pids}")
t0 = time.time()
os.kill(pids[a.rank], signal.SIGKILL)
for t in threads:
    t.join(timeout=30)
ok = True
for i in range(a.streams):
    end = out[i]["end"]
    secs = None if end is None else end - t0
    ok &= secs is not None and secs <= 5.0
    print(f"stream {i}: {out[i]['tokens']} tokens, ended {secs if secs is None else round(secs, 2)} s "
          f"after the kill: {out[i]['how']}")
while time.time() - t0 < 120:
    try:
        h = health(a.url)
        if h["state"] == "serving" and h["restarts"] >= 1:
            break
    except Exception:
        pass
    time.sleep(0.1)
print(f"serving again {time.time() - t0:.2f} s after the kill (restarts {h['restarts']}, "
      f"new pids {h['worker_pids']})")
for p in pids:
    try:
        os.kill(p, 0)
        st = open(f"/proc/{p}/stat").read().split()[2]
        print(f"old pid {p}: still present, state {st}")
    except ProcessLookupError:
        print(f"old pid {p}: gone")
body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
req = urllib.request.Request(f"{a.url}/v1/chat/completions", data=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print(f"a new request after the restart: HTTP {r.status}")
except Exception as e:
    ok = False
    print(f"a new request after the restart failed: {e}")
print("KILL PASS" if ok else "KILL FAIL")
raise SystemExit(0 if ok else 1)
