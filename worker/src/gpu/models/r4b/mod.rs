//! R-4B on the GPU: SigLIP vision tower + projector ([`siglip`]) and the Qwen3 decoder
//! ([`qwen3`]), the same blocks as the CPU reference (`model/`). The vision side
//! ([`R4b::encode_image`]) and the LLM side ([`R4b::forward`]) are separate: the decoder sees
//! embeddings with the image rows scattered in, never images. The rows stay on the device: the
//! vision side packs them into a [`DeviceImage`], the decoder's embedding reads them from there.

pub mod qwen3;
pub mod siglip;

use candle_core::{Device, Tensor};
use r4b_kernels::{DBuf, Gpu};

pub use qwen3::{Qwen3, Qwen3Dims};
pub use siglip::{Siglip, VisionBuffers, VIEWS_PER_BATCH};

use crate::config::RConfig;
use crate::gpu::buffers::StepBuffers;
use crate::gpu::images::{DeviceImage, ImageMemory};
use crate::gpu::kv::GpuKv;
use crate::gpu::layers::Ctx;
use crate::gpu::plan::Pass;
use crate::gpu::weights::{gpu_err, Loader};
use crate::model::anyres::{self, PixelViews};
use crate::{Error, Result};

/// One rank of R-4B: the vision side replicated, the decoder sharded.
pub struct R4b {
    pub vision: Siglip,
    /// `model.image_newline [H]` (host: the anyres packing may run on the host).
    pub image_newline: Tensor,
    pub llm: Qwen3,
    /// Most views of one image: the base view + the largest tile grid of the pinpoints.
    max_views: usize,
}

/// Device buffers of one image's encoding (owned by the runner).
pub struct ImageBuffers {
    pub views: VisionBuffers,
    /// Projected features of every view of one image, then the newline row: `[V·N + 1, H]`.
    feats: DBuf,
    /// The i32 source row (in `feats`) of each packed `<image>` row.
    pack_idx: DBuf,
}

impl R4b {
    /// Loads this rank's shard; the decoder's rotary table covers `max_positions`.
    pub fn load(l: &mut Loader, cfg: &RConfig, max_positions: usize) -> Result<Self> {
        // The features are one hidden state (the output of the last layer run); a list of several,
        // concatenated, is served by the CPU model only.
        if cfg.vision_feature_layer.as_slice().len() != 1 {
            return Err(Error::Config {
                field: "vision_feature_layer".into(),
                reason: format!(
                    "{:?}: concatenated feature layers are served by the CPU engine only \
                     (--device cpu), not by the GPU engine",
                    cfg.vision_feature_layer.as_slice()
                ),
            });
        }
        let vision = Siglip::load(l, cfg)?;
        let h = cfg.text.hidden_size;
        let image_newline = l.ckpt.load("model.image_newline", &[h], &Device::Cpu)?;
        let llm = Qwen3::load(l, cfg, max_positions)?;
        let v = &cfg.vision;
        let max_views = 1 + cfg
            .image_grid_pinpoints
            .iter()
            .map(|&(ph, pw)| (ph / v.image_size).max(1) * (pw / v.image_size).max(1))
            .max()
            .unwrap_or(1);
        Ok(R4b {
            vision,
            image_newline,
            llm,
            max_views,
        })
    }

    /// Buffers for encoding one image.
    pub fn image_buffers(&self, gpu: &Gpu, cfg: &RConfig) -> Result<ImageBuffers> {
        let (n, h) = (self.vision.tokens_per_view(), cfg.text.hidden_size);
        let a = |bytes: usize| gpu.alloc(bytes).map_err(gpu_err);
        Ok(ImageBuffers {
            views: self.vision.buffers(gpu, cfg)?,
            feats: a((self.max_views * n + 1) * h * 2)?,
            pack_idx: a((self.max_views * n + 1024) * 4)?,
        })
    }

