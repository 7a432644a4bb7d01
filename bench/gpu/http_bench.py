#!/usr/bin/env python3
"""Serving figures through the OpenAI HTTP API of a running `r4b serve` (aiohttp, no other deps).

  python3 bench/gpu/http_bench.py --url http://127.0.0.1:8000 --image IMG.png \
      --streams 1 64 256 --prompt-tokens 128 --output-tokens 512 --json OUT.json

* TTFT: one chat request (the image as a data: URL + about 50 text tokens), streamed, idle server:
  time from sending to the first streamed text (content or reasoning), median of 5 (after 1 warm-up),
  and to the first chunk (the role chunk, sent once the first token exists: a random-weight model's
  first tokens may be bytes of an unfinished UTF-8 character, which show as text only later).
  Every request carries a different image (one pixel changed), so no prefix-cache hit helps.
* Throughput: N concurrent streams of /v1/completions, each a distinct prompt of `prompt-tokens`
  byte tokens (the benchmark checkpoint's tokenizer maps one ASCII byte to one token), greedy,
  `ignore_eos`, `max_tokens = output-tokens`; output tokens / wall time of the whole batch.
"""
import argparse
import asyncio
import base64
import json
import random
import statistics
import time

import aiohttp


async def ttft_once(session, url, model, image_b64, text):
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image_b64}"}},
            {"type": "text", "text": text},
        ]}],
    }
    t0 = time.perf_counter()
    first_chunk = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            d = json.loads(line[5:])
            ch = d.get("choices") or []
            if ch and first_chunk is None:
                # The server sends its first chunk (role) once the first token exists.
                first_chunk = time.perf_counter() - t0
            if ch and (ch[0].get("delta", {}).get("content") or ch[0].get("delta", {}).get("reasoning_content")):
                t = time.perf_counter() - t0
                # drain
                async for _ in r.content:
                    pass
                return t, first_chunk
    t = time.perf_counter() - t0
    return t, first_chunk if first_chunk is not None else t


async def one_stream(session, url, model, prompt, out_tokens, sampling=None):
    body = {"model": model, "prompt": prompt, "max_tokens": out_tokens, "temperature": 0,
            "ignore_eos": True, **(sampling or {})}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        d = await r.json()
        return d["usage"]["completion_tokens"]


