#!/usr/bin/env python3
"""Compares our engine's logits with the HF reference written by hf_reference.py.

Usage:
  python3 bench/gpu/compare.py REF_DIR OURS.safetensors [--json SUMMARY.json]
         [--rel-tol 2e-2] [--margin 0.05]

REF_DIR holds prompts.json and reference.safetensors; OURS.safetensors holds the same
`logits.<name>` keys, float32 [positions, vocab] (row r = output at position logits_from + r).
Per prompt: relative error ||ours - ref||_2 / ||ref||_2 over the whole block, max |diff|, and the
top-1 check: at every position whose reference top-1 margin (top1 - top2 logit) exceeds --margin,
our argmax must equal the reference's. PASS = every prompt within --rel-tol and every such position
agrees. The last line printed is `CORRECTNESS PASS` or `CORRECTNESS FAIL`; exit status 0 / 1.
Also printed (information, not part of PASS): our error against HF's fp32 logits and HF's own noise
floor (other attention kernel; bf16 vs fp32) when hf_reference.py recorded them.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file


def compare_block(ref, ours, margin):
    ref64, ours64 = ref.double(), ours.double()
    diff = ours64 - ref64
    ref_norm = ref64.norm().item()
    rel = diff.norm().item() / ref_norm if ref_norm > 0 else float("inf")
    top = ref64.topk(2, dim=-1)
    ref_margin = top.values[:, 0] - top.values[:, 1]
    ref_arg = ref64.argmax(dim=-1)  # first index among ties, same rule for both
    our_arg = ours64.argmax(dim=-1)
    checked = ref_margin > margin
    agree = (our_arg == ref_arg) & checked
    mismatches = [
        {"row": int(r), "ref": int(ref_arg[r]), "ours": int(our_arg[r]), "ref_margin": float(ref_margin[r])}
        for r in torch.nonzero(checked & (our_arg != ref_arg)).flatten().tolist()
    ]
    return {
        "rel_err": rel,
        "max_abs_diff": diff.abs().max().item(),
        "ref_norm": ref_norm,
        "positions": int(ref.shape[0]),
        "checked_positions": int(checked.sum()),
        "top1_agree_checked": int(agree.sum()),
        "top1_agree_all": int((our_arg == ref_arg).sum()),
        "top1_mismatches": mismatches,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ref_dir")
    ap.add_argument("ours")
    ap.add_argument("--json", default=None, help="write a JSON summary here")
    ap.add_argument("--rel-tol", type=float, default=2e-2)
    ap.add_argument("--margin", type=float, default=0.05)
    args = ap.parse_args()

    with open(os.path.join(args.ref_dir, "prompts.json")) as f:
        meta = json.load(f)
    ref = load_file(os.path.join(args.ref_dir, "reference.safetensors"))
    ours = load_file(args.ours)

    results, ok = [], True
    print(f"{'prompt':<16} {'rel err':>10} {'max |d|':>9} {'top-1 (margin>' + str(args.margin) + ')':>22} {'top-1 all':>10}  verdict",
          flush=True)
    for p in meta["prompts"]:
        key = f"logits.{p['name']}"
        r = {"name": p["name"]}
        if key not in ref:
            r.update(pass_=False, error=f"{key} missing from the reference")
        elif key not in ours:
            r.update(pass_=False, error=f"{key} missing from {args.ours}")
        elif tuple(ours[key].shape) != tuple(ref[key].shape):
            r.update(pass_=False, error=f"{key}: shape {list(ours[key].shape)} != reference {list(ref[key].shape)}")
        elif not torch.isfinite(ours[key]).all():
            r.update(pass_=False, error=f"{key}: non-finite values")
        else:
            r.update(compare_block(ref[key], ours[key], args.margin))
            r["pass_"] = r["rel_err"] <= args.rel_tol and r["top1_agree_checked"] == r["checked_positions"]
            k32 = f"logits_fp32.{p['name']}"
            if k32 in ref:
                r["vs_hf_fp32"] = {k: v for k, v in compare_block(ref[k32], ours[key], args.margin).items()
                                   if k != "top1_mismatches"}
        r["hf_noise_floor"] = {k: v for k, v in p.items() if k.startswith("hf_") and isinstance(v, dict)}
        ok &= r["pass_"]
        results.append(r)
        if "error" in r:
            print(f"{p['name']:<16} ERROR: {r['error']}  FAIL", flush=True)
        else:
            print(f"{p['name']:<16} {r['rel_err']:>10.3e} {r['max_abs_diff']:>9.4f} "
                  f"{r['top1_agree_checked']:>10}/{r['checked_positions']:<11} "
                  f"{r['top1_agree_all']:>5}/{r['positions']:<4}  {'pass' if r['pass_'] else 'FAIL'}",
                  flush=True)
            for m in r["top1_mismatches"][:5]:
                print(f"    row {m['row']}: ref {m['ref']} ours {m['ours']} (ref margin {m['ref_margin']:.3f})")
            if "vs_hf_fp32" in r:
                v = r["vs_hf_fp32"]
                print(f"    ours vs HF fp32: rel err {v['rel_err']:.3e}, top-1 {v['top1_agree_checked']}/{v['checked_positions']}")
        for label, st in r["hf_noise_floor"].items():
            print(f"    noise floor {label}: rel err {st['rel_err']:.3e}, top-1 flips at margin > 0.05: "
                  f"{st['top1_flips_margin_gt_0.05']} (largest flipped margin {st['max_flipped_ref_margin']:.3f})")
    extra = sorted(k for k in ours if k not in ref and not k.startswith("logits_fp32."))
    if extra:
        print(f"note: keys only in {args.ours}: {extra}")

    summary = {
        "pass": ok,
        "rel_tol": args.rel_tol,
        "margin": args.margin,
        "ref_dir": os.path.abspath(args.ref_dir),
        "ours": os.path.abspath(args.ours),
        "prompts": [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in results],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print("CORRECTNESS PASS" if ok else "CORRECTNESS FAIL", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
