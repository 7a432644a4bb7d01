//! SigLIP vision tower + R-4B projector on the GPU (bf16, replicated on every rank). Same math as
//! `model/siglip.rs` and `model/projector.rs`; the anyres packing stays on the host
//! (`model/anyres.rs::pack_features`).

use candle_core::{Device, Tensor};
use r4b_kernels::{DBuf, DevPtr, FlashAttn, Gpu, OutType};

use super::weights::{gpu_err, Loader, Split};
use super::{attention_gemm, AttnGemm};
use crate::config::RConfig;
use crate::model::anyres::{self, PixelViews};
use crate::Result;

/// Views encoded per batch (bounds the activation buffers).
pub const VIEWS_PER_BATCH: usize = 8;

struct Layer {
    ln1: (DBuf, DBuf),
    /// `q_proj | k_proj | v_proj` weights `[3C, C]` and biases `[3C]`.
    qkv: (DBuf, DBuf),
    out: (DBuf, DBuf),
    ln2: (DBuf, DBuf),
    fc1: (DBuf, DBuf),
    fc2: (DBuf, DBuf),
}

struct Bufs {
    px: DBuf,
    patches: DBuf,
    x: DBuf,
    n: DBuf,
    qkv: DBuf,
    attn: DBuf,
    tmp: DBuf,
    f: DBuf,
    s: DBuf,
    proj1: DBuf,
    /// Projected features of every view of one image, then the newline row: `[V·729 + 1, H]`.
    feats: DBuf,
    /// Packed `<image>` rows.
    packed: DBuf,
    /// i32 source row of each packed row.
    pack_idx: DBuf,
}

/// The vision side on one GPU.
pub struct VisionGpu {
    patch: (DBuf, DBuf),
    pos: DBuf,
    layers: Vec<Layer>,
    pre_norm: (DBuf, DBuf),
    linear_1: (DBuf, DBuf),
    linear_2: (DBuf, DBuf),
    newline: Tensor,
    bufs: Bufs,
    c: usize,
    f: usize,
    heads: usize,
    eps: f32,
    tile: usize,
    patch_size: usize,
    grid: usize,
    hidden: usize,
    max_views: usize,
}