    /// One image's views → its `<image>` rows `[num_image_tokens, H]` (bf16, in a
    /// [`DeviceImage`] of `images`).
    pub fn encode_image(
        &self,
        ctx: &Ctx,
        b: &ImageBuffers,
        views: &PixelViews,
        cfg: &RConfig,
        images: &ImageMemory,
    ) -> Result<DeviceImage> {
        let gpu = ctx.gpu;
        let n = self.vision.tokens_per_view();
        let h = cfg.text.hidden_size;
        if views.views > self.max_views {
            return Err(Error::Step(format!(
                "{} views, the vision buffers hold {}",
                views.views, self.max_views
            )));
        }
        let per_view = self.vision.pixels_per_view();
        // 1. Views in batches: pixels → projected features `feats [V·N, H]`.
        for first in (0..views.views).step_by(VIEWS_PER_BATCH) {
            let nv = VIEWS_PER_BATCH.min(views.views - first);
            let px = &views.data[first * per_view..(first + nv) * per_view];
            // SAFETY: every buffer was sized for VIEWS_PER_BATCH views (feats for max_views);
            // `first + nv ≤ views ≤ max_views`.
            unsafe {
                gpu.htod(px, b.views.px.ptr()).map_err(gpu_err)?;
                ctx.mark("vision pixels upload")?;
                self.vision
                    .forward(ctx, &b.views, nv, b.feats.at(first * n * h, 2))?;
            }
        }
        // 2. Anyres packing: the rows of the base view and the tiles, newline rows between.
        let total = views.views * n;
        match anyres::pack_selection(
            views.views,
            total / views.views.max(1),
            views.image_size,
            &cfg.image_geometry(),
        )? {
            // The packing only selects rows (no interpolation): gather them on the GPU, straight
            // into the image's rows `[src.len(), H]`.
            Some(src) if src.len() <= self.max_views * n + 1024 => {
                let newline: Vec<half::bf16> = self
                    .image_newline
                    .to_dtype(candle_core::DType::BF16)?
                    .to_vec1()?;
                let rows = images.alloc(gpu, src.len(), h)?;
                // SAFETY: feats has a row after the views for the newline; pack_idx holds
                // max_views·N + 1024 rows ≥ src.len() (checked above), `rows` src.len() rows.
                unsafe {
                    gpu.htod(&newline, b.feats.at(total * h, 2))
                        .map_err(gpu_err)?;
                    gpu.htod(&src, b.pack_idx.ptr()).map_err(gpu_err)?;
                    gpu.gather_rows(b.pack_idx.ptr(), b.feats.ptr(), rows.row(0), src.len(), h)
                        .map_err(gpu_err)?;
                    ctx.mark("vision pack")?;
                }
                Ok(rows)
            }
            // Interpolated (more tiles than anyres_max allows): packed on the host, then uploaded
            // once into the image's rows.
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
                    &self.image_newline,
                )?
                .to_dtype(candle_core::DType::BF16)?;
                let n_rows = packed.dim(0)?;
                let host: Vec<half::bf16> = packed.flatten_all()?.to_vec1()?;
                if host.len() != n_rows * h {
                    return Err(Error::Step(format!(
                        "packed image rows of {} values, expected {n_rows} × {h}",
                        host.len()
                    )));
                }
                let rows = images.alloc(gpu, n_rows, h)?;
                // SAFETY: `rows` holds n_rows · h bf16 values, as many as `host`.
                unsafe { gpu.htod(&host, rows.row(0)) }.map_err(gpu_err)?;
                Ok(rows)
            }
        }
    }

    /// The decoder over one uploaded step: embeddings, the step's image rows scattered over the
    /// `<image>` positions, the layers, the final norm (`b.normed [T, H]`).
    ///
    /// # Safety
    /// The step buffers hold the uploaded plan of `pass`; `kv` is this model's cache.
    pub unsafe fn forward(
        &self,
        ctx: &Ctx,
        b: &StepBuffers,
        kv: &GpuKv,
        pass: &Pass,
    ) -> Result<()> {
        // 1. Embeddings [T, H] (vocab-parallel, summed), then the image rows, read from their
        //    images: run k's rows go to the step rows image_dst[at..at + n].
        self.llm.embed(ctx, b, pass.tokens)?;
        let mut at = 0;
        for &(src, n) in &pass.plan.image_src {
            ctx.gpu
                .scatter_rows(
                    b.image_dst.at(at, 4),
                    src,
                    b.proj.ptr(),
                    n,
                    self.llm.dims.hidden,
                )
                .map_err(gpu_err)?;
            at += n;
        }
        ctx.mark("embed")?;
        // 2. The decoder layers and the final norm.
        self.llm.forward_embeds(ctx, b, kv, pass)
    }
}
