#!/usr/bin/env python3
"""`/v1/completions` batches and echo, `/tokenizer_info`, through the official `openai` SDK.

Usage: openai_sdk_completions.py BASE_URL. Exits non-zero on the first failure; prints one line
per check. Expected values come from the request itself (the prompts sent, their token counts),
or from the same prompt sent alone (greedy decoding is deterministic).
"""
import json
import sys
import urllib.request

import openai

MODEL = "r4b"


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    greedy = dict(model=MODEL, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})

    # 1. A batch of token-id lists, n = 2: choice i*n + j, usage summed over the prompts.
    ids = [[72, 101], [49, 50, 51, 52], [33]]
    r = client.completions.create(prompt=ids, n=2, **greedy)
    check("batch ids: 6 choices", len(r.choices) == 6, len(r.choices))
    check("batch ids: indexes 0..5 in order", [c.index for c in r.choices] == list(range(6)))
    check("batch ids: prompt_tokens summed", r.usage.prompt_tokens == 2 + 4 + 1, r.usage)
    check("batch ids: completion_tokens summed", r.usage.completion_tokens == 6 * 5, r.usage)
    alone = [client.completions.create(prompt=p, **greedy).choices[0].text for p in ids]
    for i in range(3):
        for j in range(2):
            got = r.choices[i * 2 + j].text
            check(f"batch ids: choice {i * 2 + j} is prompt {i}'s", got == alone[i], (got, alone[i]))

    # 2. A batch of strings, streamed: every index gets the text of its prompt sent alone.
    texts = ["The capital of France is", "1, 2, 3,"]
    alone = [client.completions.create(prompt=t, **greedy).choices[0].text for t in texts]
    got = {}
    usage = None
    for chunk in client.completions.create(prompt=texts, stream=True, stream_options={"include_usage": True}, **greedy):
        for c in chunk.choices:
            got[c.index] = got.get(c.index, "") + c.text
        if chunk.usage is not None:
            usage = chunk.usage
    check("batch stream: one text per prompt", got == {0: alone[0], 1: alone[1]}, (got, alone))
    check("batch stream: usage", usage is not None and usage.completion_tokens == 10, usage)

    # 3. echo: the prompt text, then the completion.
    r = client.completions.create(prompt=texts, echo=True, **greedy)
    for i in range(2):
        check(f"echo: choice {i}", r.choices[i].text == texts[i] + alone[i], (r.choices[i].text, texts[i], alone[i]))
    parts = {}
    for chunk in client.completions.create(prompt=texts[0], echo=True, stream=True, **greedy):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    check("echo stream", parts == {0: texts[0] + alone[0]}, parts)

    # 4. Bad prompts get a 400 naming `prompt`.
    for bad in ([], [[]], [1, "x"], [["x"]]):
        try:
            client.completions.create(prompt=bad, **greedy)
            check(f"bad prompt {bad!r} -> 400", False)
        except openai.BadRequestError as e:
            check(f"bad prompt {bad!r} -> 400", "prompt" in str(e), e)

    # 5. /tokenizer_info (vLLM's shape: tokenizer_config.json's fields).
    with urllib.request.urlopen(base + "/tokenizer_info") as resp:
        info = json.load(resp)
    check("tokenizer_info: tokenizer_class", isinstance(info.get("tokenizer_class"), str), info.keys())
    check("tokenizer_info: model_max_length", isinstance(info.get("model_max_length"), int), info.get("model_max_length"))
    # 6. usage.completion_tokens_details.reasoning_tokens (chat): the generated tokens before
    # `</think>`, counted here from the per-token logprobs (no forced tokens: no budget).
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Think."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        extra_body={"chat_template_kwargs": {"thinking_mode": "long"}, "ignore_eos": True},
    )
    r = client.chat.completions.create(**kw)
    toks = [t.token for t in r.choices[0].logprobs.content]
    expected = toks.index("</think>") if "</think>" in toks else len(toks)
    details = r.usage.completion_tokens_details
    check("reasoning_tokens", details is not None and details.reasoning_tokens == expected, (details, toks))
    usage = [c.usage for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw) if c.usage]
    check("reasoning_tokens streamed", usage and usage[0].completion_tokens_details.reasoning_tokens == expected, usage)
    check("cached_tokens present", r.usage.prompt_tokens_details.cached_tokens >= 0, r.usage)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=3, user="u1",
        metadata={"k": "v"}, extra_body={"ignore_eos": True},
    )
    check("max_completion_tokens, user, metadata", r.usage.completion_tokens == 3, r.usage)
    print("completions SDK checks: all passed")


if __name__ == "__main__":
    main()
