"""Shared helpers of the one-shot GPU benchmark scripts (bench/gpu/*.py); not a script itself.

The model is built exactly like tests/reference/make_fixtures.py does it: transformers'
LlavaOnevisionForConditionalGeneration (SigLIP tower + Qwen3 decoder) with the projector swapped
for R-4B's RProjector (imported from make_fixtures.py, not copied).

Checkpoint layout written by make_checkpoint.py (the real R-4B / transformers-4.5x names):
`model.language_model.*`, `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`,
`model.image_newline`, `lm_head.weight`. transformers 5 itself names the tower's tensors without
the `vision_model.` segment; `to_checkpoint_name` / `from_checkpoint_name` translate.
"""
import contextlib
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "reference"))

import make_fixtures  # noqa: E402  (RProjector, preprocess, processor_token_count)
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen3Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (  # noqa: E402
    LlavaOnevisionImageProcessorPil,
)

RProjector = make_fixtures.RProjector

# Token ids of the real Qwen3 vocabulary (r4b-model.md §4) plus R-4B's <image>/<video>.
VOCAB_SIZE = 151936
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
THINK_OPEN_ID = 151667
THINK_CLOSE_ID = 151668
IMAGE_TOKEN_ID = 151669
VIDEO_TOKEN_ID = 151670
# Largest id (exclusive) used for random "text" tokens: below every special/added token.
TEXT_ID_LIMIT = 151000

# (content, special) in id order from 151643; special flags as in Qwen3's tokenizer_config.json.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
    ("<image>", True),
    ("<video>", True),
]
assert ENDOFTEXT_ID + len(ADDED_TOKENS) - 1 == VIDEO_TOKEN_ID

PINPOINTS = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def log(*args):
    print(*args, flush=True)


def versions():
    import PIL
    import numpy
    import safetensors
    import tokenizers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

def make_config(tiny=False):
    """R-4B's config (r4b-model.md §1.2); `tiny` keeps every id/vocab/vision-geometry value and
    shrinks only the widths and depths."""
    if tiny:
        t = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=16)
        v = dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4)
    else:
        t = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128)
        v = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
    text = Qwen3Config(
        vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu",
        attention_bias=False, use_sliding_window=False,
        bos_token_id=ENDOFTEXT_ID, eos_token_id=IM_END_ID, **t,
    )
    vision = SiglipVisionConfig(
        image_size=384, patch_size=14, num_channels=3, hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6, vision_use_head=False, **v,
    )
    cfg = LlavaOnevisionConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS,
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    return cfg


def config_json(cfg, dtype):
    d = cfg.to_dict()
    d["architectures"] = ["RForConditionalGeneration"]
    d["torch_dtype"] = DTYPE_NAMES[dtype]
    d["dtype"] = DTYPE_NAMES[dtype]
    return d


def preprocessor_json(cfg):
    """Same fields as tests/fixtures/tiny-r4b/preprocessor_config.json."""
    return {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "resample": 3, "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "size": {"height": 384, "width": 384},
        "image_grid_pinpoints": cfg.image_grid_pinpoints,
    }


def load_config(ckpt_dir, attn="sdpa"):
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        d = json.load(f)
    for k in ("architectures", "torch_dtype", "dtype", "_name_or_path", "transformers_version", "model_type"):
        d.pop(k, None)
    cfg = LlavaOnevisionConfig.from_dict(d)
    set_attn(cfg, attn)
    return cfg


def set_attn(cfg, attn):
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

def build_model(cfg, device, dtype, init=True):
    """LlavaOnevisionForConditionalGeneration with R-4B's projector, created directly on `device`
    in `dtype` (no CPU fp32 detour). `init=False` skips weight init (weights are loaded next)."""
    ctx = contextlib.ExitStack()
    with ctx:
        ctx.enter_context(torch.device(device))
        ctx.enter_context(default_dtype(dtype))
        if not init:
            from transformers.initialization import no_init_weights

            ctx.enter_context(no_init_weights())
        model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=dtype)
        proj = RProjector(cfg.vision_config.hidden_size, cfg.text_config.hidden_size)
        if init:
            std = cfg.text_config.initializer_range
            with torch.no_grad():
                for lin in (proj.linear_1, proj.linear_2):
                    lin.weight.normal_(0.0, std)
                    lin.bias.zero_()
                proj.pre_norm.weight.fill_(1.0)
                proj.pre_norm.bias.zero_()
        model.model.multi_modal_projector = proj
    model.eval()
    return model


