#!/usr/bin/env python3
"""Builds the config-variant fixtures of issue 18 ("load the real R-4B however HF saved it").

Pinned: torch==2.11.0, transformers==5.17.0, pillow==12.3.0 (versions recorded in every hf.json).
Optionally transformers==4.57.1 in a separate folder (TF4_PATH) for the `config.tf4.json` forms.

For every variant directory under OUT/variants/<name>/ it writes

  config.json                  the class-default diff: only what differs from the default of each
                               config class (LlavaOnevisionConfig / RConfig, Qwen3Config,
                               SiglipVisionConfig), as older save_pretrained and llava-hf checkpoints
                               leave it. transformers itself must resolve it to the full form (checked).
  config.save_pretrained.json  what transformers 5.17 `save_pretrained` writes (its own diff form).
  config.tf4.json              what transformers 4.57.1 `save_pretrained` writes (legacy keys such as
                               `rope_theta`), when TF4_PATH is given.
  config.full.json             `to_dict()`: every field.
  model.safetensors            from `save_pretrained` (transformers 5.17 names), for served variants.
  preprocessor_config.json     from the image processor's `save_pretrained`.
  hf.json                      what transformers resolved: `AutoConfig.from_pretrained(dir).to_dict()`
                               (identical for every form, checked), the image processor's dict, and what
                               HF does with the variant (logits, errors, which head it used).
  hf_logits.safetensors        the last rows of HF's logits for a prompt with one image.

plus OUT/variants/full-size/ (R-4B's shapes, config forms only) and OUT/variants/resample_views.json
(sha256 of the uint8 views the PIL image processor makes for each resample code 0-5).

The tiny model: Qwen3 (vocab 320, hidden 16, 2 layers, 2 heads / 1 KV head, head_dim 128 = the
Qwen3Config default, so the diff form leaves it out) + SigLIP (384 px, patch 14, width 8, 3 layers)
+ R-4B's projector (vLLM rvl.py). `<image>` = 261 as in the embedded tokenizer.

Usage: python3 tests/reference/make_variants.py [OUT_DIR]        (default tests/fixtures)
       TF4_PATH=/path/to/transformers-4.57.1-target python3 tests/reference/make_variants.py
"""
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.activations import ACT2FN

if not transformers.__version__.startswith("4."):
    # transformers 5 only (the TF4_PATH run writes configs and needs none of these).
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "pillow": "12.3.0"}
IMAGE_TOKEN = 261
TAIL = 6  # logits rows recorded (the last prompt positions)
TILE = 384
SMALL_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384]]
GRID3_PINPOINTS = [[a * TILE, b * TILE] for a in range(1, 4) for b in range(1, 4)]
DEFAULT_PINPOINTS = LlavaOnevisionConfig().image_grid_pinpoints


class RConfig(LlavaOnevisionConfig):
    """Stand-in for R-4B's remote `configuration_r.RConfig`: LLaVA-OneVision's fields under model_type `rvl`."""

    model_type = "rvl"


class RProjector(nn.Module):
    """R-4B's projector (vLLM rvl.py): pre_norm LayerNorm(eps 1e-6) -> linear_1 -> GELU -> linear_2.
    `in_dim` is the width of the selected vision features (hidden x number of feature layers)."""

    def __init__(self, in_dim, text_hidden):
        super().__init__()
        self.pre_norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.linear_1 = nn.Linear(in_dim, text_hidden, bias=True)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)

    def forward(self, image_features):
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


class RForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with R-4B's projector, registered under the architecture name vLLM uses."""

    config_class = RConfig

    def __init__(self, config):
        super().__init__(config)
        layers = config.vision_feature_layer
        n = len(layers) if isinstance(layers, list) else 1
        self.model.multi_modal_projector = RProjector(
            n * config.vision_config.hidden_size, config.text_config.hidden_size
        )
        self.post_init()


