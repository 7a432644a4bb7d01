//! Anyres feature packing (LLaVA-OneVision scheme, spec §5), over the preprocessing of
//! `r4b_model::anyres` (re-exported here): after SigLIP, [`pack_features`] reassembles the tiles
//! into one feature map, crops away the padding, shrinks it when it is larger than `max_tiles`
//! tiles, and appends a newline column.

use candle_core::{DType, Device, Tensor};

pub use r4b_model::anyres::*;

/// The views as a `[views, 3, tile, tile]` f32 tensor.
pub fn views_tensor(views: &PixelViews, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_slice(
        &views.data,
        (views.views, 3, views.tile, views.tile),
        device,
    )
}

/// Bilinear interpolation matrix `[out_size, in_size]` (torch `upsample_bilinear2d`,
/// align_corners=False, no antialias): f32 scale `in/out`, `src = max(scale*(i+0.5)-0.5, 0)`.
fn linear_matrix(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = in_size as f32 / out_size as f32;
    let mut m = vec![0f32; out_size * in_size];
    for (i, row) in m.chunks_exact_mut(in_size).enumerate() {
        let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(in_size - 1);
        let i1 = if i0 + 1 < in_size { i0 + 1 } else { i0 };
        let lambda1 = (src - i0 as f32).clamp(0.0, 1.0);
        row[i0] += 1.0 - lambda1;
        row[i1] += lambda1;
    }
    m
}

/// Bilinear resize of a channels-last map `[h, w, C]` to `[out_h, out_w, C]` in f32.
/// Mirrors torch `F.interpolate(mode="bilinear", align_corners=False)`.
fn interpolate_bilinear(
    map: &Tensor,
    (out_h, out_w): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (h, w, c) = map.dims3()?;
    let device = map.device();
    let rows = Tensor::from_vec(linear_matrix(h, out_h), (out_h, h), device)?;
    let cols = Tensor::from_vec(linear_matrix(w, out_w), (out_w, w), device)?;
    // [out_h, h] x [h, w*C] -> [out_h, w, C]
    let map = map.to_dtype(DType::F32)?.reshape((h, w * c))?;
    let map = rows.matmul(&map)?.reshape((out_h, w, c))?;
    // [out_w, w] x [out_h, w, C] -> [out_h, out_w, C]
    cols.broadcast_matmul(&map)
}

/// [`pack_features`] as a row selection, when it is one: the source row of every packed row, rows
/// numbered `view · tokens + token`, with `views · tokens` standing for the newline row. None
/// when the packing interpolates (more tiles than `max_tiles`). Lets a GPU pack the features with
/// one gather. Found by packing two index channels (the row id and a hash of it) with
/// [`pack_features`] itself: a packed row is a selection exactly when both channels come out as
/// one row's pair.
pub fn pack_selection(
    views: usize,
    tokens: usize,
    image_size: (usize, usize),
    geom: &ImageGeometry,
) -> candle_core::Result<Option<Vec<i32>>> {
    let total = views * tokens;
    let hash = |i: usize| ((i * 7919) % 65521) as f32;
    let idx: Vec<f32> = (0..total).flat_map(|i| [i as f32, hash(i)]).collect();
    let t = Tensor::from_vec(idx, (views, tokens, 2), &Device::Cpu)?;
    let newline = Tensor::from_vec(vec![total as f32, hash(total)], 2, &Device::Cpu)?;
    let rows: Vec<Vec<f32>> = pack_features(&t, image_size, geom, &newline)?.to_vec2()?;
    let mut src = Vec::with_capacity(rows.len());
    for r in &rows {
        let i = r[0];
        if i.fract() != 0.0 || i < 0.0 || i as usize > total || r[1] != hash(i as usize) {
            return Ok(None);
        }
        src.push(i as i32);
    }
    Ok(Some(src))
}

/// Packs one image's vision features `[views, tokens_per_tile, C]` into `[num_image_tokens, C]`:
/// the base view's rows, then the tile grid as a map unpadded, capped to about `max_tiles` tiles by
/// bilinear interpolation, with `newline` `[C]` appended as an extra column, flattened row-major.
/// A single view gives the base rows plus one newline row.
/// Mirrors transformers `LlavaOnevisionModel.pack_image_features` (`anyres_max_N`).
pub fn pack_features(
    features: &Tensor,
    image_size: (usize, usize),
    geom: &ImageGeometry,
    newline: &Tensor,
) -> candle_core::Result<Tensor> {
    let (height, width) = image_size;
    let shape_error = |expected: String, got: &[usize]| {
        candle_core::Error::wrap(AnyresError::FeatureShape {
            height,
            width,
            expected,
            got: got.to_vec(),
        })
    };
    let n = geom.grid_side();
    let dims = features.dims();
    let &[views, tokens, channels] = dims else {
        return Err(shape_error("[views, tokens, C]".into(), dims));
    };
    if views == 0 || tokens != geom.tokens_per_tile() || n == 0 {
        return Err(shape_error(
            format!("[views, {}, C]", geom.tokens_per_tile()),
            dims,
        ));
    }
    if newline.dims() != [channels] {
        return Err(shape_error(format!("newline [{channels}]"), newline.dims()));
    }
    let newline = newline.to_dtype(features.dtype())?;
    let base = features.get(0)?; // [T, C]
    if views == 1 {
        return Tensor::cat(&[&base, &newline.unsqueeze(0)?], 0);
    }
    if height == 0 || width == 0 {
        return Err(shape_error("a non-empty image".into(), &[height, width]));
    }
    let layout = geom.layout(height, width);
    let (rows, cols) = layout.grid;
    if views != 1 + rows * cols {
        return Err(shape_error(
            format!("[{}, {tokens}, C]", 1 + rows * cols),
            dims,
        ));
    }
    // [rows*cols, n*n, C] -> [rows, cols, n, n, C] -> [rows, n, cols, n, C] -> [rows*n, cols*n, C]
    let map = features
        .narrow(0, 1, rows * cols)?
        .reshape((rows, cols, n, n, channels))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape((rows * n, cols * n, channels))?;
    // Centered crop of the padding: [uh, uw, C].
    let (uh, uw) = layout.unpadded;
    let map = map
        .narrow(0, (rows * n - uh) / 2, uh)?
        .narrow(1, (cols * n - uw) / 2, uw)?;
    // anyres_max cap: [ph, pw, C].
    let (ph, pw) = layout.packed;
    if ph == 0 || pw == 0 {
        return Err(shape_error("a non-empty packed map".into(), &[ph, pw]));
    }
    let map = if layout.packed != layout.unpadded {
        interpolate_bilinear(&map, layout.packed)?.to_dtype(features.dtype())?
    } else {
        map
    };
    // Newline column: [ph, pw, C] ++ [ph, 1, C] -> [ph * (pw + 1), C].
    let column = newline
        .reshape((1, 1, channels))?
        .broadcast_as((ph, 1, channels))?;
    let map = Tensor::cat(&[&map, &column.contiguous()?], 1)?.reshape((ph * (pw + 1), channels))?;
    Tensor::cat(&[&base, &map], 0)
}
