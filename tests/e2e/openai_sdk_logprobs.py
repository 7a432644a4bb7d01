#!/usr/bin/env python3
"""Prompt logprobs, echo, max_tokens 0, prompt_logprobs, token-id keys and continuous usage
through the official `openai` SDK, against reference log-softmax rows.

Usage: openai_sdk_logprobs.py BASE_URL REFERENCE_JSON MODE (MODE: `full` or `scoring`, the
prompt-scoring subset). REFERENCE_JSON (written by r4b/tests/prompt_logprobs.rs from the f32
reference forward run in-process) holds, per prompt, its token ids and the log-softmax of the
logits at every position: rows[i] is the distribution of token i + 1. Every expected value here
(logprobs, top-k sets, ranks, token counts) is derived from those rows or from the request.
Exits non-zero on the first failure; prints one line per check.
"""
import json
import sys

import openai

MODEL = "r4b"
TOL = 1e-4


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def close(a, b):
    return a is not None and abs(a - b) <= TOL


def top_ids(row, k):
    """The k most likely ids (ties: lower id first), as the server orders them."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


def rank(row, token):
    """vLLM's rank: how many ids have a log-probability at least the token's."""
    return sum(1 for x in row if x >= row[token])


def key(i):
    return f"token_id:{i}"


def check_echo_logprobs(name, lp, ids, rows, k):
    """`choices[].logprobs` of an echoed prompt (return_tokens_as_token_ids): null first, then
    each prompt token's value and a dict of it plus the reference top k."""
    n = len(ids)
    check(f"{name}: tokens", lp.tokens[:n] == [key(i) for i in ids], lp.tokens[:n])
    check(f"{name}: first is null", lp.token_logprobs[0] is None and lp.top_logprobs[0] is None)
    for t in range(1, n):
        want = rows[t - 1][ids[t]]
        got = lp.token_logprobs[t]
        check(f"{name}: logprob[{t}]", close(got, want), (got, want))
        expect = {key(i): rows[t - 1][i] for i in top_ids(rows[t - 1], k)}
        expect[key(ids[t])] = want
        top = lp.top_logprobs[t]
        check(f"{name}: top[{t}] keys", set(top) == set(expect), (sorted(top), sorted(expect)))
        check(f"{name}: top[{t}] values", all(close(top[x], expect[x]) for x in expect), top)
    offsets = [0]
    for tok in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(tok.encode()))
    check(f"{name}: text_offset", lp.text_offset == offsets, (lp.text_offset, offsets))


def check_prompt_logprobs(name, plp, ids, rows, k):
    """vLLM's `prompt_logprobs`: null, then {id: {logprob, rank, decoded_token}} per token."""
    check(f"{name}: length", len(plp) == len(ids), (len(plp), len(ids)))
    check(f"{name}: first is null", plp[0] is None)
    for t in range(1, len(ids)):
        row, d = rows[t - 1], plp[t]
        want = {ids[t]} | set(top_ids(row, k))
        check(f"{name}[{t}]: ids", {int(x) for x in d} == want, (sorted(d), sorted(want)))
        for x, e in d.items():
            check(f"{name}[{t}][{x}]: logprob", close(e["logprob"], row[int(x)]), (e, row[int(x)]))
        e = d[str(ids[t])]
        check(f"{name}[{t}]: rank", e["rank"] == rank(row, ids[t]), (e["rank"], rank(row, ids[t])))
        check(f"{name}[{t}]: decoded_token", isinstance(e["decoded_token"], str))


def refused(name, call, field):
    try:
        call()
        check(f"{name} -> 400", False)
    except openai.BadRequestError as e:
        check(f"{name} -> 400 naming {field}", field in str(e), e)


