#!/usr/bin/env python3
"""HF transformers `generate` throughput baseline + device-to-device copy bandwidth.

Usage:
  python3 bench/gpu/hf_generate.py CKPT_DIR --json OUT.json [--batch 1 32] [--new-tokens 128]
         [--prompt-len 128] [--dtype bf16] [--attn sdpa|eager] [--device cuda|cpu]
         [--copy-mib 1024] [--copy-runs 20] [--seed 0]

For each batch size B: B random text prompts of --prompt-len ids (no padding), greedy decoding
with min_new_tokens = max_new_tokens = --new-tokens (never stops early; eos ids 151645/151643 are
set but masked). A warm-up generate (8 new tokens) precedes every measurement. Measured:
  * generate of --new-tokens  -> output tok/s = B * new_tokens / seconds (includes the prefill)
  * generate of 1 new token   -> prefill seconds; decode tok/s = B * (new - 1) / (T_full - T_1)
Copy bandwidth: a --copy-mib buffer copied device-to-device, timed with CUDA events, median of
--copy-runs, counting bytes read + written (2 x buffer) -> copy_gbps (1e9 B/s).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.dont_write_bytecode = True  # no __pycache__ in bench/gpu or tests/reference
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as C  # noqa: E402


def copy_bandwidth(device, mib, runs):
    n = mib * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    src.random_(0, 256)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    C.sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = C.Timer()
            dst.copy_(src)
            times.append(t())
    assert torch.equal(dst[:4096], src[:4096])
    sec = C.median(times)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_gbps": 2 * n / sec / 1e9, "copy_bytes": n, "copy_median_ms": sec * 1e3,
            "copy_runs_ms": [x * 1e3 for x in times],
            "copy_timer": "cuda events" if device.type == "cuda" else "perf_counter"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--copy-mib", type=int, default=1024)
    ap.add_argument("--copy-runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = C.pick_device(args.device)
    dtype = C.DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    C.log(f"versions {C.versions()}")
    C.log(f"device {C.device_name(device)}; dtype {args.dtype}; attn {args.attn}")
    t = C.Timer()
    model, cfg = C.load_model(args.ckpt_dir, device, dtype, attn=args.attn)
    C.sync(device)
    C.log(f"loaded {args.ckpt_dir} in {t():.1f} s: {C.param_count(model):,} parameters")

    from transformers import GenerationConfig

    def gen_config(n):
        return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                eos_token_id=[C.IM_END_ID, C.ENDOFTEXT_ID], pad_token_id=C.ENDOFTEXT_ID,
                                bos_token_id=C.ENDOFTEXT_ID, use_cache=True)

    rng = np.random.default_rng(args.seed)

    @torch.no_grad()
    def generate(ids, n):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=gen_config(n))
        C.sync(device)
        return out

    def timed(ids, n):
        t = C.Timer()
        out = generate(ids, n)
        sec = t()
        assert out.shape == (ids.shape[0], ids.shape[1] + n), f"generate stopped early: {tuple(out.shape)}"
        return sec

    results = []
    for b in args.batch:
        ids = torch.tensor(rng.integers(0, C.TEXT_ID_LIMIT, size=(b, args.prompt_len)), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generate(ids, min(8, args.new_tokens))  # warm-up
        t1 = timed(ids, 1)
        tn = timed(ids, args.new_tokens)
        r = {
            "batch": b,
            "seconds": tn,
            "output_tok_s": b * args.new_tokens / tn,
            "prefill_seconds": t1,
            "decode_tok_s": b * (args.new_tokens - 1) / (tn - t1) if tn > t1 and args.new_tokens > 1 else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        results.append(r)
        C.log(f"batch {b}: {tn:.2f} s for {args.new_tokens} tokens -> {r['output_tok_s']:.1f} tok/s "
              f"(prefill {t1 * 1e3:.0f} ms, decode {r['decode_tok_s'] or 0:.1f} tok/s)")

    model = None  # free the weights before the copy test
    if device.type == "cuda":
        torch.cuda.empty_cache()
    bw = copy_bandwidth(device, args.copy_mib, args.copy_runs)
    C.log(f"copy {args.copy_mib} MiB: median {bw['copy_median_ms']:.3f} ms -> {bw['copy_gbps']:.1f} GB/s (read + write)")

    summary = {
        "checkpoint": os.path.abspath(args.ckpt_dir),
        "device": C.device_name(device),
        "dtype": C.DTYPE_NAMES[dtype],
        "attn_implementation": args.attn,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "greedy": True,
        "results": results,
        **bw,
        "versions": C.versions(),
    }
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)

    print()
    print(f"{'batch':>5} {'seconds':>9} {'out tok/s':>10} {'prefill ms':>11} {'decode tok/s':>13} {'peak GiB':>9}")
    for r in results:
        peak = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
        dec = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        print(f"{r['batch']:>5} {r['seconds']:>9.2f} {r['output_tok_s']:>10.1f} {r['prefill_seconds'] * 1e3:>11.1f} "
              f"{dec:>13} {peak:>9}")
    print(f"copy_gbps {bw['copy_gbps']:.1f}  ({C.device_name(device)})", flush=True)
    C.log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
