#!/usr/bin/env python3
"""langchain-openai against `r4b serve`: `bind_tools` with a forced call (tool_choice) and
`with_structured_output` both ways langchain sends it (function calling; response_format
json_schema). Needs the workers' grammar masking: with the embedded random model only the
constraint makes the outputs valid.

Usage: langchain_client.py (not langchain_openai.py: that name would shadow the package) BASE_URL [function_calling|json_schema]...
"""
import sys
from typing import Literal

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


@tool
def get_weather(city: Literal["Paris", "Oslo"], days: int = Field(ge=1, le=7)) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for {days} days"


class Verdict(BaseModel):
    """A yes/no verdict with a confidence score."""

    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=9)


class CompactVerdict(Verdict):
    """A yes/no verdict with a confidence score."""

    # JSON is whitespace-flexible by default (as in vLLM): a random model pads it until
    # max_tokens. llguidance's schema option asks for compact JSON instead.
    model_config = ConfigDict(json_schema_extra={"x-guidance": {"whitespace_flexible": False}})


def main():
    base = sys.argv[1].rstrip("/")
    modes = sys.argv[2:] or ["bind_tools", "function_calling", "json_schema"]
    llm = ChatOpenAI(base_url=base + "/v1", api_key="unused", model="r4b", temperature=0, max_tokens=300)

    if "bind_tools" in modes:
        ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo for 2 days?")
        check("bind_tools: one call", len(ai.tool_calls) == 1, ai)
        call = ai.tool_calls[0]
        check("bind_tools: the forced function", call["name"] == "get_weather", call)
        args = call["args"]
        check("bind_tools: arguments follow the schema",
              args.get("city") in ("Paris", "Oslo") and isinstance(args.get("days"), int) and 1 <= args["days"] <= 7
              and set(args) == {"city", "days"}, args)
        check("bind_tools: the tool runs on them", get_weather.invoke(args).startswith("sunny in"))

    for method in ("function_calling", "json_schema"):
        if method not in modes:
            continue
        model = CompactVerdict if method == "json_schema" else Verdict
        v = llm.with_structured_output(model, method=method).invoke("Is the sky blue?")
        check(f"with_structured_output({method}): a validated Verdict",
              isinstance(v, model) and v.answer in ("yes", "no") and 0 <= v.confidence <= 9, v)
    print("all passed")


if __name__ == "__main__":
    main()