impl VisionGpu {
    pub fn load(l: &mut Loader, cfg: &RConfig) -> Result<Self> {
        // The features are one hidden state (the output of the last layer run); a list of several,
        // concatenated, is served by the CPU model only.
        if cfg.vision_feature_layer.as_slice().len() != 1 {
            return Err(crate::Error::Config {
                field: "vision_feature_layer".into(),
                reason: format!(
                    "{:?}: concatenated feature layers are served by the CPU engine only \
                     (--device cpu), not by the GPU engine",
                    cfg.vision_feature_layer.as_slice()
                ),
            });
        }
        let v = &cfg.vision;
        let (c, f, p) = (v.hidden_size, v.intermediate_size, v.patch_size);
        let h = cfg.text.hidden_size;
        let root = "model.vision_tower.vision_model";
        let emb = format!("{root}.embeddings");
        let both = |l: &mut Loader, name: &str, out: usize, inp: usize| -> Result<(DBuf, DBuf)> {
            Ok((
                l.upload(&format!("{name}.weight"), &[out, inp], Split::Replicated)?,
                l.upload(&format!("{name}.bias"), &[out], Split::Replicated)?,
            ))
        };
        let norm = |l: &mut Loader, name: &str, d: usize| -> Result<(DBuf, DBuf)> {
            Ok((
                l.upload(&format!("{name}.weight"), &[d], Split::Replicated)?,
                l.upload(&format!("{name}.bias"), &[d], Split::Replicated)?,
            ))
        };
        let patch = (
            l.upload(
                &format!("{emb}.patch_embedding.weight"),
                &[c, v.num_channels, p, p],
                Split::Replicated,
            )?,
            l.upload(
                &format!("{emb}.patch_embedding.bias"),
                &[c],
                Split::Replicated,
            )?,
        );
        let pos = l.upload(
            &format!("{emb}.position_embedding.weight"),
            &[v.num_patches(), c],
            Split::Replicated,
        )?;
        let mut layers = Vec::new();
        for i in 0..cfg.vision_layers_used() {
            let pre = format!("{root}.encoder.layers.{i}");
            let a = format!("{pre}.self_attn");
            let qkv_w = l.gpu.alloc(3 * c * c * 2).map_err(gpu_err)?;
            let qkv_b = l.gpu.alloc(3 * c * 2).map_err(gpu_err)?;
            for (j, n) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                l.upload_into(
                    &format!("{a}.{n}.weight"),
                    &[c, c],
                    Split::Replicated,
                    &qkv_w,
                    j * c * c,
                )?;
                l.upload_into(
                    &format!("{a}.{n}.bias"),
                    &[c],
                    Split::Replicated,
                    &qkv_b,
                    j * c,
                )?;
            }
            layers.push(Layer {
                ln1: norm(l, &format!("{pre}.layer_norm1"), c)?,
                qkv: (qkv_w, qkv_b),
                out: both(l, &format!("{a}.out_proj"), c, c)?,
                ln2: norm(l, &format!("{pre}.layer_norm2"), c)?,
                fc1: both(l, &format!("{pre}.mlp.fc1"), f, c)?,
                fc2: both(l, &format!("{pre}.mlp.fc2"), c, f)?,
            });
        }
        let proj = "model.multi_modal_projector";
        let pre_norm = norm(l, &format!("{proj}.pre_norm"), c)?;
        let linear_1 = both(l, &format!("{proj}.linear_1"), h, c)?;
        let linear_2 = both(l, &format!("{proj}.linear_2"), h, h)?;
        let newline = l.ckpt.load("model.image_newline", &[h], &Device::Cpu)?;
        let grid = v.grid_side();
        let rows = VIEWS_PER_BATCH * grid * grid;
        // Base view + the largest tile grid of the pinpoints.
        let max_views = 1 + cfg
            .image_grid_pinpoints
            .iter()
            .map(|&(ph, pw)| (ph / v.image_size).max(1) * (pw / v.image_size).max(1))
            .max()
            .unwrap_or(1);
        let n = grid * grid;
        let a = |bytes: usize| l.gpu.alloc(bytes).map_err(gpu_err);
        let bufs = Bufs {
            px: a(VIEWS_PER_BATCH * 3 * v.image_size * v.image_size * 4)?,
            patches: a(rows * 3 * p * p * 2)?,
            x: a(rows * c * 2)?,
            n: a(rows * c * 2)?,
            qkv: a(rows * 3 * c * 2)?,
            attn: a(rows * c * 2)?,
            tmp: a(rows * c * 2)?,
            f: a(rows * f * 2)?,
            s: a(v.num_attention_heads * n * n * 2)?,
            proj1: a(rows * h * 2)?,
            feats: a((max_views * n + 1) * h * 2)?,
            packed: a((max_views * n + 1024) * h * 2)?,
            pack_idx: a((max_views * n + 1024) * 4)?,
        };
        Ok(VisionGpu {
            patch,
            pos,
            layers,
            pre_norm,
            linear_1,
            linear_2,
            newline,
            bufs,
            c,
            f,
            heads: v.num_attention_heads,
            eps: v.layer_norm_eps as f32,
            tile: v.image_size,
            patch_size: p,
            grid,
            hidden: h,
            max_views,
        })
    }

    /// One image's views → its `<image>` rows `[num_image_tokens, hidden]` (bf16, host), and
    /// where the same rows are on the device (until the next encode) when they were packed there.
    pub fn encode(
        &self,
        gpu: &Gpu,
        views: &PixelViews,
        cfg: &RConfig,
    ) -> Result<(Tensor, Option<DevPtr>)> {
        let n = self.grid * self.grid;
        let (c, h) = (self.c, self.hidden);
        if views.views > self.max_views {
            return Err(crate::Error::Step(format!(
                "{} views, the vision buffers hold {}",
                views.views, self.max_views
            )));
        }
        let per_view = 3 * self.tile * self.tile;
        let b = &self.bufs;
        for first in (0..views.views).step_by(VIEWS_PER_BATCH) {
            let nv = VIEWS_PER_BATCH.min(views.views - first);
            let rows = nv * n;
            let px = &views.data[first * per_view..(first + nv) * per_view];
            let out = b.feats.at(first * n * h, 2);
            // SAFETY: every buffer was sized for VIEWS_PER_BATCH views (feats for max_views) in
            // `load`; shapes below stay within them.
            unsafe {
                gpu.htod(px, b.px.ptr()).map_err(gpu_err)?;
                gpu.mark("vision pixels upload").map_err(gpu_err)?;
                gpu.im2col_patches(
                    b.px.ptr(),
                    b.patches.ptr(),
                    nv,
                    (self.tile, self.patch_size),
                )
                .map_err(gpu_err)?;
                let k = 3 * self.patch_size * self.patch_size;
                gpu.linear(
                    b.patches.ptr(),
                    self.patch.0.ptr(),
                    b.x.ptr(),
                    (rows, c, k),
                    OutType::Bf16,
                    false,
                )
                .map_err(gpu_err)?;
                gpu.add_pos_embed(
                    b.x.ptr(),
                    (self.patch.1.ptr(), self.pos.ptr()),
                    (rows, c, n),
                )
                .map_err(gpu_err)?;
                gpu.mark("vision patch embed").map_err(gpu_err)?;
                for layer in &self.layers {
                    self.layer(gpu, layer, nv, rows)?;
                }
                // Projector: LayerNorm → linear_1 → GELU(erf) → linear_2, into `feats`.
                let (w, bb) = (&self.pre_norm.0, &self.pre_norm.1);
                gpu.layernorm(b.x.ptr(), (w.ptr(), bb.ptr()), b.n.ptr(), (rows, c), 1e-6)
                    .map_err(gpu_err)?;
                linear_bias(
                    gpu,
                    b.n.ptr(),
                    &self.linear_1,
                    b.proj1.ptr(),
                    (rows, h, c),
                    2,
                )?;
                linear_bias(gpu, b.proj1.ptr(), &self.linear_2, out, (rows, h, h), 0)?;
                gpu.mark("vision projector").map_err(gpu_err)?;
            }
        }
        let total = views.views * n;
        match anyres::pack_selection(
            views.views,
            total / views.views.max(1),
            views.image_size,
            &cfg.image_geometry(),
        )? {
            // The packing only selects rows (no interpolation): gather them on the GPU.
            Some(src) if src.len() <= self.max_views * n + 1024 => {
                let newline: Vec<half::bf16> =
                    self.newline.to_dtype(candle_core::DType::BF16)?.to_vec1()?;
                let mut host = vec![half::bf16::ZERO; src.len() * h];
                // SAFETY: feats has a row after the views for the newline; packed/pack_idx hold
                // max_views·729 + 1024 rows ≥ src.len() (checked in pack_plan).
                unsafe {
                    gpu.htod(&newline, b.feats.at(total * h, 2))
                        .map_err(gpu_err)?;
                    gpu.htod(&src, b.pack_idx.ptr()).map_err(gpu_err)?;
                    gpu.gather_rows(
                        b.pack_idx.ptr(),
                        b.feats.ptr(),
                        b.packed.ptr(),
                        src.len(),
                        h,
                    )
                    .map_err(gpu_err)?;
                    gpu.dtoh(b.packed.ptr(), &mut host).map_err(gpu_err)?;
                    gpu.mark("vision pack + download").map_err(gpu_err)?;
                }
                Ok((
                    Tensor::from_vec(host, (src.len(), h), &Device::Cpu)?,
                    Some(b.packed.ptr()),
                ))
            }
            // Interpolated (more tiles than anyres_max allows): the host path.
            _ => {
                let mut host = vec![half::bf16::ZERO; total * h];
                // SAFETY: feats holds `total` rows.
                unsafe { gpu.dtoh(b.feats.ptr(), &mut host) }.map_err(gpu_err)?;
                let proj = Tensor::from_vec(host, (views.views, n, h), &Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?;
                let packed = anyres::pack_features(
                    &proj,
                    views.image_size,
                    &cfg.image_geometry(),
                    &self.newline,
                )?;
                Ok((packed.to_dtype(candle_core::DType::BF16)?, None))
            }
        }
    }

    /// Pre-LN encoder block over `nv` views: `x + Attn(LN1(x))`, then `x + MLP(LN2(x))`.
    unsafe fn layer(&self, gpu: &Gpu, l: &Layer, nv: usize, rows: usize) -> Result<()> {
        let b = &self.bufs;
        let (c, f, n) = (self.c, self.f, self.grid * self.grid);
        let hd = c / self.heads;
        gpu.layernorm(
            b.x.ptr(),
            (l.ln1.0.ptr(), l.ln1.1.ptr()),
            b.n.ptr(),
            (rows, c),
            self.eps,
        )
        .map_err(gpu_err)?;
        linear_bias(gpu, b.n.ptr(), &l.qkv, b.qkv.ptr(), (rows, 3 * c, c), 0)?;
        gpu.mark("vision ln + qkv").map_err(gpu_err)?;
        if gpu.has_flash(hd) {
            // Every view at once: view z's rows start at z·n.
            gpu.flash_attention(&FlashAttn {
                q: b.qkv.ptr(),
                q_ld: 3 * c,
                q_z: n * 3 * c,
                k: b.qkv.at(c, 2),
                v: b.qkv.at(2 * c, 2),
                kv_ld: 3 * c,
                kv_z: n * 3 * c,
                block_table: None,
                out: b.attn.ptr(),
                out_ld: c,
                out_z: n * c,
                rows: n,
                batch: nv,
                ctx_base: 0,
                nkeys: n,
                nq: self.heads,
                nkv: self.heads,
                head_dim: hd,
                causal: false,
                scale: 1.0 / (hd as f32).sqrt(),
            })
            .map_err(gpu_err)?;
        }
        for v in (0..nv).filter(|_| !gpu.has_flash(hd)) {
            let q = b.qkv.at(v * n * 3 * c, 2);
            attention_gemm(
                gpu,
                &AttnGemm {
                    q,
                    q_ld: 3 * c,
                    k: q + (c * 2) as u64,
                    k_ld: 3 * c,
                    v: q + (2 * c * 2) as u64,
                    v_ld: 3 * c,
                    out: b.attn.at(v * n * c, 2),
                    out_ld: c,
                    rows: n,
                    ctx: n,
                    nkv: self.heads,
                    group: 1,
                    hd,
                    causal_base: None,
                    scale: 1.0 / (hd as f32).sqrt(),
                    s: b.s.ptr(),
                },
            )?;
        }
        linear_bias_residual(
            gpu,
            b.attn.ptr(),
            &l.out,
            (b.tmp.ptr(), b.x.ptr()),
            (rows, c, c),
        )?;
        gpu.mark("vision attention + out").map_err(gpu_err)?;
        gpu.layernorm(
            b.x.ptr(),
            (l.ln2.0.ptr(), l.ln2.1.ptr()),
            b.n.ptr(),
            (rows, c),
            self.eps,
        )
        .map_err(gpu_err)?;
        linear_bias(gpu, b.n.ptr(), &l.fc1, b.f.ptr(), (rows, f, c), 1)?;
        linear_bias_residual(
            gpu,
            b.f.ptr(),
            &l.fc2,
            (b.tmp.ptr(), b.x.ptr()),
            (rows, c, f),
        )?;
        gpu.mark("vision mlp").map_err(gpu_err)?;
        Ok(())
    }
}

/// `y = act(x · Wᵀ + b)` (act as in [`Gpu::bias_act`]).
unsafe fn linear_bias(
    gpu: &Gpu,
    x: u64,
    (w, b): &(DBuf, DBuf),
    y: u64,
    (rows, out, inp): (usize, usize, usize),
    act: i32,
) -> Result<()> {
    gpu.linear(x, w.ptr(), y, (rows, out, inp), OutType::Bf16, false)
        .map_err(gpu_err)?;
    gpu.bias_act(y, b.ptr(), (rows, out), act).map_err(gpu_err)
}

/// `res += x · Wᵀ + b`, through the scratch `tmp`.
unsafe fn linear_bias_residual(
    gpu: &Gpu,
    x: u64,
    (w, b): &(DBuf, DBuf),
    (tmp, res): (u64, u64),
    (rows, out, inp): (usize, usize, usize),
) -> Result<()> {
    gpu.linear(x, w.ptr(), tmp, (rows, out, inp), OutType::Bf16, false)
        .map_err(gpu_err)?;
    gpu.bias_residual(res, tmp, b.ptr(), (rows, out))
        .map_err(gpu_err)
}
