#!/usr/bin/env python3
"""Writes a FULL-SIZE R-4B checkpoint with random weights (or a tiny one), servable by r4b-serve.

Usage:
  python3 bench/gpu/make_checkpoint.py OUT_DIR [--tiny] [--seed 0] [--dtype bf16]
         [--tokenizer-template DIR] [--max-shard-gb 5] [--device cuda|cpu] [--plain-hf-init]
  python3 bench/gpu/make_checkpoint.py OUT_DIR --dry-run   # meta device: counts + shard plan only

Model: transformers' LlavaOnevisionForConditionalGeneration (SigLIP so400m 26 layers, no head +
Qwen3-4B) with R-4B's RProjector (tests/reference/make_fixtures.py), built directly on the GPU in
the target dtype with HF's own init under a fixed seed, then
  * lm_head scaled to the full model's logit spread (a no-op at full size; see bench_common);
  * unless --plain-hf-init: norm weights += N(0, 0.1) and biases += N(0, 0.02), because HF's init
    leaves them at exactly 1 / 0 and would hide a port that forgets to apply them.

Files written to OUT_DIR:
  model-0000N-of-0000M.safetensors (<= --max-shard-gb each) + model.safetensors.index.json,
  names model.language_model.*, model.vision_tower.vision_model.*, model.multi_modal_projector.*,
  model.image_newline, lm_head.weight;
  config.json, preprocessor_config.json (fields as tests/fixtures/tiny-r4b/);
  tokenizer.json: byte-level BPE without merges (id b = byte b, so any UTF-8 round-trips), filler
    tokens 256..151642 (never produced by encoding; filler id k decodes to the text " x<k>"), then
    Qwen3's added tokens at their real ids 151643..151668 and <image>=151669, <video>=151670;
  tokenizer_config.json, generation_config.json: from --tokenizer-template DIR (the files r4b
    writes for its embedded model) with every token id rewritten to the real one; without a
    template, the same content is generated here (chat template = gateway/src/embedded.rs's).
"""
import argparse
import json
import os
import re
import sys

import torch

sys.dont_write_bytecode = True  # no __pycache__ in bench/gpu or tests/reference
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as C  # noqa: E402

# Same text as CHAT_TEMPLATE in gateway/src/embedded.rs (used when that file is not readable).
CHAT_TEMPLATE_FALLBACK = r"""{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + ' ' -}}
  {%- if message['content'] is string -%}
    {{- '\n' + message['content'] -}}
  {%- else -%}
    {%- for c in message['content'] if c['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}
    {%- for c in message['content'] if c['type'] == 'text' -%}{{- '\n' + c['text'] -}}{%- endfor -%}
  {%- endif -%}
  {{- '<|im_end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if thinking_mode == 'short' -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- elif thinking_mode == 'long' -%}
    {{- '<think>\n' -}}
  {%- endif -%}
{%- endif -%}"""


def embedded_chat_template():
    """CHAT_TEMPLATE from gateway/src/embedded.rs when the repo is there, else the copy above."""
    path = os.path.join(C.REPO, "gateway", "src", "embedded.rs")
    try:
        with open(path) as f:
            src = f.read()
        m = re.search(r'pub const CHAT_TEMPLATE: &str = r#"(.*?)"#;', src, re.S)
        if m:
            return m.group(1), path
    except OSError:
        pass
    return CHAT_TEMPLATE_FALLBACK, "built-in copy"


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------

def byte_level_chars():
    """GPT-2 byte-level alphabet: byte b -> the printable char that stands for it."""
    out, shifted = [], 0
    for b in range(256):
        if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            out.append(chr(b))
        else:
            shifted += 1
            out.append(chr(0xFF + shifted))
    return out


def filler_token(k):
    # "Ġ" is the byte-level char of a space: filler id k decodes to " x<k>".
    return "\u0120x" + str(k)


