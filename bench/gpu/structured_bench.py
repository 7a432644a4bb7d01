#!/usr/bin/env python3
"""Structured output's cost through the OpenAI HTTP API of a running `r4b serve` (aiohttp).

  python3 bench/gpu/structured_bench.py --url http://127.0.0.1:8000 --streams 64 \
      --output-tokens 256 --json OUT.json

N concurrent /v1/completions streams, each a distinct prompt, greedy, `ignore_eos`,
`max_tokens = output-tokens`, once unconstrained and once with a `json_schema` response_format
each (an object holding one long array of short strings, minItems far above what fits: the
grammar stays active for every token, never reaching its end where only EOS is allowed). Prints
output tok/s of both runs (output tokens / wall time of the whole batch), the ratio, and the
coordinator's mean step wall time from /metrics; checks that every constrained output is a
prefix of valid JSON for the schema (starts with `{"items":[`). First, correctness checks of
every masked GPU sampling path in one batch (`checks`): greedy and sampled json_schema outputs
that must parse and match the schema, logprobs with a regex (the host-sampler path), free rows.
"""
import argparse
import asyncio
import json
import time

import aiohttp

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                             "minItems": 100000}},
    "required": ["items"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


async def one(session, url, model, prompt, n_out, constrained):
    body = {"model": model, "prompt": prompt, "max_tokens": n_out, "temperature": 0, "ignore_eos": True}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "strict": True, "schema": SCHEMA}}
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        d = await r.json()
        return d["usage"]["completion_tokens"], d["choices"][0]["text"]


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "kind"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


def person_ok(text):
    """The PERSON schema checked by hand (no jsonschema on the GPU machine)."""
    try:
        d = json.loads(text)
    except ValueError:
        return False
    return (isinstance(d, dict) and set(d) == {"name", "age", "kind"} and isinstance(d["name"], str)
            and len(d["name"]) <= 8 and isinstance(d["age"], int) and 0 <= d["age"] <= 150
            and d["kind"] in ("cat", "dog"))


async def checks(session, url, model):
    """Every GPU sampling path with a mask: greedy (arg-max after the mask kernel), sampled (the
    GPU sampler over masked logits), logprobs (host sampler, raw logprobs), mixed with free rows
    in one batch. Returns the number of failures."""
    import re
    rx = r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,3}!"
    rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}
    cases = []
    for i in range(8):
        base = {"model": model, "prompt": f"check {i}:", "max_tokens": 64}
        cases.append(("greedy json", {**base, "temperature": 0, "response_format": rf}, person_ok))
        cases.append(("sampled json", {**base, "temperature": 1.0, "seed": i, "response_format": rf}, person_ok))
        cases.append(("logprobs regex", {**base, "temperature": 0.7, "seed": i, "logprobs": 2, "guided_regex": rx},
                      lambda t: re.fullmatch(rx, t) is not None))
        cases.append(("free", {**base, "temperature": 0, "ignore_eos": True, "max_tokens": 16}, lambda t: True))

    async def one_case(body):
        async with session.post(f"{url}/v1/completions", json=body) as r:
            d = await r.json()
            if r.status != 200:
                return None, d
            return d["choices"][0], d

    res = await asyncio.gather(*(one_case(b) for _, b, _ in cases))
    bad = 0
    for (name, body, ok), (choice, d) in zip(cases, res):
        good = choice is not None and ok(choice["text"]) and (name == "free" or choice["finish_reason"] == "stop")
        if name == "logprobs regex" and good:
            lp = choice.get("logprobs") or {}
            good = all(x is not None and x <= 0 for x in lp.get("token_logprobs", [])) and len(lp.get("token_logprobs", [])) > 0
        if not good:
            bad += 1
            print(f"     CHECK FAILED {name}: {json.dumps(d)[:300]}", flush=True)
    print(f"checks: {len(cases) - bad}/{len(cases)} passed (greedy/sampled json_schema, logprobs + regex, free, one batch)",
          flush=True)
    return bad


async def steps(session, url):
    out = {"count": 0.0, "sum": 0.0}
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name == "r4b_engine_step_duration_seconds_count":
                out["count"] += float(line.rsplit(" ", 1)[1])
            elif name == "r4b_engine_step_duration_seconds_sum":
                out["sum"] += float(line.rsplit(" ", 1)[1])
    return out


async def run(session, args, model, n, constrained, tag):
    prompts = [f"{tag} stream {i}: " + "abcdefghij" * 12 for i in range(n)]
    s0 = await steps(session, args.url)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(one(session, args.url, model, p, args.output_tokens, constrained) for p in prompts))
    wall = time.perf_counter() - t0
    s1 = await steps(session, args.url)
    toks = sum(r[0] for r in res)
    bad = [r[1][:40] for r in res if constrained and not r[1].startswith('{"items":[')]
    n_steps = s1["count"] - s0["count"]
    return {"streams": n, "constrained": constrained, "tokens": toks, "wall_s": wall, "tok_s": toks / wall,
            "steps": n_steps, "mean_step_ms": 1e3 * (s1["sum"] - s0["sum"]) / max(n_steps, 1),
            "not_json_prefix": bad}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--free-only", action="store_true",
                    help="unconstrained runs only (a server without structured output: the 'before')")
    args = ap.parse_args()
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{args.url}/v1/models") as r:
            model = (await r.json())["data"][0]["id"]
        failures = [] if args.free_only else await checks(session, args.url, model)
        await run(session, args, model, 4, not args.free_only, "warm-up")  # warms the decode graphs
        results = []
        for n in args.streams:
            free = await run(session, args, model, n, False, f"free{n}")
            if args.free_only:
                print(f"{n:4d} streams: unconstrained {free['tok_s']:9.1f} tok/s "
                      f"(step {free['mean_step_ms']:.2f} ms), tokens {free['tokens']}", flush=True)
                results.append({"free": free})
                continue
            cons = await run(session, args, model, n, True, f"json{n}")
            ratio = cons["tok_s"] / free["tok_s"]
            print(f"{n:4d} streams: unconstrained {free['tok_s']:9.1f} tok/s (step {free['mean_step_ms']:.2f} ms), "
                  f"json_schema {cons['tok_s']:9.1f} tok/s (step {cons['mean_step_ms']:.2f} ms), "
                  f"ratio {ratio:.3f}, tokens {free['tokens']} / {cons['tokens']}", flush=True)
            if cons["not_json_prefix"]:
                print(f"     NOT a JSON prefix: {cons['not_json_prefix'][:3]}", flush=True)
            results.append({"free": free, "json_schema": cons, "ratio": ratio})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"check_failures": failures, "runs": results}, f, indent=1)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
