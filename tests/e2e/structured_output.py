#!/usr/bin/env python3
"""Structured output (response_format, vLLM's guided_* extras) through the official `openai` SDK.

Usage: structured_output.py BASE_URL. Exits non-zero on the first failure; prints one line per
check. The served model is the embedded random one: only the constraint can make its output
valid, and validity is judged independently (`json.loads`, the `jsonschema` validator, Python's
`re.fullmatch`), never by the server.
"""
import concurrent.futures
import json
import re
import sys

import jsonschema
import openai

MODEL = "r4b"

# Bounded everywhere (string lengths, integer ranges, item counts) so that a random model must
# finish the object within max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {
            "type": "array",
            "items": {"type": "string", "enum": ["a", "b", "c"]},
            "maxItems": 3,
        },
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
    # Compact JSON: with the default flexible whitespace a random model may emit whitespace
    # until max_tokens (a valid prefix, never a complete object).
    "x-guidance": {"whitespace_flexible": False},
}
# What the validator checks (the schema without llguidance's extension).
PERSON_CHECK = {k: v for k, v in PERSON.items() if k != "x-guidance"}


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def valid(schema, text):
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError) as e:
        print(f"     invalid: {e!r} in {text!r}", flush=True)
        return False


def user(text):
    return [{"role": "user", "content": text}]


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    short = {"chat_template_kwargs": {"thinking_mode": "short"}}
    greedy = dict(model=MODEL, temperature=0, max_tokens=200)
    rf = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}

    # 1. json_schema (strict), greedy and sampled, chat: content validates against the schema.
    r = client.chat.completions.create(messages=user("Describe a pet."), response_format=rf, extra_body=short, **greedy)
    c = r.choices[0]
    check("json_schema chat: finish stop", c.finish_reason == "stop", c.finish_reason)
    check("json_schema chat: valid", valid(PERSON_CHECK, c.message.content), c.message.content)
    for seed in range(3):
        r = client.chat.completions.create(
            messages=user("Describe a pet."), response_format=rf, extra_body=short,
            model=MODEL, temperature=1.0, seed=seed, max_tokens=200)
        check(f"json_schema chat sampled seed {seed}: valid", valid(PERSON_CHECK, r.choices[0].message.content))

    # 2. Streamed: the concatenated deltas validate.
    text = ""
    reason = None
    for chunk in client.chat.completions.create(messages=user("Describe a pet."), response_format=rf,
                                                extra_body=short, stream=True, **greedy):
        for ch in chunk.choices:
            text += ch.delta.content or ""
            reason = ch.finish_reason or reason
    check("json_schema stream: valid", valid(PERSON_CHECK, text), text)
    check("json_schema stream: finish stop", reason == "stop", reason)

    # 3. json_object: any JSON object. Unbounded, so a random model may run to max_tokens: it
    #    must then be a prefix of an object; compact (no whitespace) and stopped, it parses.
    r = client.chat.completions.create(messages=user("JSON please"), response_format={"type": "json_object"},
                                       extra_body=short, model=MODEL, temperature=0, max_tokens=60)
    c = r.choices[0]
    check("json_object: an object's prefix", c.message.content.lstrip().startswith("{"), c.message.content)
    if c.finish_reason == "stop":
        check("json_object: parses", isinstance(json.loads(c.message.content), dict), c.message.content)
    stopped = 0
    for seed in range(6):
        r = client.chat.completions.create(
            messages=user("JSON please"), model=MODEL, temperature=1.0, seed=seed, max_tokens=60,
            extra_body={"structured_outputs": {"json_object": True, "disable_any_whitespace": True}, **short})
        c = r.choices[0]
        if c.finish_reason == "stop":
            stopped += 1
            check(f"json_object compact seed {seed}: parses", isinstance(json.loads(c.message.content), dict),
                  c.message.content)
    print(f"     json_object compact: {stopped}/6 complete within 60 tokens", flush=True)

    # 4. Completions endpoint: guided_json, guided_regex, guided_choice, guided_grammar.
    comp = dict(model=MODEL, temperature=0, max_tokens=120)
    r = client.completions.create(prompt="A pet:", extra_body={"guided_json": PERSON}, **comp)
    check("guided_json completions: valid", valid(PERSON_CHECK, r.choices[0].text), r.choices[0].text)
    rx = r"[A-Z][a-z]{1,6} (is|was) [0-9]{1,3}!"
    for seed in range(3):
        r = client.completions.create(prompt="Say:", extra_body={"guided_regex": rx}, seed=seed,
                                      model=MODEL, temperature=1.0, max_tokens=40)
        t = r.choices[0].text
        check(f"guided_regex seed {seed}: fullmatch", re.fullmatch(rx, t) is not None, repr(t))
        check(f"guided_regex seed {seed}: finish stop", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
    choices = ["yes", "no", "maybe (later)"]
    for seed in range(3):
        r = client.chat.completions.create(messages=user("?"), extra_body={"guided_choice": choices, **short},
                                           seed=seed, model=MODEL, temperature=1.0, max_tokens=20)
        check(f"guided_choice seed {seed}: one of them", r.choices[0].message.content in choices,
              r.choices[0].message.content)
    grammar = 'start: "(" item ("," item)? ("," item)? ")"\nitem: /[0-9]{1,2}/ | "x"\n'
    for seed in range(3):
        r = client.completions.create(prompt="List:", extra_body={"guided_grammar": grammar}, seed=seed,
                                      model=MODEL, temperature=1.0, max_tokens=40)
        t = r.choices[0].text
        check(f"guided_grammar seed {seed}: matches",
              re.fullmatch(r"\((?:[0-9]{1,2}|x)(?:,(?:[0-9]{1,2}|x)){0,2}\)", t) is not None, repr(t))
        check(f"guided_grammar seed {seed}: finish stop", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
    r = client.completions.create(prompt="s", extra_body={"structured_outputs": {"regex": "ab{1,3}c"}}, **comp)
    check("structured_outputs.regex", re.fullmatch("ab{1,3}c", r.choices[0].text) is not None, repr(r.choices[0].text))

    # 5. A mixed batch: constrained and unconstrained requests at once; every unconstrained
    #    output equals the same request sent alone (greedy), every constrained one is valid.
    free = dict(model=MODEL, temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    prompts = [f"Story {i}:" for i in range(4)]
    alone = [client.completions.create(prompt=p, **free).choices[0].text for p in prompts]

    def run(i):
        if i % 2 == 0:
            return ("free", i // 2, client.completions.create(prompt=prompts[i // 2], **free).choices[0].text)
        return ("json", i, client.completions.create(prompt="A pet:", extra_body={"guided_json": PERSON}, **comp).choices[0].text)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    for kind, i, t in results:
        if kind == "free":
            check(f"mixed batch: free {i} equals alone", t == alone[i], (t, alone[i]))
        else:
            check(f"mixed batch: json {i} valid", valid(PERSON_CHECK, t), t)

    # 6. thinking_mode long with a schema: reasoning is free text, the content after </think>
    #    validates. The thinking budget closes the block (the random model would not).
    r = client.chat.completions.create(
        messages=user("Think, then answer."), response_format=rf, model=MODEL, temperature=0, max_tokens=300,
        extra_body={"chat_template_kwargs": {"thinking_mode": "long"}, "max_thinking_tokens": 12})
    m = r.choices[0].message
    check("long thinking: reasoning present", bool(getattr(m, "reasoning_content", None)), m)
    check("long thinking: content valid", valid(PERSON_CHECK, m.content), m.content)

    # 7. max_tokens too small: finish_reason length, no error.
    r = client.chat.completions.create(messages=user("x"), response_format=rf, extra_body=short,
                                       model=MODEL, temperature=0, max_tokens=3)
    check("max_tokens small: finish length", r.choices[0].finish_reason == "length", r.choices[0].finish_reason)

    # 8. Bad constraints: a 400 naming the field, with llguidance's message.
    bad = [
        ("guided_regex", dict(extra_body={"guided_regex": "a(b"})),
        ("guided_json", dict(extra_body={"guided_json": {"type": "nonsense"}})),
        ("response_format", dict(response_format={"type": "json_schema",
                                                  "json_schema": {"name": "x", "schema": {"type": 5}}})),
        ("guided_grammar", dict(extra_body={"guided_grammar": "start: ("})),
        ("guided_choice", dict(extra_body={"guided_regex": "a", "guided_choice": ["b"]})),
        ("guided_decoding_backend", dict(extra_body={"guided_regex": "a", "guided_decoding_backend": "xgrammar"})),
    ]
    for field, kw in bad:
        try:
            client.chat.completions.create(messages=user("x"), model=MODEL, max_tokens=5, **kw)
            check(f"bad {field}: 400", False, "got 200")
        except openai.BadRequestError as e:
            body = e.body if isinstance(e.body, dict) else {}
            check(f"bad {field}: 400 names the field", body.get("param") == field, e.body)
    # The server still serves after them.
    r = client.chat.completions.create(messages=user("x"), response_format=rf, extra_body=short, **greedy)
    check("after bad requests: still valid", valid(PERSON_CHECK, r.choices[0].message.content))
    print("all passed", flush=True)


if __name__ == "__main__":
    main()