def build_tokenizer(added):
    """added: [(content, special)] in id order starting at ENDOFTEXT_ID."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = byte_level_chars()
    vocab = {c: b for b, c in enumerate(chars)}
    for k in range(256, C.ENDOFTEXT_ID):
        vocab[filler_token(k)] = k
    assert len(vocab) == C.ENDOFTEXT_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for want, (content, special) in enumerate(added, start=C.ENDOFTEXT_ID):
        t = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                       single_word=False)
        if special:
            tok.add_special_tokens([t])
        else:
            tok.add_tokens([t])
        got = tok.token_to_id(content)
        if got != want:
            raise RuntimeError(f"added token {content} got id {got}, expected {want}")
    assert tok.get_vocab_size(with_added_tokens=True) <= C.VOCAB_SIZE
    return tok


def check_tokenizer(tok):
    samples = ["", "hello world", "  two  spaces\n\ttab", "ünïcödé ✓ 日本語 🦀🦀", "a\u0000b\u007f"]
    for s in samples:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert ids == list(s.encode("utf-8")), (s, ids)
        assert tok.decode(ids, skip_special_tokens=False) == s, s
    ids = tok.encode("<|im_start|>user <image>\nx<|im_end|><think></think><|endoftext|><video>",
                     add_special_tokens=False).ids
    assert ids == [C.IM_START_ID, *b"user ", C.IMAGE_TOKEN_ID, *b"\nx", C.IM_END_ID,
                   C.THINK_OPEN_ID, C.THINK_CLOSE_ID, C.ENDOFTEXT_ID, C.VIDEO_TOKEN_ID], ids
    assert tok.decode([C.THINK_OPEN_ID, ord("a"), C.THINK_CLOSE_ID, C.IM_END_ID],
                      skip_special_tokens=True) == "<think>a</think>"
    assert tok.decode([300], skip_special_tokens=False) == " x300"


def added_decoder_entry(content, special):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def tokenizer_files(template_dir):
    """Returns (added token table, tokenizer_config dict, generation_config dict, notes)."""
    notes = []
    added = list(C.ADDED_TOKENS)
    new_id = {content: i for i, (content, _) in enumerate(added, start=C.ENDOFTEXT_ID)}
    if template_dir is None:
        template, src = embedded_chat_template()
        notes.append(f"no template dir: chat template from {src}")
        decoder = {str(i): added_decoder_entry(c, s)
                   for i, (c, s) in enumerate(added, start=C.ENDOFTEXT_ID)}
        tcfg = {
            "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
            "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "chat_template": template, "clean_up_tokenization_spaces": False,
            "model_max_length": 40960, "tokenizer_class": "Qwen2Tokenizer",
        }
        gcfg = {"bos_token_id": C.ENDOFTEXT_ID, "eos_token_id": [C.IM_END_ID, C.ENDOFTEXT_ID],
                "pad_token_id": C.ENDOFTEXT_ID}
        return added, tcfg, gcfg, notes

    with open(os.path.join(template_dir, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    gpath = os.path.join(template_dir, "generation_config.json")
    gcfg = {}
    if os.path.exists(gpath):
        with open(gpath) as f:
            gcfg = json.load(f)
    else:
        notes.append("template has no generation_config.json: writing eos [151645, 151643]")
        gcfg = {"bos_token_id": C.ENDOFTEXT_ID, "eos_token_id": [C.IM_END_ID, C.ENDOFTEXT_ID],
                "pad_token_id": C.ENDOFTEXT_ID}
    old = tcfg.get("added_tokens_decoder", {})
    id_map = {}
    flags = {}
    for old_id, entry in old.items():
        content = entry["content"]
        if content not in new_id:
            notes.append(f"template token {content!r} (id {old_id}) has no real id: dropped")
            continue
        id_map[int(old_id)] = new_id[content]
        flags[content] = entry
    added = [(c, bool(flags[c]["special"]) if c in flags else s) for c, s in added]
    tcfg["added_tokens_decoder"] = {
        str(i): {**added_decoder_entry(c, s), **({k: v for k, v in flags[c].items()} if c in flags else {})}
        for i, (c, s) in enumerate(added, start=C.ENDOFTEXT_ID)
    }
    if "model_max_length" in tcfg:
        tcfg["model_max_length"] = max(int(tcfg["model_max_length"]), 40960)

    def remap(key, v):
        if isinstance(v, bool) or not isinstance(v, int):
            return v
        if v in id_map:
            return id_map[v]
        notes.append(f"generation_config {key}={v} is not a template added-token id: kept")
        return v

    for key in list(gcfg):
        if key.endswith("token_id") or key.endswith("token_ids"):
            val = gcfg[key]
            gcfg[key] = [remap(key, x) for x in val] if isinstance(val, list) else remap(key, val)
    notes.append(f"template {template_dir}: ids remapped {sorted(id_map.items())}")
    return added, tcfg, gcfg, notes


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def shard_plan(named, max_bytes):
    """Greedy, in module order: [[(ckpt_name, tensor), ...], ...]."""
    shards, cur, cur_bytes = [], [], 0
    for name, t in named:
        nb = t.numel() * t.element_size()
        if cur and cur_bytes + nb > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, t))
        cur_bytes += nb
    if cur:
        shards.append(cur)
    return shards


def save_shards(shards, out_dir, dtype):
    from safetensors.torch import save_file

    m = len(shards)
    weight_map, total, written = {}, 0, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{m:05d}.safetensors"
        t = C.Timer()
        sd = {name: x.detach().to("cpu").contiguous() for name, x in shard}
        save_file(sd, os.path.join(out_dir, fname), metadata={"format": "pt"})
        size = os.path.getsize(os.path.join(out_dir, fname))
        written += size
        nbytes = sum(x.numel() * x.element_size() for x in sd.values())
        total += nbytes
        for name in sd:
            weight_map[name] = fname
        C.log(f"  {fname}: {len(sd)} tensors, {C.human_bytes(size)} in {t():.1f} s")
        del sd
    index = {"metadata": {"total_size": total,
                          "total_parameters": sum(x.numel() for s in shards for _, x in s)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return written


@torch.no_grad()
def logit_stats(model, device, seed):
    """A 32-token forward: logit spread and top-1 margins, to show logits are not near-equal."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, C.TEXT_ID_LIMIT, (1, 32), generator=g).to(device)
    logits = model(input_ids=ids, logits_to_keep=32).logits[0].float()
    top = logits.topk(2, dim=-1).values
    margin = top[:, 0] - top[:, 1]
    return {"std": logits.std().item(), "max_abs": logits.abs().max().item(),
            "margin_median": margin.median().item(),
            "frac_margin_gt_0.05": (margin > 0.05).float().mean().item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--tiny", action="store_true", help="small widths/depths, same ids and vocab")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tokenizer-template", default=None, metavar="DIR",
                    help="dir with the tokenizer_config.json / generation_config.json r4b writes "
                         "for its embedded model")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="max shard size, 1e9 bytes")
    ap.add_argument("--plain-hf-init", action="store_true",
                    help="keep HF's init exactly (norm weights 1, biases 0)")
    ap.add_argument("--dry-run", action="store_true",
                    help="build on the meta device, print counts and the shard plan, write nothing")
    args = ap.parse_args()

    total = C.Timer()
    dtype = C.DTYPES[args.dtype]
    device = torch.device("meta") if args.dry_run else C.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    C.log(f"versions {C.versions()}")
    C.log(f"building {'tiny' if args.tiny else 'full-size'} R-4B on {device} in {args.dtype}, seed {args.seed}")
    cfg = C.make_config(tiny=args.tiny)
    torch.manual_seed(args.seed)
    t = C.Timer()
    model = C.build_model(cfg, device, dtype, init=True)
    if not args.dry_run:
        factor = C.scale_lm_head(model, cfg)
        if factor != 1.0:
            C.log(f"lm_head scaled by {factor:.3f} (logit spread of the full model)")
        if not args.plain_hf_init:
            C.perturb_vectors(model, args.seed)
        C.sync(device)
    n_params = C.param_count(model)
    C.log(f"built in {t():.1f} s: {n_params:,} parameters")

    named = [(C.to_checkpoint_name(k), v) for k, v in model.state_dict().items()]
    assert not any(".head." in k for k, _ in named), "SigLIP pooling head must not be saved"
    shards = shard_plan(named, int(args.max_shard_gb * 1e9))
    for i, s in enumerate(shards, start=1):
        nb = sum(x.numel() * x.element_size() for _, x in s)
        C.log(f"  shard {i}/{len(shards)}: {len(s)} tensors, {nb:,} bytes ({s[0][0]} .. {s[-1][0]})")
    if args.dry_run:
        C.log(f"dry run: {len(named)} tensors, {n_params:,} parameters, "
              f"{sum(x.numel() * x.element_size() for _, x in named):,} bytes in {args.dtype}")
        return

    if device.type != "meta":
        stats = logit_stats(model, device, args.seed)
        C.log("logit check (32 random tokens): " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))

    os.makedirs(args.out_dir, exist_ok=True)
    for old in os.listdir(args.out_dir):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", old):
            os.remove(os.path.join(args.out_dir, old))
    t = C.Timer()
    written = save_shards(shards, args.out_dir, dtype)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(C.config_json(cfg, dtype), f, indent=2, sort_keys=True)
    with open(os.path.join(args.out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(C.preprocessor_json(cfg), f, indent=2)

    added, tcfg, gcfg, notes = tokenizer_files(args.tokenizer_template)
    for n in notes:
        C.log("tokenizer: " + n)
    tok = build_tokenizer(added)
    check_tokenizer(tok)
    tok.save(os.path.join(args.out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(args.out_dir, "generation_config.json"), "w") as f:
        json.dump(gcfg, f, indent=2)
    for name in ("config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"):
        written += os.path.getsize(os.path.join(args.out_dir, name))
    C.log(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens (model rows {C.VOCAB_SIZE})")
    C.log(f"wrote {args.out_dir}: {n_params:,} parameters, {written:,} bytes ({C.human_bytes(written)}), "
          f"save {t():.1f} s, total {total():.1f} s")


if __name__ == "__main__":
    main()
