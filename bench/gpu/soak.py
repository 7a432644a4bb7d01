#!/usr/bin/env python3
"""Overload soak through the HTTP API of a running `r4b serve` (aiohttp, no other deps).

  python3 bench/gpu/soak.py --url http://127.0.0.1:8000 --capacity 20 --secs 30 --json OUT.json

The server runs with `--max-num-seqs S --max-queue Q` and `--capacity S+Q`. Three phases, each a
closed loop of clients sending streamed 64-token greedy chat requests back to back; a client
that gets a 429 waits for its `Retry-After` first (as the OpenAI SDKs do):
  1. unloaded: 1 client;
  2. at capacity: S+Q clients;
  3. overload: 10 x (S+Q) clients.
Prints, per phase, requests, admitted, refused (429), any other status, and the admitted
latency p50 / p99 (send to `[DONE]`). Exit 1 if anything but 200 and 429 came back.
"""
import argparse
import asyncio
import json
import time

import aiohttp


async def one(session, url, body):
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            retry = r.headers.get("retry-after")
            return r.status, time.perf_counter() - t0, float(retry) if retry else None
        async for line in r.content:
            if line.strip() == b"data: [DONE]":
                break
        return 200, time.perf_counter() - t0, None


async def closed_loop(url, clients, secs, out_tokens):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": out_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    until = time.perf_counter() + secs
    results = []

    async def client(session):
        while time.perf_counter() < until:
            status, took, retry = await one(session, url, body)
            results.append((status, took))
            if status == 429:
                await asyncio.sleep(min(retry or 1.0, max(0.0, until - time.perf_counter())))

    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return results


def summary(name, clients, results):
    ok = sorted(t for s, t in results if s == 200)
    refused = sum(1 for s, _ in results if s == 429)
    other = sorted({s for s, _ in results if s not in (200, 429)})
    pct = lambda p: ok[(len(ok) - 1) * p // 100] * 1e3 if ok else float("nan")
    row = {"phase": name, "clients": clients, "requests": len(results), "admitted": len(ok),
           "refused": refused, "other_statuses": other, "p50_ms": pct(50), "p99_ms": pct(99)}
    print(f"{name:>12}: {clients:4d} clients, {len(results):5d} requests, {len(ok):5d} admitted, "
          f"{refused:5d} refused (429), other {other}; admitted latency p50 {row['p50_ms']:.1f} ms "
          f"p99 {row['p99_ms']:.1f} ms")
    return row


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--capacity", type=int, required=True, help="max-num-seqs + max-queue")
    ap.add_argument("--secs", type=float, default=30)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    rows.append(summary("unloaded", 1, await closed_loop(a.url, 1, min(a.secs, 10), a.output_tokens)))
    rows.append(summary("at capacity", a.capacity,
                        await closed_loop(a.url, a.capacity, a.secs / 2, a.output_tokens)))
    rows.append(summary("10x overload", 10 * a.capacity,
                        await closed_loop(a.url, 10 * a.capacity, a.secs, a.output_tokens)))
    un, over = rows[0], rows[2]
    print(f"admitted p99 under 10x overload / unloaded p99: {over['p99_ms'] / un['p99_ms']:.2f}x; "
          f"/ p99 at capacity: {over['p99_ms'] / rows[1]['p99_ms']:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = any(r["other_statuses"] for r in rows)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    asyncio.run(main())