AutoConfig.register("rvl", RConfig)
ARCH = {"r": "RForConditionalGeneration", "llava": "LlavaOnevisionForConditionalGeneration"}

# name -> overrides of the base variant. `names`: "r" (RForConditionalGeneration / rvl) or "llava".
VARIANTS = {
    "untied": {},
    "tied": {"tie": True, "names": "llava"},
    "feature-layer-list": {"feature_layer": [-1, -3]},
    "strategy-default": {"strategy": "default", "weights": False},
    "pinpoints-preprocessor": {"pinpoints": None, "pre_pinpoints": DEFAULT_PINPOINTS},
    "pinpoints-preprocessor-other": {"pinpoints": None, "pre_pinpoints": GRID3_PINPOINTS, "weights": False},
    "resample-1": {"resample": 1},
    "resample-2": {"resample": 2},
    "tied-stored-head": {"tie": True, "store_head": True},
}
BASE = {"tie": False, "names": "r", "feature_layer": -1, "strategy": "full", "pinpoints": SMALL_PINPOINTS,
        "pre_pinpoints": SMALL_PINPOINTS, "resample": 3, "weights": True, "store_head": False}


def tiny_configs(v, tf4=False):
    """(text kwargs, vision kwargs, composite kwargs) of a variant; `tf4`: transformers 4 spelling."""
    text = dict(vocab_size=320, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=128, rms_norm_eps=1e-6,
                max_position_embeddings=4096, tie_word_embeddings=v["tie"], hidden_act="silu",
                bos_token_id=256, eos_token_id=258)
    if tf4:
        text["rope_theta"] = 1000000.0
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                  image_size=TILE, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    top = dict(image_token_index=IMAGE_TOKEN, video_token_index=IMAGE_TOKEN + 1,
               vision_feature_layer=v["feature_layer"], vision_feature_select_strategy=v["strategy"],
               vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
               multimodal_projector_bias=True)
    if v["pinpoints"] is not None:
        top["image_grid_pinpoints"] = v["pinpoints"]
    return text, vision, top


