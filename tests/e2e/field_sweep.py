#!/usr/bin/env python3
"""Every field of OpenAI's chat and completions request schemas is honoured or refused by name.

Usage: field_sweep.py BASE_URL. The field names come from the official `openai` SDK's request
types (`CompletionCreateParamsBase` of chat and of completions), so a field OpenAI adds shows up
here with the next SDK pin. Each field is sent alone on a minimal valid request, with a value that
asks for something (never the neutral `null`/`false`/`[]`). The server must either:
- answer 200, and the field is in HONOURED below, which names the test that checks its effect; or
- answer 400 whose error `param` names the field (OpenAI's error shape).
A field that needs another (tool_choice needs tools) may instead be refused by the name of that
other field, when it is not honoured either. A 200 for a field not in HONOURED fails (that is a silently ignored field), and so does a 400 for a
field in HONOURED (the list is stale).
"""
import json
import sys
import typing
import urllib.error
import urllib.request

from openai.types import completion_create_params as completions_params
from openai.types.chat import completion_create_params as chat_params

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# Values that ask for something, with the fields they need alongside.
SAMPLES = {
    "audio": ({"voice": "alloy", "format": "wav"}, {}),
    "best_of": (2, {}),
    "echo": (True, {}),
    "frequency_penalty": (0.5, {}),
    "function_call": ("auto", {"functions": [{"name": "f", "parameters": {"type": "object"}}]}),
    "functions": ([{"name": "f", "parameters": {"type": "object"}}], {}),
    "logit_bias": ({"65": 5}, {}),
    "logprobs": (None, {}),  # per endpoint below
    "max_completion_tokens": (3, {}),
    "max_tokens": (3, {}),
    "metadata": ({"team": "eval"}, {}),
    "modalities": (["text", "audio"], {}),
    "moderation": ({"enabled": True}, {}),
    "n": (2, {}),
    "parallel_tool_calls": (False, {"tools": TOOLS}),
    "prediction": ({"type": "content", "content": "hello"}, {}),
    "presence_penalty": (0.5, {}),
    "prompt_cache_key": ("user-1", {}),
    "prompt_cache_options": ({"mode": "auto"}, {}),
    "prompt_cache_retention": ("24h", {}),
    "reasoning_effort": ("low", {}),
    "response_format": ({"type": "json_object"}, {}),
    "safety_identifier": ("hash-1", {}),
    "seed": (7, {}),
    "service_tier": ("flex", {}),
    "stop": (["\n\n"], {}),
    "store": (True, {}),
    "stream_options": ({"include_usage": True}, {"stream": True}),
    "suffix": (" the end", {}),
    "temperature": (0.5, {}),
    "tool_choice": ("required", {"tools": TOOLS}),
    "tools": (TOOLS, {}),
    "top_logprobs": (2, {"logprobs": True}),
    "top_p": (0.9, {}),
    "user": ("user-1", {}),
    "verbosity": ("low", {}),
    "web_search_options": ({"search_context_size": "low"}, {}),
}

# Fields the server honours, and the test that checks each one's effect.
HONOURED_BOTH = {
    "model": "openai_sdk.rs (a wrong name gets 404)",
    "frequency_penalty": "worker sampling unit tests; openai_sdk.rs",
    "presence_penalty": "worker sampling unit tests; openai_sdk.rs",
    "max_tokens": "openai_sdk.rs (usage.completion_tokens)",
    "n": "openai_sdk_completions.rs (index = i*n + j)",
    "seed": "openai_sdk.rs (same seed, same text)",
    "stop": "serving.rs / gateway stop unit tests",
    "stream_options": "openai_sdk.rs (include_usage chunk)",
    "temperature": "openai_sdk.rs",
    "top_p": "worker sampling unit tests",
    "user": "informational (changes nothing OpenAI returns); openai_sdk_completions.rs",
    "logprobs": "openai_sdk.rs (chat), openai_sdk_completions.rs",
}
HONOURED = {
    "chat": dict(HONOURED_BOTH, **{
        "messages": "every chat test",
        "max_completion_tokens": "openai_sdk_completions.rs",
        "metadata": "informational; openai_sdk_completions.rs",
        "safety_identifier": "informational, like user (this sweep: 200)",
        "top_logprobs": "openai_sdk.rs",
        "tools": "tool_calling.rs (rendered, parsed into tool_calls), langchain.rs",
        "tool_choice": "tool_calling.rs (none/auto/required/named), langchain.rs",
        "parallel_tool_calls": "tool_calling.rs (false: one call)",
        "response_format": "structured_output.rs (json_schema validated by jsonschema)",
    }),
    "completions": dict(HONOURED_BOTH, **{
        "prompt": "openai_sdk_completions.rs",
        "echo": "openai_sdk_completions.rs",
    }),
}


def fields(module):
    return sorted(typing.get_type_hints(module.CompletionCreateParamsBase).keys())


def post(base, path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main():
    base = sys.argv[1].rstrip("/")
    failures = []
    for endpoint, module, path, required in (
        ("chat", chat_params, "/v1/chat/completions",
         {"model": "r4b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
        ("completions", completions_params, "/v1/completions",
         {"model": "r4b", "prompt": "hi", "max_tokens": 3}),
    ):
        names = fields(module)
        assert {"model", "temperature"} <= set(names), names
        for field in names:
            if field in required and field != "max_tokens":
                continue  # the minimal request already carries it
            if field not in SAMPLES:
                failures.append(f"{endpoint}.{field}: no sample value in field_sweep.py (a new SDK field)")
                continue
            value, extra = SAMPLES[field]
            if field == "logprobs":
                value = True if endpoint == "chat" else 2
            body = dict(required, **extra)
            body[field] = value
            status, err = post(base, path, body)
            honoured = field in HONOURED[endpoint]
            param = ((err or {}).get("error") or {}).get("param") or ""
            if status == 200 and honoured:
                verdict = f"honoured ({HONOURED[endpoint][field]})"
            elif status == 400 and not honoured and (param == field or param.startswith(field + ".")):
                verdict = f"refused, param={param}: {err['error'].get('message', '')[:70]}"
            elif status == 400 and param in extra and param not in HONOURED[endpoint]:
                # Sent with a field it needs that is itself refused (checked on its own above or
                # below): the server names that one first. Testable once that field is honoured.
                verdict = f"needs {param}, which is refused"
            else:
                verdict = None
                failures.append(f"{endpoint}.{field}: HTTP {status}, param={param!r}, "
                                f"listed as honoured: {honoured}; {err}")
            print(f"{'ok  ' if verdict else 'FAIL'} {endpoint}.{field}: {verdict or status}", flush=True)
        for field in HONOURED[endpoint]:
            if field not in names:
                failures.append(f"{endpoint}.{field}: listed as honoured but not in the SDK schema")
    if failures:
        print("\n".join(["FAILURES:"] + failures), flush=True)
        sys.exit(1)
    print("all passed", flush=True)


if __name__ == "__main__":
    main()