async def engine_counters(session, url):
    """The coordinator's step counters from `r4b serve`'s /metrics (its coordinator's metrics
    follow the gateway's there): steps, tokens, wall and rank 0's forward time."""
    want = {"r4b_engine_step_duration_seconds_count": "steps", "r4b_engine_batch_tokens_sum": "tokens",
            "r4b_engine_step_duration_seconds_sum": "wall", "r4b_rank_forward_seconds_sum": "forward"}
    out = {v: 0.0 for v in want.values()}
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name == "r4b_rank_forward_seconds_sum" and 'rank="0"' not in line:
                continue
            if name in want:
                out[want[name]] += float(line.rsplit(" ", 1)[1])
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--image", required=True)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=512)
    ap.add_argument("--sampled-streams", type=int, nargs="*", default=[],
                    help="also measure these stream counts with temperature 0.8, top-p 0.9 (seeded)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    timeout = aiohttp.ClientTimeout(total=1800)
    conn = aiohttp.TCPConnector(limit=0)
    res = {}
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as s:
        model = a.model
        if model is None:
            async with s.get(f"{a.url}/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
        from PIL import Image
        import io
        base = Image.open(a.image).convert("RGB")

        def variant(i):
            im = base.copy()
            im.putpixel((i, 0), (i * 37 % 256, 255 - i, 7))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode()

        text = "Describe this picture in detail, please. What is in it, and what colours?"[:50]
        await ttft_once(s, a.url, model, variant(0), text)
        both = [await ttft_once(s, a.url, model, variant(i + 1), text) for i in range(5)]
        ttfts = [t for t, _ in both]
        heads = [h for _, h in both]
        res["ttft_image_ms"] = statistics.median(ttfts) * 1e3
        res["ttft_image_all_ms"] = [t * 1e3 for t in ttfts]
        res["ttft_image_first_chunk_ms"] = statistics.median(heads) * 1e3
        print(f"TTFT (640x480 image + ~50 text tokens, idle), to the first text: median "
              f"{res['ttft_image_ms']:.1f} ms (all: {', '.join(f'{t*1e3:.1f}' for t in ttfts)}); "
              f"to the first chunk (first token out): median {res['ttft_image_first_chunk_ms']:.1f} ms "
              f"(all: {', '.join(f'{t*1e3:.1f}' for t in heads)})", flush=True)
        # Sampling (the GPU sampler): seeded temperature/top-p/top-k with logprobs and
        # penalties must answer, repeat under the same seed, and give finite logprobs. The first
        # request runs cold; the second and third find its first 16 prompt tokens in the prefix
        # cache and compute the other 4 in a smaller chunk, so they must agree with each other
        # exactly; cold vs cached can differ in bf16 rounding (near-flat random logits, so a
        # sampled token may flip), reported but not required.
        samp = {"model": model, "prompt": "The weather today is", "max_tokens": 24,
                "temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 1234, "logprobs": 3,
                "presence_penalty": 0.5, "repetition_penalty": 1.1, "ignore_eos": True}
        outs = []
        for _ in range(3):
            async with s.post(f"{a.url}/v1/completions", json=samp) as r:
                body = await r.json()
                assert r.status == 200, body
                outs.append(body["choices"][0])
        lp = outs[1]["logprobs"]["token_logprobs"]
        ok = (outs[1]["text"] == outs[2]["text"] and len(lp) == 24
              and all(x is not None and x <= 0.0 and x > -1e9 for x in lp))
        res["sampling_check"] = ok
        print(f"sampling check (seeded temperature 0.8, top-p, top-k, penalties, logprobs): "
              f"{'PASS' if ok else 'FAIL'}; same text twice (cached prefix): "
              f"{outs[1]['text'] == outs[2]['text']}; cold run the same too: "
              f"{outs[0]['text'] == outs[1]['text']}; logprobs {[round(x, 2) for x in lp[:6]]}...",
              flush=True)
        rnd = random.Random(0)
        res["throughput"] = []
        runs = [(n, None) for n in a.streams] + [(n, "sampled") for n in a.sampled_streams]
        for n, mode in runs:
            prompts = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(a.prompt_tokens))
                       for _ in range(n)]
            sampling = [{"temperature": 0.8, "top_p": 0.9, "seed": i} if mode else None for i in range(n)]
            c0 = await engine_counters(s, a.url)
            t0 = time.perf_counter()
            toks = await asyncio.gather(*[one_stream(s, a.url, model, p, a.output_tokens, sp)
                                          for p, sp in zip(prompts, sampling)])
            dt = time.perf_counter() - t0
            c1 = await engine_counters(s, a.url)
            row = {"streams": n, "mode": mode or "greedy", "output_tokens": sum(toks), "seconds": dt,
                   "tok_s": sum(toks) / dt, "per_stream_tok_s": sum(toks) / dt / n}
            steps = max(c1["steps"] - c0["steps"], 1)
            row["engine"] = {"steps": steps, "tokens_per_step": (c1["tokens"] - c0["tokens"]) / steps,
                             "wall_ms": (c1["wall"] - c0["wall"]) / steps * 1e3,
                             "forward_ms": (c1["forward"] - c0["forward"]) / steps * 1e3,
                             "outside_steps_s": dt - (c1["wall"] - c0["wall"])}
            res["throughput"].append(row)
            print(f"HTTP {n:>4} streams x {a.output_tokens} tokens, {row['mode']}: {row['tok_s']:.0f} "
                  f"output tok/s ({row['per_stream_tok_s']:.1f} per stream, {dt:.1f} s)", flush=True)
            e = row["engine"]
            print(f"     {e['steps']:.0f} steps, {e['tokens_per_step']:.1f} tokens/step; per step: coordinator wall "
                  f"{e['wall_ms']:.2f} ms, rank-0 forward+sample {e['forward_ms']:.2f} ms, control "
                  f"{e['wall_ms'] - e['forward_ms']:.2f} ms; time outside steps {e['outside_steps_s']:.2f} s",
                  flush=True)
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    asyncio.run(main())