def scoring(client, ref):
    """echo + logprobs with max_tokens 0 (lm-eval's loglikelihood), batched, and
    prompt_logprobs on completions."""
    prompts = ref["prompts"]
    ids = [p["ids"] for p in prompts]
    r = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=3,
        extra_body={"return_tokens_as_token_ids": True, "prompt_logprobs": 2},
    )
    check("score batch: one choice per prompt", [c.index for c in r.choices] == list(range(len(ids))))
    check("score batch: usage", r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, ids)), r.usage)
    for i, (c, p) in enumerate(zip(r.choices, prompts)):
        check(f"score {i}: finish_reason length", c.finish_reason == "length", c.finish_reason)
        check(f"score {i}: no generated tokens", len(c.logprobs.tokens) == len(p["ids"]), len(c.logprobs.tokens))
        check_echo_logprobs(f"score {i}", c.logprobs, p["ids"], p["rows"], 3)
        check_prompt_logprobs(f"score {i} prompt_logprobs", c.model_extra["prompt_logprobs"], p["ids"], p["rows"], 2)


def full(client, ref):
    prompts = ref["prompts"]
    p = prompts[0]
    ids, rows = p["ids"], p["rows"]
    greedy = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})

    # 1. echo + logprobs with generation: the prompt's entries, then the completion's.
    r = client.completions.create(prompt=ids, max_tokens=3, echo=True, logprobs=2, **greedy)
    c = r.choices[0]
    check("echo+gen: 3 generated entries", len(c.logprobs.tokens) == len(ids) + 3, len(c.logprobs.tokens))
    check_echo_logprobs("echo+gen", c.logprobs, ids, rows, 2)
    alone = client.completions.create(prompt=ids, max_tokens=3, logprobs=2, **greedy).choices[0]
    check("echo+gen: generated part as without echo", c.logprobs.tokens[len(ids):] == alone.logprobs.tokens, (c.logprobs.tokens, alone.logprobs.tokens))
    check("echo+gen: text is prompt + completion", c.text == "Hello world" + alone.text, (c.text, alone.text))
    # The first generated token is the greedy pick of the reference's last row.
    first = int(c.logprobs.tokens[len(ids)].split(":")[1])
    check("echo+gen: first generated token is the reference arg-max", first == top_ids(rows[-1], 1)[0], first)
    check("echo+gen: its logprob", close(c.logprobs.token_logprobs[len(ids)], rows[-1][first]))

    # 2. Streamed echo + logprobs: the same entries, prompt first.
    toks, lps = [], []
    for chunk in client.completions.create(prompt=ids, max_tokens=3, echo=True, logprobs=2, stream=True, **greedy):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                toks += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
    check("echo stream: same tokens", toks == c.logprobs.tokens, (toks, c.logprobs.tokens))
    check("echo stream: same logprobs", lps[0] is None and all(close(a, b) for a, b in zip(lps[1:], c.logprobs.token_logprobs[1:])))

    # Streamed scoring (max_tokens 0): the prompt text and its entries, finish_reason length.
    text, toks, reasons = "", [], []
    for chunk in client.completions.create(prompt=ids, max_tokens=0, echo=True, logprobs=1, stream=True, **greedy):
        for ch in chunk.choices:
            text += ch.text
            toks += ch.logprobs.tokens if ch.logprobs else []
            reasons.append(ch.finish_reason)
    check("score stream: the prompt text", text == "Hello world", text)
    check("score stream: prompt entries only", toks == [key(i) for i in ids], toks)
    check("score stream: finish_reason length", reasons[-1] == "length", reasons)

    # 3. prompt_logprobs on chat (top level, as vLLM), over the chat template's ids.
    chat = ref["chat"]
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=1,
        extra_body={"prompt_logprobs": 3},
    )
    check("chat prompt_logprobs: usage.prompt_tokens", r.usage.prompt_tokens == len(chat["ids"]), r.usage)
    check_prompt_logprobs("chat prompt_logprobs", r.model_extra["prompt_logprobs"], chat["ids"], chat["rows"], 3)

    # 4. Alternatives with the same text: token-id keys keep all k + 1; text keys merge them, as
    # vLLM does (each surviving value is one of the colliding entries').
    q = prompts[2]
    k = 5
    by_id = client.completions.create(model=MODEL, prompt=q["ids"], max_tokens=0, echo=True, logprobs=k, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    by_text = client.completions.create(model=MODEL, prompt=q["ids"], max_tokens=0, echo=True, logprobs=k).choices[0]
    collided = 0
    for t in range(1, len(q["ids"])):
        want = set(top_ids(q["rows"][t - 1], k)) | {q["ids"][t]}
        got = by_id.logprobs.top_logprobs[t]
        check(f"as ids[{t}]: all {len(want)} alternatives", set(got) == {key(i) for i in want}, sorted(got))
        texts = by_text.logprobs.top_logprobs[t]
        collided += len(texts) < len(want)
        values = {round(v, 4) for v in got.values()}
        check(f"as text[{t}]: values from the entries", all(round(v, 4) in values for v in texts.values()), texts)
    check("some position has alternatives with the same text", collided > 0, collided)

    # 5. continuous_usage_stats: every chunk carries the usage so far; the completion count is
    # the number of tokens (logprob entries) streamed so far.
    seen, counts = 0, []
    for chunk in client.completions.create(
        prompt=ids, max_tokens=6, logprobs=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **greedy,
    ):
        check("continuous usage: every chunk has usage", chunk.usage is not None, chunk)
        for ch in chunk.choices:
            seen += len(ch.logprobs.tokens) if ch.logprobs else 0
        u = chunk.usage
        check("continuous usage: prompt tokens", u.prompt_tokens == len(ids), u)
        check("continuous usage: total", u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
        if chunk.choices:
            check("continuous usage: completion so far", u.completion_tokens == seen, (u.completion_tokens, seen))
        counts.append(u.completion_tokens)
    check("continuous usage: ends at 6", counts[-1] == 6, counts)
    n_chat = 0
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
        extra_body={"ignore_eos": True},
    ):
        check("chat continuous usage: every chunk has usage", chunk.usage is not None, chunk)
        for ch in chunk.choices:
            n_chat += len(ch.logprobs.content) if ch.logprobs and ch.logprobs.content else 0
        if chunk.choices and chunk.choices[0].logprobs:
            check("chat continuous usage: completion so far", chunk.usage.completion_tokens == n_chat, (chunk.usage, n_chat))
    check("chat continuous usage: ends at 4", chunk.usage.completion_tokens == 4, chunk.usage)

    # 7. Sampled tokens (OpenAI: "up to logprobs+1 elements"): every position's dict holds the
    #    sampled token itself, with its own logprob, even when it is not among the top 1; and
    #    text_offset counts characters (Python's len) of the tokens before it.
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, logprobs=1, temperature=1.5, seed=3,
                                  extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = r.choices[0].logprobs
    outside = 0
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        check("sampled: its own token is in top_logprobs", tok in top and close(top[tok], l), (tok, l, top))
        check("sampled: at most logprobs + 1 entries", len(top) <= 2, top)
        outside += len(top) == 2
    first = int(lp.tokens[0].split(":")[1])
    check("sampled: first token's logprob is the reference's", close(lp.token_logprobs[0], rows[-1][first]))
    print(f"     ({outside} of 8 sampled tokens were outside the top 1)", flush=True)
    r = client.completions.create(model=MODEL, prompt="h\u00e9llo w\u00f6rld \u2713", max_tokens=4, echo=True,
                                  logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    want = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    check("text_offset counts characters", lp.text_offset == want, (lp.text_offset, want, lp.tokens))
    check("text_offset: the text is the tokens joined", "".join(lp.tokens) == r.choices[0].text or "\ufffd" in "".join(lp.tokens))

    # 6. Refusals name the field.
    refused("max_tokens 0 without echo", lambda: client.completions.create(model=MODEL, prompt=ids, max_tokens=0), "max_tokens")
    refused("prompt_logprobs 21", lambda: client.completions.create(model=MODEL, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 21}), "prompt_logprobs")
    refused("prompt_logprobs with stream", lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True, extra_body={"prompt_logprobs": 1}), "prompt_logprobs")


def main():
    base, ref_path, mode = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    with open(ref_path) as f:
        ref = json.load(f)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    scoring(client, ref)
    if mode == "full":
        full(client, ref)
    print("all passed", flush=True)


if __name__ == "__main__":
    main()
