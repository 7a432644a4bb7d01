#!/usr/bin/env python3
"""Tool calling against `r4b serve` through the official `openai` Python SDK.

Usage: tool_calling.py BASE_URL [forced]
Without `forced`: tools rendered in the prompt (/tokenize), a two-turn agent loop accepted,
tool_choice none gives no calls, streamed == non-streamed under tool_choice auto, the 400s.
With `forced`: tool_choice required / named force calls by constrained decoding (the workers'
grammar masking), so with the embedded random model the calls are valid: their arguments parse
and follow the function's schema (checked by hand here, independently of the server), streamed
calls equal non-streamed ones, finish_reason is tool_calls, parallel_tool_calls=false gives one
call, and in long thinking mode the reasoning comes first.
Exits non-zero on the first failure; prints one line per check.
"""
import json
import sys
import urllib.request

import openai

MODEL = "r4b"

# Bounded parameters (enums, small integer ranges, no free strings, no extra keys) so that a
# random model under the grammar ends its call within max_tokens.
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "metric": {"type": "boolean"},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    }},
    {"type": "function", "function": {
        "name": "get_time",
        "description": "The current time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    }},
]


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def valid_args(name, args):
    """Hand check of `args` against the two schemas above."""
    if not isinstance(args, dict):
        return False
    if name == "get_time":
        return args == {}
    if name != "get_weather" or not set(args) <= {"city", "days", "metric"}:
        return False
    if args.get("city") not in ("Paris", "Oslo", "Lima"):
        return False
    days = args.get("days")
    if not (isinstance(days, int) and not isinstance(days, bool) and 1 <= days <= 7):
        return False
    return "metric" not in args or isinstance(args["metric"], bool)


def calls_of(message):
    return [(c.function.name, c.function.arguments) for c in (message.tool_calls or [])]


def streamed(client, **kw):
    """Content, calls [(name, arguments)] and finish reason assembled from a stream."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                check("stream: first call delta has id, type, name, empty arguments",
                      tc.id and tc.id.startswith("call_") and tc.type == "function"
                      and tc.function.name and tc.function.arguments == "", tc)
                calls[tc.index] = [tc.function.name, ""]
            else:
                check("stream: later call deltas carry only arguments",
                      tc.id is None and tc.function.name is None, tc)
                calls[tc.index][1] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def basic(base, client):
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    # 1. The tools reach the prompt through the checkpoint's template.
    t = post(base, "/tokenize", {"model": MODEL, "messages": msgs, "tools": TOOLS})
    tool_json = json.dumps(TOOLS[0], ensure_ascii=False)  # Python's tojson, key order kept
    check("tokenize: tools rendered in the prompt", "<tools>\n" + tool_json + "\n" in t["prompt"], t["prompt"][:400])
    check("tokenize: hermes instructions", "<tool_call>\n{\"name\": <function-name>" in t["prompt"])

    # 2. A two-turn agent loop: assistant tool_calls (content null) and a tool result.
    loop = msgs + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=loop, tools=TOOLS, max_tokens=8, temperature=0)
    check("agent loop: second turn accepted", len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length", "tool_calls"))
    t = post(base, "/tokenize", {"model": MODEL, "messages": loop, "tools": TOOLS})
    check("agent loop: call and result rendered",
          "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 1}}\n</tool_call>" in t["prompt"]
          and "<tool_response>\n18C, sunny\n</tool_response>" in t["prompt"], t["prompt"][-300:])

    # 3. tool_choice none: no calls.
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none",
                                       max_tokens=16, temperature=0)
    check("none: no tool_calls", not r.choices[0].message.tool_calls, r.choices[0].message)

    # 4. auto: streamed == non-streamed (same greedy output, whatever it holds).
    kw = dict(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=24, temperature=0)
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    s = streamed(client, **kw)
    check("auto: streamed == non-streamed", s == (m.content, calls_of(m), r.choices[0].finish_reason), (s, m))

    # 5. 400s naming the field.
    for name, extra, param in [
        ("unknown tool_choice name", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ("required without tools", {"tool_choice": "required"}, "tool_choice"),
        ("legacy functions", {"extra_body": {"functions": [{"name": "f", "parameters": {}}]}}, "functions"),
        ("legacy function_call", {"extra_body": {"function_call": "auto"}}, "function_call"),
    ]:
        try:
            client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **extra)
            check(f"400: {name}", False, "no error")
        except openai.BadRequestError as e:
            check(f"400: {name}", e.status_code == 400 and e.param == param, (e.param, e.message))


def forced(client):
    msgs = [{"role": "user", "content": "What's the weather in Oslo for 3 days?"}]
    base = dict(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=300, temperature=0)

    # 1. required, one call: valid arguments, finish_reason tool_calls, no content.
    kw = dict(base, tool_choice="required", parallel_tool_calls=False)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    calls = calls_of(c.message)
    check("required: one call", len(calls) == 1, c.message)
    check("required: finish_reason tool_calls", c.finish_reason == "tool_calls", c.finish_reason)
    name, args = calls[0]
    check("required: arguments parse and follow the schema", valid_args(name, json.loads(args)), calls)
    check("required: id and type", c.message.tool_calls[0].id.startswith("call_") and c.message.tool_calls[0].type == "function")
    # 2. Streamed == non-streamed.
    s = streamed(client, **kw)
    check("required: streamed == non-streamed", s == (c.message.content, calls, "tool_calls"), (s, calls))

    # 3. Named: exactly that function.
    for fn in ("get_weather", "get_time"):
        r = client.chat.completions.create(**dict(base, tool_choice={"type": "function", "function": {"name": fn}}))
        calls = calls_of(r.choices[0].message)
        check(f"named {fn}: one call of it", len(calls) == 1 and calls[0][0] == fn, calls)
        check(f"named {fn}: arguments follow the schema", valid_args(fn, json.loads(calls[0][1])), calls)
        check(f"named {fn}: finish_reason tool_calls", r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason)

    # 4. required with parallel calls allowed: every call is valid (a cut last block is not a call).
    r = client.chat.completions.create(**dict(base, tool_choice="required", seed=7, temperature=1.0))
    calls = calls_of(r.choices[0].message)
    check("required parallel: at least one call", len(calls) >= 1 or r.choices[0].finish_reason == "length", r.choices[0])
    check("required parallel: all valid", all(valid_args(n, json.loads(a)) for n, a in calls), calls)

    # 5. Thinking and tools: in long mode the reasoning stays in reasoning_content, the call follows.
    r = client.chat.completions.create(**dict(base, tool_choice="required", parallel_tool_calls=False,
                                              extra_body={"chat_template_kwargs": {"thinking_mode": "long"},
                                                          "max_thinking_tokens": 8}))
    m = r.choices[0].message
    check("thinking + tools: reasoning", bool(getattr(m, "reasoning_content", None)), m)
    calls = calls_of(m)
    check("thinking + tools: one valid call", len(calls) == 1 and valid_args(calls[0][0], json.loads(calls[0][1])), m)


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    if len(sys.argv) > 2 and sys.argv[2] == "forced":
        forced(client)
    else:
        basic(base, client)
    print("all passed")


if __name__ == "__main__":
    main()
