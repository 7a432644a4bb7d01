#!/usr/bin/env python3
"""Teacher-forced reference logits from transformers for a checkpoint written by make_checkpoint.py.

Usage:
  python3 bench/gpu/hf_reference.py CKPT_DIR OUT_DIR [--positions 64] [--attn sdpa|eager]
         [--dtype bf16] [--device cuda|cpu] [--seed 1234] [--timing-runs 5]

Loads CKPT_DIR with LlavaOnevisionForConditionalGeneration + R-4B's RProjector (as
tests/reference/make_fixtures.py builds it; strict: every tensor must match), in --dtype on CUDA
when available, eval mode, attention implementation --attn (default sdpa; recorded in
prompts.json). Three prompts (ids are fixed by --seed):
  text_64        64 random text ids                  -> logits of all 64 positions
  text_200       200 random text ids                 -> logits of the last 64 positions
  image_640x480  [5 text ids] + [<image>=151669] * N + [64 text ids], one 640x480 image
                 (OUT_DIR/image_640x480.png, made here) -> logits of the last 64 positions
N = the length of the HF model's packed image features for that image (spec: 2929), checked
against the HF processor's count. Only the scored positions go through lm_head (logits_to_keep).

Writes
  OUT_DIR/prompts.json          {"prompts": [{"name", "ids", "image", "logits_from", ...}], ...}
                                 (logits_from = index of the first scored position; row r of the
                                 logits is the model output at position logits_from + r)
  OUT_DIR/reference.safetensors logits.<name>: float32 [positions, vocab] (raw logits, upcast)
and times a forward of the image prompt (vision + decoder + lm_head on 64 positions; warm,
synchronized, median of --timing-runs) as hf_image_forward_ms.

Noise floor (recorded per prompt in prompts.json, printed by compare.py): HF itself on the same
weights with the other attention implementation (`hf_eager_vs_sdpa`), and HF in --dtype against
HF in fp32 (`hf_bf16_vs_fp32`; the fp32 logits are saved too, as `logits_fp32.<name>`). With
random weights and 36 layers the bf16 numerics of two correct implementations differ by a few
percent (see README.md), so read compare.py's errors against these numbers.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch

sys.dont_write_bytecode = True  # no __pycache__ in bench/gpu or tests/reference
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as C  # noqa: E402

IMAGE_W, IMAGE_H = 640, 480
IMAGE_NAME = "image_640x480.png"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--positions", type=int, default=64, help="scored positions per prompt")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the random prompt ids")
    ap.add_argument("--image-seed", type=int, default=7)
    ap.add_argument("--timing-runs", type=int, default=5)
    ap.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                    help="skip re-running the prompts with the other attention implementation")
    ap.add_argument("--no-fp32-check", dest="fp32_check", action="store_false",
                    help="skip re-running the prompts with the model in fp32 (needs 4 B/param more memory)")
    args = ap.parse_args()

    P = args.positions
    device = C.pick_device(args.device)
    dtype = C.DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out_dir, exist_ok=True)
    C.log(f"versions {C.versions()}")
    C.log(f"device {C.device_name(device)}; dtype {args.dtype}; attn {args.attn}")

    t = C.Timer()
    model, cfg = C.load_model(args.ckpt_dir, device, dtype, attn=args.attn)
    C.sync(device)
    vocab = cfg.text_config.vocab_size
    C.log(f"loaded {args.ckpt_dir} in {t():.1f} s: {C.param_count(model):,} parameters, vocab {vocab}")
    image_token = cfg.image_token_index

    rng = np.random.default_rng(args.seed)

    def text_ids(n):
        return [int(x) for x in rng.integers(0, C.TEXT_ID_LIMIT, size=n)]

    # --- image ---------------------------------------------------------------------------------
    from PIL import Image

    img_path = os.path.join(args.out_dir, IMAGE_NAME)
    C.make_image(IMAGE_W, IMAGE_H, args.image_seed).save(img_path)
    img = Image.open(img_path).convert("RGB")  # what a server reads back from the PNG
    ip = C.image_processor(args.ckpt_dir)
    pv, sizes, _ = C.preprocess(ip, [img])
    pv = pv.to(device=device, dtype=dtype)
    sizes = sizes.to(device)
    n_model = C.model_image_token_count(model, cfg, pv, sizes)[0]
    n_proc = C.processor_token_count(ip, IMAGE_W, IMAGE_H)
    C.log(f"image {IMAGE_W}x{IMAGE_H}: pixel_values {list(pv.shape)}, image_sizes {sizes.tolist()}, "
          f"tokens: model {n_model}, processor {n_proc}")
    if n_model != n_proc:
        C.log(f"WARNING: model packs {n_model} image features but the processor counts {n_proc}; using the model's")

    prompts = [
        {"name": "text_64", "ids": text_ids(P), "image": None},
        {"name": "text_200", "ids": text_ids(200), "image": None},
    ]
    prefix, suffix = text_ids(5), text_ids(P)
    prompts.append({"name": f"image_{IMAGE_W}x{IMAGE_H}", "ids": prefix + [image_token] * n_model + suffix,
                    "image": IMAGE_NAME, "image_tokens": n_model,
                    "image_span": [len(prefix), len(prefix) + n_model]})

    @torch.no_grad()
    def forward(p, m=None, pixels=None):
        m = model if m is None else m
        ids = torch.tensor([p["ids"]], device=device)
        kw = {"pixel_values": pv if pixels is None else pixels, "image_sizes": sizes} if p["image"] else {}
        return m(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=P, **kw).logits[0]

    tensors = {}
    for p in prompts:
        assert len(p["ids"]) >= P
        t = C.Timer()
        logits = forward(p).float()
        C.sync(device)
        assert tuple(logits.shape) == (P, vocab), logits.shape
        assert torch.isfinite(logits).all(), f"{p['name']}: non-finite logits"
        tensors[f"logits.{p['name']}"] = logits.cpu().contiguous()
        p["logits_from"] = len(p["ids"]) - P
        p["positions"] = P
        top = logits.topk(2, dim=-1)
        margin = (top.values[:, 0] - top.values[:, 1])
        p["ref_argmax"] = logits.argmax(dim=-1).tolist()  # first index among ties
        p["ref_margin_gt_0.05"] = int((margin > 0.05).sum())
        C.log(f"{p['name']}: {len(p['ids'])} ids, logits {list(logits.shape)} from {p['logits_from']}, "
              f"std {logits.std().item():.3f}, positions with top-1 margin > 0.05: {p['ref_margin_gt_0.05']}/{P}, "
              f"{t():.2f} s")

    # --- timing of the image prompt --------------------------------------------------------------
    img_prompt = prompts[-1]
    forward(img_prompt)
    C.sync(device)
    times = []
    for _ in range(args.timing_runs):
        t = C.Timer()
        forward(img_prompt)
        C.sync(device)
        times.append(t() * 1e3)
    fwd_ms = C.median(times)
    C.log(f"image prompt forward ({len(img_prompt['ids'])} tokens): median {fwd_ms:.1f} ms of "
          f"{[round(x, 1) for x in times]}")

    # --- noise floor: the same weights through HF with the other attention kernel / in fp32 ------
    def noise_stats(other, ref):
        d = other.double() - ref.double()
        top = ref.topk(2, dim=-1).values
        margin = top[:, 0] - top[:, 1]
        flips = other.argmax(dim=-1) != ref.argmax(dim=-1)
        return {"rel_err": (d.norm() / ref.double().norm()).item(), "max_abs_diff": d.abs().max().item(),
                "top1_flips_margin_gt_0.05": int((flips & (margin > 0.05)).sum()),
                "max_flipped_ref_margin": float(margin[flips].max()) if flips.any() else 0.0}

    if args.noise_floor:
        other = "eager" if args.attn == "sdpa" else "sdpa"
        C.set_attn(model.config, other)
        for p in prompts:
            st = noise_stats(forward(p).float(), tensors[f"logits.{p['name']}"].to(device))
            p[f"hf_{other}_vs_{args.attn}"] = st
            C.log(f"noise floor {p['name']}: HF {other} vs {args.attn} ({args.dtype}): rel err {st['rel_err']:.3e}, "
                  f"max |d| {st['max_abs_diff']:.3f}, top-1 flips at margin > 0.05: {st['top1_flips_margin_gt_0.05']}, "
                  f"largest flipped margin {st['max_flipped_ref_margin']:.3f}")
        C.set_attn(model.config, args.attn)

    if args.fp32_check and dtype != torch.float32:
        model = None  # free the bf16 weights first
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        t = C.Timer()
        model32, _ = C.load_model(args.ckpt_dir, device, torch.float32, attn=args.attn)
        pv32 = pv.float()
        for p in prompts:
            l32 = forward(p, model32, pv32).float()
            tensors[f"logits_fp32.{p['name']}"] = l32.cpu().contiguous()
            st = noise_stats(tensors[f"logits.{p['name']}"].to(device), l32)
            p[f"hf_{args.dtype}_vs_fp32"] = st
            C.log(f"fp32 check {p['name']}: HF {args.dtype} vs HF fp32 (as reference): rel err {st['rel_err']:.3e}, "
                  f"max |d| {st['max_abs_diff']:.3f}, top-1 flips at margin > 0.05: {st['top1_flips_margin_gt_0.05']}, "
                  f"largest flipped margin {st['max_flipped_ref_margin']:.3f}")
        C.log(f"fp32 check took {t():.1f} s (logits saved as logits_fp32.<name>)")
        del model32

    from safetensors.torch import save_file

    save_file(tensors, os.path.join(args.out_dir, "reference.safetensors"), metadata={"format": "pt"})
    meta = {
        "prompts": prompts,
        "positions": P,
        "vocab_size": vocab,
        "image_token_id": image_token,
        "image": {"file": IMAGE_NAME, "width": IMAGE_W, "height": IMAGE_H,
                  "pixel_values_shape": list(pv.shape), "image_sizes": sizes.tolist(),
                  "image_sizes_shape": list(sizes.shape),
                  "tokens_model": n_model, "tokens_processor": n_proc},
        "image_tokens": n_model,
        "hf_image_forward_ms": fwd_ms,
        "hf_image_forward_runs_ms": times,
        "checkpoint": os.path.abspath(args.ckpt_dir),
        "dtype": C.DTYPE_NAMES[dtype],
        "attn_implementation": args.attn,
        "device": C.device_name(device),
        "seed": args.seed,
        "image_seed": args.image_seed,
        "versions": C.versions(),
    }
    text = json.dumps(meta, indent=1)
    # one line per list of numbers (the id lists are ~3000 long)
    text = re.sub(r"\[[-0-9.,e\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    with open(os.path.join(args.out_dir, "prompts.json"), "w") as f:
        f.write(text + "\n")
    C.log(f"wrote {args.out_dir}/prompts.json, reference.safetensors, {IMAGE_NAME}")


if __name__ == "__main__":
    main()