def scale_lm_head(model, cfg, full_hidden=2560):
    """With HF's init (std 0.02) the logits' spread grows with sqrt(hidden): ~1.0 at 2560 but
    ~0.16 for the tiny model, whose top-1 margins would then all sit below compare.py's 0.05
    threshold. Scale lm_head so every size has the full model's logit spread (no-op at 2560)."""
    factor = math.sqrt(full_hidden / cfg.text_config.hidden_size)
    if factor != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(factor)
    return factor


def perturb_vectors(model, seed):
    """HF's init leaves every norm weight at 1 and most biases at 0, so a port that forgot to
    apply one would still match. Nudge them: norm weights += N(0, 0.1), biases += N(0, 0.02)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 1 or name.endswith("image_newline"):
                continue
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            scale = 0.02 if name.endswith("bias") else 0.1
            p.add_((noise * scale).to(p.dtype))


VT_HF = "model.vision_tower."
VT_CKPT = "model.vision_tower.vision_model."


def to_checkpoint_name(hf_name):
    if hf_name.startswith(VT_HF) and not hf_name.startswith(VT_CKPT):
        return VT_CKPT + hf_name[len(VT_HF):]
    return hf_name


def from_checkpoint_name(name):
    if name.startswith(VT_CKPT):
        return VT_HF + name[len(VT_CKPT):]
    return name


def checkpoint_files(ckpt_dir):
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return sorted(set(wm.values()))
    return ["model.safetensors"]


def load_model(ckpt_dir, device, dtype, attn="sdpa"):
    """Builds the HF model from CKPT_DIR/config.json and loads every tensor of the checkpoint
    (sharded or single-file; tower names with or without `vision_model.`). Strict: a missing or
    unexpected tensor is an error."""
    from safetensors import safe_open

    cfg = load_config(ckpt_dir, attn)
    model = build_model(cfg, device, dtype, init=False)
    params = dict(model.state_dict(keep_vars=True))
    loaded = set()
    for fname in checkpoint_files(ckpt_dir):
        with safe_open(os.path.join(ckpt_dir, fname), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = from_checkpoint_name(key)
                if name not in params:
                    raise KeyError(f"{fname}: unexpected tensor {key}")
                t = f.get_tensor(key)
                p = params[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{key}: shape {tuple(t.shape)} != model {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(device=p.device, dtype=p.dtype))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    model.eval()
    return model, cfg


def param_count(model):
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

def make_image(w, h, seed):
    """Deterministic RGB image: smooth gradients + sinusoids + Gaussian noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * xx / max(w - 1, 1)
    g = 255.0 * yy / max(h - 1, 1)
    b = 127.5 + 110.0 * np.sin(xx / 37.0 + seed) * np.cos(yy / 53.0)
    arr = np.stack([r, g, b], axis=-1) + rng.normal(0.0, 12.0, size=(h, w, 3))
    return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8), "RGB")


def image_processor(ckpt_dir):
    """The HF PIL image processor configured from CKPT_DIR/preprocessor_config.json."""
    with open(os.path.join(ckpt_dir, "preprocessor_config.json")) as f:
        pc = json.load(f)
    kw = {}
    for k in ("image_mean", "image_std", "image_grid_pinpoints", "rescale_factor", "do_convert_rgb"):
        if k in pc:
            kw[k] = pc[k]
    if "size" in pc:
        kw["size"] = pc["size"]
    if "resample" in pc:
        from transformers.image_utils import PILImageResampling

        kw["resample"] = PILImageResampling(pc["resample"])
    return LlavaOnevisionImageProcessorPil(**kw)


def preprocess(ip, images):
    return make_fixtures.preprocess(ip, images)


def processor_token_count(ip, w, h):
    return make_fixtures.processor_token_count(ip, w, h)


@torch.no_grad()
def model_image_token_count(model, cfg, pv, sizes):
    feats = model.model.get_image_features(
        pixel_values=pv, image_sizes=sizes, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        vision_aspect_ratio=cfg.vision_aspect_ratio,
    ).pooler_output
    return [int(f.shape[0]) for f in feats]


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self):
        return time.perf_counter() - self.t0


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0
    return str(n)

