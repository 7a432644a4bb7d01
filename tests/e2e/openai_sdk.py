#!/usr/bin/env python3
"""End-to-end checks of `r4b serve` through the official `openai` Python SDK.

Usage: openai_sdk.py BASE_URL   (e.g. http://127.0.0.1:8000; the server must run with
--allow-private-image-urls, because one image is fetched from a local HTTP server).
Exits non-zero on the first failure; prints one line per check.
"""
import base64
import http.server
import io
import struct
import sys
import threading
import zlib

import openai

MODEL = "r4b"


def png_bytes(w, h, seed):
    """A w x h RGB PNG made with zlib (no imaging library needed)."""
    rows = b""
    for y in range(h):
        px = (bytes(((x * 7 + seed) % 256, (y * 5) % 256, ((x + y) * 3 + seed * 11) % 256)) for x in range(w))
        rows += b"\x00" + b"".join(px)

    def chunk(kind, data):
        c = struct.pack(">I", len(data)) + kind + data
        return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def data_uri(png):
    return "data:image/png;base64," + base64.b64encode(png).decode()


def serve_png(png):
    """Serves `png` at http://127.0.0.1:PORT/cat.png from a background thread."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_address[1]}/cat.png"


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def main():
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")

    # 1. Non-streamed chat.
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    check("chat: one choice", len(r.choices) == 1)
    check("chat: content is text", isinstance(r.choices[0].message.content, str))
    check("chat: finish_reason", r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason)
    check("chat: usage", r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 16, r.usage)
    check("chat: total", r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens)

    # 2. Streamed chat with include_usage: content deltas, then one usage chunk with no choices.
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    usage_chunks = [c for c in chunks if c.usage is not None]
    check("stream: exactly one usage chunk", len(usage_chunks) == 1, len(usage_chunks))
    check("stream: usage chunk is last and has no choices", chunks[-1].usage is not None and chunks[-1].choices == [])
    check("stream: 12 completion tokens", usage_chunks[0].usage.completion_tokens == 12, usage_chunks[0].usage)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check("stream: finish_reason length", finish == ["length"], finish)
    check("stream: first delta has the role", chunks[0].choices[0].delta.role == "assistant")

    # 3. One image by data: URI.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes(64, 48, 1))}},
            {"type": "text", "text": "What is this?"},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    # 64x48 -> pinpoint 384x384, 1 tile: 729 base + unpadded 27x21? -> at least 729 + 27 rows.
    check("data: URI image: prompt holds the image tokens", r.usage.prompt_tokens > 729 + 27, r.usage)

    # 4. One image by http URL from a local server (private address allowed by the server flag).
    url = serve_png(png_bytes(90, 60, 2))
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Describe:"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    check("http URL image", r.usage.prompt_tokens > 729 + 27, r.usage)

    # 5. Two images in one message.
    r2 = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes(64, 48, 3))}},
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes(40, 100, 4))}},
            {"type": "text", "text": "Compare them."},
        ]}],
        max_tokens=8,
        temperature=0,
    )
    check("two images: more tokens than one", r2.usage.prompt_tokens > 2 * (729 + 27), r2.usage)

    # 6. thinking_mode through extra_body, as the R-4B README sends it.
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Think about it."}],
        max_tokens=10,
        temperature=0,
        extra_body={"chat_template_kwargs": {"thinking_mode": "long"}, "min_tokens": 10},
    )
    m = r.choices[0].message
    check("thinking_mode long: reasoning_content present", getattr(m, "reasoning_content", None) is not None, m)

    # 7. Errors surface as the SDK's typed exceptions.
    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=1)
        check("unknown model -> 404", False)
    except openai.NotFoundError as e:
        check("unknown model -> 404", e.status_code == 404)
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
        check("max_tokens 0 -> 400", False)
    except openai.BadRequestError as e:
        check("max_tokens 0 -> 400", e.status_code == 400 and "max_tokens" in str(e))

    # 8. Models list.
    ids = [m.id for m in client.models.list().data]
    check("models list", ids == [MODEL], ids)
    print("openai SDK checks: all passed")


if __name__ == "__main__":
    main()