def full_size_configs(tf4=False):
    """R-4B's shapes (r4b-model.md §1.2) as the composite's kwargs."""
    text = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu",
                bos_token_id=151643, eos_token_id=151645)
    if tf4:
        text["rope_theta"] = 1000000.0
    else:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                  image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    top = dict(image_token_index=151669, video_token_index=151670, vision_feature_layer=-1,
               vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return text, vision, top


def build_config(cls, text, vision, top, tie):
    cfg = cls(text_config=Qwen3Config(**text).to_dict(), vision_config=SiglipVisionConfig(**vision).to_dict(),
              tie_word_embeddings=tie, **top)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "eager"
    return cfg


def class_default_diff(cfg):
    """Only what differs from each config class's own defaults (+ model_type of the nested configs)."""
    full = cfg.to_dict()
    out = {}
    top_default = type(cfg)().to_dict()
    for key, value in full.items():
        if key in ("text_config", "vision_config"):
            sub = getattr(cfg, key)
            sub_default = type(sub)().to_dict()
            diff = {k: v for k, v in value.items()
                    if k not in ("transformers_version", "_name_or_path") and sub_default.get(k, object()) != v}
            diff["model_type"] = value["model_type"]
            # Derived from num_hidden_layers; transformers recomputes it.
            diff.pop("layer_types", None)
            out[key] = diff
        elif key in ("transformers_version", "_name_or_path"):
            continue
        elif key == "model_type" or top_default.get(key, object()) != value:
            out[key] = value
    return out


def save_tf4_config(dirpath, kind, name):
    """Runs this script under transformers 4.57.1 (TF4_PATH) to write config.tf4.json."""
    tf4 = os.environ.get("TF4_PATH")
    if not tf4:
        return None
    env = dict(os.environ, PYTHONPATH=tf4)
    out = subprocess.run([sys.executable, __file__, "--tf4-config", kind, name, dirpath], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout.strip()


def tf4_mode(kind, name, dirpath):
    """Under transformers 4.x: the same config, saved by its save_pretrained."""
    import tempfile

    v = dict(BASE, **VARIANTS.get(name, {}))
    text, vision, top = full_size_configs(tf4=True) if kind == "full" else tiny_configs(v, tf4=True)
    tie = False if kind == "full" else v["tie"]
    cfg = LlavaOnevisionConfig(text_config=Qwen3Config(**text).to_dict(),
                               vision_config=SiglipVisionConfig(**vision).to_dict(),
                               tie_word_embeddings=tie, **top)
    cfg.architectures = [ARCH[v["names"]]]
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        d = json.load(open(os.path.join(tmp, "config.json")))
    if v["names"] == "r":
        d["model_type"] = "rvl"
    with open(os.path.join(dirpath, "config.tf4.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    print(transformers.__version__)


def write_forms(dirpath, cfg, kind, name):
    """config.json (class-default diff), config.save_pretrained.json, config.full.json, config.tf4.json;
    returns transformers' resolution of them (all must agree) and the 4.x version used."""
    import shutil
    import tempfile

    forms = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        forms["config.save_pretrained.json"] = json.load(open(os.path.join(tmp, "config.json")))
    forms["config.full.json"] = cfg.to_dict()
    forms["config.json"] = class_default_diff(cfg)
    for fname, d in forms.items():
        with open(os.path.join(dirpath, fname), "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
    tf4_version = save_tf4_config(dirpath, kind, name)
    resolved = None
    for fname in ["config.json", "config.save_pretrained.json", "config.full.json"] + (
            ["config.tf4.json"] if tf4_version else []):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(os.path.join(dirpath, fname), os.path.join(tmp, "config.json"))
            d = AutoConfig.from_pretrained(tmp).to_dict()
        for k in ("_name_or_path", "transformers_version", "dtype"):
            d.pop(k, None)
            for sub in ("text_config", "vision_config"):
                d[sub].pop(k, None)
        if resolved is None:
            resolved = d
        elif d != resolved:
            diff = {k: (d.get(k), resolved.get(k)) for k in set(d) | set(resolved) if d.get(k) != resolved.get(k)}
            raise RuntimeError(f"{dirpath}/{fname} resolves differently: {diff}")
    return resolved, tf4_version


def init_weights(model):
    """Every parameter O(1) so activations and logits are well conditioned."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("image_newline"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)


def image_processor(v):
    return LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=v["resample"],
                                           image_grid_pinpoints=v["pre_pinpoints"])


def token_count(ip, w, h):
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = ip
    proc.num_image_tokens = 729
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = "anyres_max_9"
    return proc._get_number_of_features(h, w, ip.size["height"], ip.size["width"])


@torch.no_grad()
def image_logits(model, ip, image, rng):
    """HF logits (last TAIL rows) of `text + <image>*N + text` and the prompt ids."""
    out = ip(images=[image], return_tensors="pt")
    n = token_count(ip, image.width, image.height)
    ids = [int(x) for x in rng.integers(0, 256, size=5)] + [IMAGE_TOKEN] * n + [
        int(x) for x in rng.integers(0, 256, size=4)]
    input_ids = torch.tensor([ids])
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                   pixel_values=out["pixel_values"], image_sizes=out["image_sizes"]).logits[0]
    return ids, logits[-TAIL:]


def make_variant(out, name, image):
    v = dict(BASE, **VARIANTS[name])
    d = os.path.join(out, "variants", name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.remove(os.path.join(d, f))
    cls = RConfig if v["names"] == "r" else LlavaOnevisionConfig
    text, vision, top = tiny_configs(v)
    cfg = build_config(cls, text, vision, top, v["tie"])
    cfg.architectures = [ARCH[v["names"]]]
    torch.manual_seed(0)
    model = (RForConditionalGeneration if v["names"] == "r" else _llava_with_r_projector)(cfg)
    init_weights(model)
    model.eval()
    ip = image_processor(v)
    ip.save_pretrained(d)
    info = {"versions": versions(), "variant": name, "behaviour": {}}

    if v["store_head"]:
        # A head that differs from the embedding, stored although the config ties.
        with torch.no_grad():
            model.lm_head.weight = nn.Parameter(torch.randn(model.lm_head.weight.shape,
                                                            generator=torch.Generator().manual_seed(99)) * 0.25)
    if v["weights"]:
        if v["store_head"]:
            untied = build_config(cls, text, vision, top, False)
            untied.architectures = cfg.architectures
            model.config = untied
            model.save_pretrained(d)
            model.config = cfg
            os.remove(os.path.join(d, "config.json"))
        else:
            model.save_pretrained(d)
        for f in ("generation_config.json",):
            if os.path.exists(os.path.join(d, f)):
                os.remove(os.path.join(d, f))
        info["stored_tensors"] = sorted(load_file(os.path.join(d, "model.safetensors")).keys())
    resolved, tf4 = write_forms(d, cfg, "tiny", name)
    info["config"] = resolved
    info["image_processor"] = {k: v2 for k, v2 in LlavaOnevisionImageProcessorPil.from_pretrained(d).to_dict().items()
                               if k in ("resample", "image_grid_pinpoints", "image_mean", "image_std",
                                        "rescale_factor", "size")}
    if tf4:
        info["versions"]["transformers_tf4_forms"] = tf4

    rng = np.random.default_rng(11)
    tensors = {}
    if v["store_head"]:
        # What transformers 5.17 does when the config ties but a different lm_head is stored.
        reloaded = RForConditionalGeneration.from_pretrained(d)
        reloaded.eval()
        tied = reloaded.lm_head.weight.data_ptr() == reloaded.model.language_model.embed_tokens.weight.data_ptr()
        same_as_stored = torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
        info["behaviour"]["hf_head"] = "embed_tokens" if tied else (
            "lm_head.weight" if same_as_stored else "other")
    elif name == "pinpoints-preprocessor-other":
        # The processor tiles with preprocessor_config's list, the model packs with config's (class default).
        sizes = [(1280, 720), (1000, 400), (260, 190)]
        info["behaviour"]["grids"] = []
        for (w, h) in sizes:
            im = make_image(w, h, 3)
            views = ip(images=[im], return_tensors="pt")["pixel_values"].shape[1]
            from transformers.image_processing_utils import select_best_resolution
            model_best = select_best_resolution((h, w), cfg.image_grid_pinpoints)
            err = None
            try:
                image_logits(model, ip, im, rng)
            except Exception as e:  # noqa: BLE001 - recording HF's failure is the point
                err = f"{type(e).__name__}: {e}"
            info["behaviour"]["grids"].append({"width": w, "height": h, "processor_views": int(views),
                                               "model_pinpoint": list(model_best), "hf_error": err})
    elif v["strategy"] == "default":
        try:
            image_logits(model, ip, image, rng)
            info["behaviour"]["hf_image_error"] = None
        except Exception as e:  # noqa: BLE001
            info["behaviour"]["hf_image_error"] = f"{type(e).__name__}: {e}"
    else:
        # Reload from disk so the logits are those of the saved checkpoint and config.
        reloaded = (RForConditionalGeneration if v["names"] == "r" else _llava_with_r_projector).from_pretrained(d)
        reloaded.eval()
        ids, logits = image_logits(reloaded, ip, image, rng)
        info["prompt"] = {"input_ids": ids, "image": "img_260x190.png", "tail": TAIL}
        tensors["image.logits_tail"] = logits.contiguous()
        info["behaviour"]["hf_head"] = (
            "embed_tokens"
            if reloaded.lm_head.weight.data_ptr() == reloaded.model.language_model.embed_tokens.weight.data_ptr()
            else "lm_head.weight")
    if tensors:
        save_file(tensors, os.path.join(d, "hf_logits.safetensors"))
    with open(os.path.join(d, "hf.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    print(name, json.dumps(info["behaviour"])[:300], flush=True)


class _LlavaWithRProjector(LlavaOnevisionForConditionalGeneration):
    """The same model under the LLaVA-OneVision names (architectures / model_type)."""

    def __init__(self, config):
        super().__init__(config)
        layers = config.vision_feature_layer
        n = len(layers) if isinstance(layers, list) else 1
        self.model.multi_modal_projector = RProjector(
            n * config.vision_config.hidden_size, config.text_config.hidden_size
        )
        self.post_init()


_LlavaWithRProjector.__name__ = "LlavaOnevisionForConditionalGeneration"
_llava_with_r_projector = _LlavaWithRProjector


def make_full_size(out):
    d = os.path.join(out, "variants", "full-size")
    os.makedirs(d, exist_ok=True)
    text, vision, top = full_size_configs()
    cfg = build_config(RConfig, text, vision, top, False)
    cfg.architectures = ["RForConditionalGeneration"]
    resolved, tf4 = write_forms(d, cfg, "full", "full-size")
    info = {"versions": versions(), "variant": "full-size", "config": resolved}
    if tf4:
        info["versions"]["transformers_tf4_forms"] = tf4
    with open(os.path.join(d, "hf.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    print("full-size", resolved["text_config"]["num_hidden_layers"], flush=True)


def make_image(w, h, seed):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(xx / 23.0 + seed) * np.cos(yy / 31.0)
    gch = 127.5 + 127.5 * np.sin((xx + yy) / 17.0 + 2 * seed)
    b = (xx * 3 + yy * 5 + seed * 40) % 256
    return Image.fromarray(np.stack([r, gch, b], axis=-1).round().clip(0, 255).astype(np.uint8), "RGB")


def resample_views(out, fixtures):
    """sha256 of every uint8 view (HWC RGB) the PIL image processor makes, per resample code."""
    images = ["img_260x190.png", "img_500x300.png", "img_150x330.png"]
    result = {"versions": versions(), "pinpoints": DEFAULT_PINPOINTS, "tile": TILE, "cases": []}
    for code in range(6):
        ip = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=code,
                                             image_grid_pinpoints=DEFAULT_PINPOINTS)
        for fname in images:
            im = Image.open(os.path.join(fixtures, fname)).convert("RGB")
            chw = np.array(im).transpose(2, 0, 1)
            views = ip.get_image_patches(chw, DEFAULT_PINPOINTS, size=(TILE, TILE), patch_size=TILE,
                                         resample=code)
            # The views are what the processor normalises: check against its own output.
            pv = ip(images=[im], return_tensors="np")["pixel_values"][0]
            back = np.stack([((p.astype(np.float64) / 255.0 - 0.5) / 0.5) for p in views]).astype(np.float32)
            assert pv.shape == back.shape and np.abs(pv - back).max() < 1e-6, (code, fname)
            result["cases"].append({
                "resample": code, "image": fname, "views": len(views),
                "sha256": [hashlib.sha256(np.ascontiguousarray(p.transpose(1, 2, 0)).tobytes()).hexdigest()
                           for p in views],
            })
    with open(os.path.join(out, "variants", "resample_views.json"), "w") as f:
        json.dump(result, f, indent=1)


def versions():
    import PIL

    return {"torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--tf4-config":
        tf4_mode(*sys.argv[2:5])
        return
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    for k, want in PINNED.items():
        have = versions()[k]
        if not have.startswith(want):
            print(f"warning: {k} {have} (pinned {want})", file=sys.stderr)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    image = Image.open(os.path.join(out, "img_260x190.png")).convert("RGB")
    for name in VARIANTS:
        make_variant(out, name, image)
    make_full_size(out)
    resample_views(out, out)
    print("wrote", os.path.join(out, "variants"))


if __name__ == "__main__":
    main()
