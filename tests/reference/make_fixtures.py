#!/usr/bin/env python3
"""Builds the reference fixtures for r4b-serve's model tests, from transformers' own classes.

Pinned: torch==2.11.0, transformers==5.17.0, pillow (version recorded in reference.json), safetensors,
numpy. CPU, float32.

It creates a tiny random model with R-4B's architecture (LLaVA-OneVision = SigLIP vision tower +
Qwen3 decoder, with R-4B's projector: LayerNorm -> Linear -> GELU(erf) -> Linear, see vLLM rvl.py),
saves it in the HF checkpoint layout (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.image_newline`, `lm_head.weight`), and records:

  * reference logits + 32 greedy tokens for a text prompt, one 500x300 image, two images;
  * the tiled uint8 views the HF image processor (PIL backend, bicubic) produced for the 500x300 image;
  * image-token counts from the HF processor and the packed feature length from the HF model, for many sizes;
  * the text-prompt logits of the same model with a tied lm_head.

Usage: python3 tests/reference/make_fixtures.py OUT_DIR   (default tests/fixtures)
"""
import json
import math
import os
import sys

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.activations import ACT2FN
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

PINNED = {"torch": "2.11.0", "transformers": "5.17.0"}
IMAGE_TOKEN = 1000
STEPS = 32
# (W, H): the sizes whose image-token count is recorded.
COUNT_SIZES = [
    (1, 1), (14, 14), (384, 384), (640, 480), (480, 640), (1920, 1080), (4032, 3024),
    (10000, 20), (20, 10000), (500, 300), (1024, 768), (1280, 720), (383, 385), (100, 3000),
    (2304, 2304), (777, 333),
]


class RProjector(nn.Module):
    """R-4B's projector (vLLM rvl.py): pre_norm LayerNorm(eps 1e-6) -> linear_1 -> GELU -> linear_2."""

    def __init__(self, vision_hidden, text_hidden):
        super().__init__()
        self.pre_norm = nn.LayerNorm(vision_hidden, eps=1e-6)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.act = ACT2FN["gelu"]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)

    def forward(self, image_features):
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


