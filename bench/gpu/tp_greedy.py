#!/usr/bin/env python3
"""Greedy outputs of a running `r4b serve` for the TP comparison (issue 14), and their agreement.

  python3 bench/gpu/tp_greedy.py run --url http://127.0.0.1:8000 --ref REF_DIR --json OUT.json
  python3 bench/gpu/tp_greedy.py compare TP1.json TPn.json [...]

`run`: every text prompt of REF_DIR/prompts.json (its token ids, through /v1/completions) and one
chat request with REF_DIR/image_640x480.png, each 64 tokens at temperature 0 with the top-2
log-probabilities of every position (their difference is the top-1 logit margin), plus the decode
speed of each (tokens after the first / time after the first).
`compare`: per prompt, the first position where TPn's tokens leave TP1's, and the first position
where TP1's top-1 margin is below 0.05. They agree as the bar asks when the first divergence is
not before the first low-margin position. Last line: `GREEDY PASS` or `GREEDY FAIL`.
"""
import argparse
import base64
import json
import sys
import threading
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return out, time.perf_counter() - t0


def run(a):
    with urllib.request.urlopen(f"{a.url}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    prompts = json.load(open(f"{a.ref}/prompts.json"))["prompts"]
    results = {}

    def completion(p):
        body = {"model": model, "prompt": p["ids"], "max_tokens": 64, "temperature": 0,
                "logprobs": 2, "ignore_eos": True}
        out, secs = post(f"{a.url}/v1/completions", body)
        lp = out["choices"][0]["logprobs"]
        results[p["name"]] = {
            "tokens": lp["tokens"],
            "top2": [sorted(d.values(), reverse=True)[:2] for d in lp["top_logprobs"]],
            "secs": secs,
        }

    def chat_image():
        png = base64.b64encode(open(f"{a.ref}/image_640x480.png", "rb").read()).decode()
        body = {"model": model, "max_tokens": 64, "temperature": 0, "logprobs": True,
                "top_logprobs": 2, "ignore_eos": True,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                    {"type": "text", "text": "Describe the image."}]}]}
        out, secs = post(f"{a.url}/v1/chat/completions", body)
        content = out["choices"][0]["logprobs"]["content"]
        results["chat_image"] = {
            "tokens": [c["token"] for c in content],
            "top2": [sorted((t["logprob"] for t in c["top_logprobs"]), reverse=True)[:2]
                     for c in content],
            "secs": secs,
        }

    # All at once (one batch of decode steps: ranks sharing a GPU time-slice, so each step is
    # slow at TP = 8); the same requests, sent the same way, at every TP.
    jobs = [threading.Thread(target=completion, args=(p,)) for p in prompts if not p.get("image")]
    jobs.append(threading.Thread(target=chat_image))
    t0 = time.perf_counter()
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    print(f"{len(jobs)} requests together in {time.perf_counter() - t0:.1f} s")
    for name, r in results.items():
        print(f"{name}: {len(r['tokens'])} tokens in {r['secs']:.2f} s "
              f"({len(r['tokens']) / r['secs']:.1f} tok/s end to end)")
    json.dump(results, open(a.json, "w"))


def compare(a):
    base = json.load(open(a.files[0]))
    ok = True
    for f in a.files[1:]:
        other = json.load(open(f))
        for name, r in base.items():
            o = other.get(name)
            if o is None:
                print(f"{f} {name}: missing"); ok = False; continue
            n = min(len(r["tokens"]), len(o["tokens"]))
            div = next((i for i in range(n) if r["tokens"][i] != o["tokens"][i]), None)
            low = next((i for i, t in enumerate(r["top2"])
                        if len(t) == 2 and t[0] - t[1] < 0.05), None)
            fine = div is None or (low is not None and div >= low)
            ok &= fine
            print(f"{f} {name}: first divergence {div if div is not None else 'none'} of {n}, "
                  f"first TP=1 margin < 0.05 at {low if low is not None else 'none'} -> "
                  f"{'ok' if fine else 'EARLY DIVERGENCE'}")
    print("GREEDY PASS" if ok else "GREEDY FAIL")
    sys.exit(0 if ok else 1)


ap = argparse.ArgumentParser()
sub = ap.add_subparsers(dest="cmd", required=True)
r = sub.add_parser("run")
r.add_argument("--url", default="http://127.0.0.1:8000")
r.add_argument("--ref", required=True)
r.add_argument("--json", required=True)
c = sub.add_parser("compare")
c.add_argument("files", nargs="+")
args = ap.parse_args()
run(args) if args.cmd == "run" else compare(args)