def build_model():
    text = Qwen3Config(
        vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=16, num_key_value_heads=8, head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=8192, tie_word_embeddings=False, hidden_act="silu",
    )
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    cfg = LlavaOnevisionConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        image_token_index=IMAGE_TOKEN, video_token_index=IMAGE_TOKEN + 1,
        vision_feature_layer=-2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    cfg.vision_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(cfg)
    model.model.multi_modal_projector = RProjector(32, 64)
    # Re-initialise every parameter so activations and logits are O(1) (greedy margins stay wide).
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("image_newline"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "embed_tokens" in name or "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return model


def make_image(w, h, seed):
    """Deterministic smooth RGB image (compresses well as PNG)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(xx / 23.0 + seed) * np.cos(yy / 31.0)
    gch = 127.5 + 127.5 * np.sin((xx + yy) / 17.0 + 2 * seed)
    b = (xx * 3 + yy * 5 + seed * 40) % 256
    arr = np.stack([r, gch, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def processor_token_count(image_processor, w, h):
    """Counts `<image>` tokens the way LlavaOnevisionProcessor expands them."""
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = image_processor
    proc.num_image_tokens = 729
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = "anyres_max_9"
    size = image_processor.size
    return proc._get_number_of_features(h, w, size["height"], size["width"])


def preprocess(ip, images):
    """Each image preprocessed on its own (anyres for every image, as vLLM's R-4B path does)."""
    outs = [ip(images=[im], return_tensors="pt") for im in images]
    n = max(o["pixel_values"].shape[1] for o in outs)
    pv = torch.zeros(len(images), n, 3, 384, 384)
    for i, o in enumerate(outs):
        pv[i, : o["pixel_values"].shape[1]] = o["pixel_values"][0]
    sizes = torch.cat([o["image_sizes"] for o in outs], dim=0)
    return pv, sizes, outs


@torch.no_grad()
def run_prompt(model, ids, pv=None, sizes=None):
    input_ids = torch.tensor([ids])
    kw = {}
    if pv is not None:
        kw = {"pixel_values": pv, "image_sizes": sizes}
    full = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kw).logits[0]
    gen = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=STEPS,
        min_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True,
        eos_token_id=None, pad_token_id=0, **kw,
    )
    tokens = gen.sequences[0, len(ids):].tolist()
    step_logits = torch.stack([l[0] for l in gen.logits])
    return full, tokens, step_logits


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    for k, v in PINNED.items():
        have = {"torch": torch.__version__, "transformers": transformers.__version__}[k]
        if not have.startswith(v):
            print(f"warning: {k} {have} (pinned {v})", file=sys.stderr)
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    ckpt = os.path.join(out, "tiny-r4b")
    os.makedirs(ckpt, exist_ok=True)
    model = build_model()
    cfg = model.config

    # --- checkpoint in the HF layout -------------------------------------------------------
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(ckpt, "model.safetensors"), metadata={"format": "pt"})
    cfg_dict = cfg.to_dict()
    cfg_dict["architectures"] = ["RForConditionalGeneration"]
    cfg_dict["torch_dtype"] = "float32"
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
    ip = LlavaOnevisionImageProcessorPil(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        image_grid_pinpoints=cfg.image_grid_pinpoints,
    )
    with open(os.path.join(ckpt, "preprocessor_config.json"), "w") as f:
        json.dump({
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "resample": 3, "rescale_factor": 1 / 255, "do_convert_rgb": True,
            "size": {"height": 384, "width": 384},
            "image_grid_pinpoints": cfg.image_grid_pinpoints,
        }, f, indent=2)

    import PIL

    ref = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "pillow": PIL.__version__},
           "image_token_index": IMAGE_TOKEN, "steps": STEPS, "prompts": {}}
    tensors = {}
    rng = np.random.default_rng(7)

    def text_ids(n):
        return [int(x) for x in rng.integers(0, IMAGE_TOKEN, size=n)]

    # --- 1. text prompt -----------------------------------------------------------------------
    ids = text_ids(20)
    full, toks, steps = run_prompt(model, ids)
    ref["prompts"]["text"] = {"input_ids": ids, "greedy": toks, "images": []}
    tensors["text.prompt_logits"] = full
    tensors["text.step_logits"] = steps

    # --- 2. one non-square image (500x300) ----------------------------------------------------
    img1 = make_image(500, 300, 1)
    img1.save(os.path.join(out, "img_500x300.png"))
    pv, sizes, outs = preprocess(ip, [img1])
    n1 = processor_token_count(ip, 500, 300)
    ids = text_ids(5) + [IMAGE_TOKEN] * n1 + text_ids(7)
    full, toks, steps = run_prompt(model, ids, pv, sizes)
    ref["prompts"]["image"] = {"input_ids": ids, "greedy": toks, "images": ["img_500x300.png"]}
    tensors["image.prompt_logits_tail"] = full[-8:]
    tensors["image.step_logits"] = steps
    # the uint8 views the processor made (pixel = (v * 0.5 + 0.5) * 255), as PNGs
    views = outs[0]["pixel_values"][0]
    for i in range(views.shape[0]):
        u8 = ((views[i].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255.0).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(u8, "RGB").save(os.path.join(out, f"img_500x300_view{i}.png"))
    ref["prompts"]["image"]["views"] = int(views.shape[0])

    # --- 3. two images of different sizes in one prompt ---------------------------------------
    img2 = make_image(260, 190, 2)
    img3 = make_image(150, 330, 3)
    img2.save(os.path.join(out, "img_260x190.png"))
    img3.save(os.path.join(out, "img_150x330.png"))
    pv, sizes, _ = preprocess(ip, [img2, img3])
    n2 = processor_token_count(ip, 260, 190)
    n3 = processor_token_count(ip, 150, 330)
    ids = text_ids(4) + [IMAGE_TOKEN] * n2 + text_ids(3) + [IMAGE_TOKEN] * n3 + text_ids(6)
    full, toks, steps = run_prompt(model, ids, pv, sizes)
    ref["prompts"]["two_images"] = {"input_ids": ids, "greedy": toks,
                                    "images": ["img_260x190.png", "img_150x330.png"]}
    tensors["two_images.prompt_logits_tail"] = full[-8:]
    tensors["two_images.step_logits"] = steps

    # --- 4. image-token counts: processor formula and the model's packed length ----------------
    counts = []
    with torch.no_grad():
        for (w, h) in COUNT_SIZES:
            im = make_image(w, h, 5)
            pv, sizes, _ = preprocess(ip, [im])
            feats = model.model.get_image_features(
                pixel_values=pv, image_sizes=sizes, vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
            ).pooler_output
            counts.append({"width": w, "height": h, "processor": processor_token_count(ip, w, h),
                           "model": int(feats[0].shape[0]), "views": int(pv.shape[1])})
            print(counts[-1], flush=True)
    ref["image_token_counts"] = counts

    # --- 5. tied lm_head variant (text prompt only) --------------------------------------------
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
        ids = ref["prompts"]["text"]["input_ids"]
        input_ids = torch.tensor([ids])
        tensors["tied.text.prompt_logits"] = model(input_ids=input_ids).logits[0]

    save_file({k: v.contiguous().float() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
