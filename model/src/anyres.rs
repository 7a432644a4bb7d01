//! Anyres image preprocessing (LLaVA-OneVision scheme, spec §5): the geometry, the views and
//! Pillow's resize. Feature packing, which needs tensors, is the worker's
//! (`r4b_worker::model::anyres::pack_features`).
//!
//! An image of `H x W` pixels becomes `1 + rows * cols` square views of `tile` pixels: a base view
//! (the whole image squashed to `tile x tile`) and the tiles of the image resized into the best
//! pinpoint resolution `(rows * tile, cols * tile)`. After SigLIP, [`pack_features`] reassembles the
//! tiles into one feature map, crops away the padding, shrinks it when it is larger than
//! `max_tiles` tiles, and appends a newline column. [`ImageGeometry::num_image_tokens`] is the
//! resulting row count, the number of `<image>` tokens the prompt needs.
//!
//! Resizing is Pillow's 8-bit separable convolution, reproduced bit for bit ([`resize`]), because
//! the HF processor (the reference) resizes with Pillow.

use std::ops::Range;

use image::RgbImage;

/// Errors of image preprocessing and feature packing.
#[derive(Debug, thiserror::Error)]
pub enum AnyresError {
    /// The image has a zero dimension.
    #[error("image has zero size {width}x{height}")]
    Empty {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// A resize was asked for a zero-sized output.
    #[error("resize target has zero size {width}x{height}")]
    EmptyTarget {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// An output image would not fit in memory indexing (`width * height * 3` overflows).
    #[error("image of {width}x{height} pixels is too large")]
    TooLarge {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },
    /// The geometry is unusable (zero sizes, no pinpoints, pinpoints not made of whole tiles).
    #[error("invalid image geometry: {0}")]
    Geometry(&'static str),
    /// The normalisation has a zero or non-finite std.
    #[error("invalid normalisation: std must be finite and non-zero, got {0:?}")]
    Normalize([f32; 3]),
    /// Vision features do not have the shape the image size implies.
    #[error(
        "vision features for a {height}x{width} image: expected {expected}, got shape {got:?}"
    )]
    FeatureShape {
        /// Image height in pixels.
        height: usize,
        /// Image width in pixels.
        width: usize,
        /// The shape the geometry implies, in words.
        expected: String,
        /// The shape that was given.
        got: Vec<usize>,
    },
}

/// Geometry of the anyres scheme, built from the checkpoint config.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageGeometry {
    /// Vision `image_size`: side of every view in pixels (384).
    pub tile: usize,
    /// Vision `patch_size` in pixels (14).
    pub patch: usize,
    /// `image_grid_pinpoints` as `(height, width)` pixel resolutions, each a whole number of tiles.
    pub pinpoints: Vec<(usize, usize)>,
    /// `N` of `vision_aspect_ratio = "anyres_max_N"`: the packed map is shrunk to about `N` tiles.
    pub max_tiles: usize,
}

/// Shape of one image's packed features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureLayout {
    /// Tile grid `(rows, cols)` of the chosen pinpoint.
    pub grid: (usize, usize),
    /// Feature map `(h, w)` after cropping the padding.
    pub unpadded: (usize, usize),
    /// Feature map `(h, w)` after the `anyres_max` cap (equal to `unpadded` when no cap applies).
    pub packed: (usize, usize),
}

impl ImageGeometry {
    /// Patches along a tile side: `tile / patch` rounded down like the stride-`patch` conv (27).
    pub fn grid_side(&self) -> usize {
        self.tile.checked_div(self.patch).unwrap_or(0)
    }

    /// Vision tokens of one view: `grid_side^2` (729).
    pub fn tokens_per_tile(&self) -> usize {
        self.grid_side() * self.grid_side()
    }

    /// Checks the geometry is usable: `0 < patch <= tile`, pinpoints made of whole tiles.
    pub fn validate(&self) -> Result<(), AnyresError> {
        if self.patch == 0 || self.tile < self.patch {
            return Err(AnyresError::Geometry(
                "patch must be positive and at most tile",
            ));
        }
        if self.max_tiles == 0 {
            return Err(AnyresError::Geometry("max_tiles must be positive"));
        }
        if self.pinpoints.is_empty() {
            return Err(AnyresError::Geometry("no pinpoints"));
        }
        let whole = |side: usize| {
            side > 0 && side.checked_rem(self.tile) == Some(0) && u32::try_from(side).is_ok()
        };
        if !self.pinpoints.iter().all(|&(h, w)| whole(h) && whole(w)) {
            return Err(AnyresError::Geometry(
                "pinpoints must be positive multiples of tile",
            ));
        }
        Ok(())
    }

    /// Pinpoint `(h, w)` keeping the most image pixels, ties to the least padding, then the first.
    /// Falls back to the first pinpoint (or one tile) for a zero-sized image or no pinpoints.
    /// Mirrors transformers `select_best_resolution`, float arithmetic included.
    pub fn select_best_resolution(&self, height: usize, width: usize) -> (usize, usize) {
        let (h, w) = (height as f64, width as f64);
        let mut best = None;
        let (mut max_effective, mut min_wasted) = (0u128, u128::MAX);
        for &(ph, pw) in &self.pinpoints {
            let scale = (pw as f64 / w).min(ph as f64 / h);
            let fitted = (w * scale) as u128 * (h * scale) as u128;
            let effective = fitted.min(width as u128 * height as u128);
            let wasted = (ph as u128 * pw as u128).saturating_sub(effective);
            if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
                (max_effective, min_wasted) = (effective, wasted);
                best = Some((ph, pw));
            }
        }
        best.or_else(|| self.pinpoints.first().copied())
            .unwrap_or((self.tile, self.tile))
    }

    /// Tile grid, unpadded and capped feature-map sizes of an `height x width` image.
    /// Mirrors transformers `LlavaOnevisionProcessor._get_number_of_features` / `unpad_image`.
    pub fn layout(&self, height: usize, width: usize) -> FeatureLayout {
        let (ph, pw) = self.select_best_resolution(height, width);
        let grid = (
            ph.checked_div(self.tile).unwrap_or(0),
            pw.checked_div(self.tile).unwrap_or(0),
        );
        let n = self.grid_side();
        let unpadded = unpadded_size(
            (height, width),
            (grid.0.saturating_mul(n), grid.1.saturating_mul(n)),
        );
        let (uh, uw) = unpadded;
        // ratio = sqrt(h*w / (max_tiles * n^2)); shrink when the map exceeds ~1.21 * max_tiles tiles.
        let ratio = (uh as f64 * uw as f64 / (self.max_tiles as f64 * (n * n) as f64)).sqrt();
        let packed = if ratio > 1.1 {
            (
                py_floordiv(uh as f64, ratio) as usize,
                py_floordiv(uw as f64, ratio) as usize,
            )
        } else {
            unpadded
        };
        FeatureLayout {
            grid,
            unpadded,
            packed,
        }
    }

    /// `<image>` tokens of one image: base view + `h * w` map + `h` newlines, `(h, w) = packed`.
    pub fn num_image_tokens(&self, height: usize, width: usize) -> usize {
        let (h, w) = self.layout(height, width).packed;
        self.tokens_per_tile() + h * w + h
    }
}

/// Crops the padding of a `current = (ch, cw)` feature map of an `original = (H, W)` image:
/// the resized image spans the full width (or height) and is centered along the other side.
/// Mirrors transformers `unpad_image` (`int(round(x, 7))` included); zero sizes give `(0, 0)`.
fn unpadded_size(original: (usize, usize), current: (usize, usize)) -> (usize, usize) {
    let ((oh, ow), (ch, cw)) = (original, current);
    if oh == 0 || ow == 0 || ch == 0 || cw == 0 {
        return (0, 0);
    }
    if ow as f64 / oh as f64 > cw as f64 / ch as f64 {
        let new_h = py_int_round7(oh as f64 * (cw as f64 / ow as f64));
        let pad = ch.saturating_sub(new_h) / 2;
        (ch - 2 * pad, cw)
    } else {
        let new_w = py_int_round7(ow as f64 * (ch as f64 / oh as f64));
        let pad = cw.saturating_sub(new_w) / 2;
        (ch, cw - 2 * pad)
    }
}

/// Python `int(round(x, 7))` for `x >= 0`: truncation, except a fraction above 0.99999995 rounds up.
fn py_int_round7(x: f64) -> usize {
    // 0.99999995 is not a binary fraction and its nearest f64 lies below it, so `>` is exact.
    const ROUNDS_UP: f64 = 0.999_999_95;
    let floor = x.floor();
    let up = x - floor > ROUNDS_UP;
    floor as usize + usize::from(up)
}

/// Python float floor division `a // b` for `a >= 0, b > 0` (CPython `float_floor_div`).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let rem = a % b;
    let div = (a - rem) / b;
    if div == 0.0 {
        return 0.0;
    }
    let floor = div.floor();
    if div - floor > 0.5 {
        floor + 1.0
    } else {
        floor
    }
}

/// Size `(h, w)` the image is resized to inside pinpoint `(ph, pw)`: full along the tighter side.
/// Mirrors transformers `get_patch_output_size`.
fn patch_output_size(height: usize, width: usize, (ph, pw): (usize, usize)) -> (usize, usize) {
    let scale_w = pw as f64 / width as f64;
    let scale_h = ph as f64 / height as f64;
    if scale_w < scale_h {
        (((height as f64 * scale_w).ceil() as usize).min(ph), pw)
    } else {
        (ph, ((width as f64 * scale_h).ceil() as usize).min(pw))
    }
}

/// Pixel normalisation from preprocessor_config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    /// Per-channel mean subtracted after rescaling.
    pub mean: [f32; 3],
    /// Per-channel std divided by after subtracting the mean.
    pub std: [f32; 3],
    /// Factor from 0..255 to 0..1 (1/255).
    pub rescale: f32,
}

impl Normalize {
    /// The rescale factor as the f64 the HF processor multiplies by: `rescale_factor` is `1/255` in
    /// f64, which f32 cannot hold, so a factor within f32 rounding of `1/n` is taken as exactly `1/n`.
    fn rescale_f64(&self) -> f64 {
        let r = f64::from(self.rescale);
        let n = (1.0 / r).round();
        if n >= 1.0 && (n * r - 1.0).abs() <= f64::from(f32::EPSILON) {
            1.0 / n
        } else {
            r
        }
    }
}

/// Resampling filter: preprocessor_config `"resample"`, a PIL code. Every filter is reproduced
/// bit for bit from Pillow 12.3.0 (`libImaging/Resample.c`; nearest: `Geometry.c`
/// `ImagingScaleAffine`), the library the HF image processor resizes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// PIL 0: nearest neighbour (affine scale, no filter).
    Nearest,
    /// PIL 1: Lanczos (windowed sinc, support 3).
    Lanczos,
    /// PIL 2: triangle filter, support 1.
    Bilinear,
    /// PIL 3: Keys cubic with `a = -0.5`, support 2.
    Bicubic,
    /// PIL 4: box filter, support 0.5.
    Box,
    /// PIL 5: Hamming-windowed sinc, support 1.
    Hamming,
}

impl Resample {
    /// The filter of a PIL resampling code (`PIL.Image.Resampling`), if it is one.
    pub fn from_pil(code: u8) -> Option<Self> {
        Some(match code {
            0 => Resample::Nearest,
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            _ => return None,
        })
    }

    /// The PIL code.
    pub fn pil_code(self) -> u8 {
        match self {
            Resample::Nearest => 0,
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    /// Filter radius in source pixels at scale 1 (Pillow's `struct filter` support).
    fn support(self) -> f64 {
        match self {
            Resample::Nearest | Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    /// Filter kernel at signed `x` (Pillow `box_filter`, `bilinear_filter`, `hamming_filter`,
    /// `bicubic_filter`, `lanczos_filter`, same operations in the same order).
    fn kernel(self, x: f64) -> f64 {
        use std::f64::consts::PI;
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                (x * PI).sin() / (x * PI)
            }
        };
        match self {
            // The box is half-open: (-0.5, 0.5].
            Resample::Nearest | Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * PI;
                    // `0.54f + 0.46f * cos(x)`: C float literals widened to double.
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// The views SigLIP sees for one image: base view first, then the tiles row-major.
#[derive(Clone, Debug)]
pub struct PixelViews {
    /// Number of views, `1 + rows * cols`.
    pub views: usize,
    /// Side of each view in pixels.
    pub tile: usize,
    /// `[views, 3, tile, tile]`, normalised.
    pub data: Vec<f32>,
    /// Original image `(h, w)`, needed by [`pack_features`].
    pub image_size: (usize, usize),
}

/// uint8 views before normalisation (base first, then tiles row-major), as the HF processor makes.
/// Mirrors transformers `LlavaOnevisionImageProcessorPil.get_image_patches`.
pub fn views_u8(
    img: &RgbImage,
    geom: &ImageGeometry,
    resample: Resample,
) -> Result<Vec<RgbImage>, AnyresError> {
    geom.validate()?;
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 {
        return Err(AnyresError::Empty { width, height });
    }
    let (h, w) = (height as usize, width as usize);
    let (ph, pw) = geom.select_best_resolution(h, w);
    let (rh, rw) = patch_output_size(h, w, (ph, pw));
    let tile = to_u32(geom.tile, geom.tile)?;
    // The base view and the pinpoint-sized image are independent resizes: run them side by side.
    let (resized, base) = std::thread::scope(|s| {
        let base = s.spawn(|| resize(img, tile, tile, resample));
        let resized = resize(img, to_u32(rw, rh)?, to_u32(rh, rw)?, resample);
        let base = base
            .join()
            .unwrap_or(Err(AnyresError::Geometry("base view resize panicked")));
        Ok::<_, AnyresError>((resized?, base?))
    })?;

    // Zero-pad to the pinpoint, centered: [ph, pw, 3] with the image at (top, left).
    let (top, left) = ((ph - rh) / 2, (pw - rw) / 2);
    let mut canvas = blank(pw, ph)?;
    image::imageops::replace(&mut canvas, &resized, left as i64, top as i64);

    let (rows, cols) = (ph / geom.tile, pw / geom.tile);
    let mut views = Vec::with_capacity(1 + rows * cols);
    views.push(base);
    for r in 0..rows as u32 {
        for c in 0..cols as u32 {
            views.push(
                image::imageops::crop_imm(&canvas, c * tile, r * tile, tile, tile).to_image(),
            );
        }
    }
    Ok(views)
}

/// Normalised views of one image: [`views_u8`], then `(x * rescale - mean) / std`, channels first.
/// Mirrors transformers `LlavaOnevisionImageProcessorPil._preprocess` (rescale, normalize).
pub fn preprocess(
    img: &RgbImage,
    geom: &ImageGeometry,
    resample: Resample,
    norm: &Normalize,
) -> Result<PixelViews, AnyresError> {
    if norm.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err(AnyresError::Normalize(norm.std));
    }
    let views = views_u8(img, geom, resample)?;
    let mut chw = Vec::with_capacity(views.len() * 3 * geom.tile * geom.tile);
    for view in &views {
        for c in 0..3 {
            chw.extend(view.pixels().map(|px| px.0[c]));
        }
    }
    let image_size = (img.height() as usize, img.width() as usize);
    PixelViews::from_u8_chw(&chw, views.len(), geom.tile, image_size, norm)
}

impl PixelViews {
    /// Normalises uint8 views laid out `[views, 3, tile, tile]` (what the gateway sends) exactly as
    /// the HF processor does: numpy rescales in f64, casts to f32, then normalises in f32.
    pub fn from_u8_chw(
        chw: &[u8],
        views: usize,
        tile: usize,
        image_size: (usize, usize),
        norm: &Normalize,
    ) -> Result<Self, AnyresError> {
        if norm.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(AnyresError::Normalize(norm.std));
        }
        let plane = tile * tile;
        if views == 0 || chw.len() != views * 3 * plane {
            return Err(AnyresError::Geometry(
                "pixel bytes do not match views x 3 x tile x tile",
            ));
        }
        let rescale = norm.rescale_f64();
        // One table per channel: the 256 byte values, normalised (same arithmetic per value).
        let lut: [[f32; 256]; 3] = std::array::from_fn(|c| {
            std::array::from_fn(|b| {
                let x = (b as f64 * rescale) as f32;
                (x - norm.mean[c]) / norm.std[c]
            })
        });
        let mut data = Vec::with_capacity(chw.len());
        for (i, plane_bytes) in chw.chunks_exact(plane).enumerate() {
            let t = &lut[i % 3];
            data.extend(plane_bytes.iter().map(|&b| t[b as usize]));
        }
        Ok(PixelViews {
            views,
            tile,
            data,
            image_size,
        })
    }
}

/// Converts a pixel size to `u32`, naming the offending size on overflow.
fn to_u32(side: usize, other: usize) -> Result<u32, AnyresError> {
    u32::try_from(side).map_err(|_| AnyresError::TooLarge {
        width: side,
        height: other,
    })
}

/// A zero-filled `width x height` RGB image, or `TooLarge` when the buffer size overflows.
fn blank(width: usize, height: usize) -> Result<RgbImage, AnyresError> {
    let too_large = AnyresError::TooLarge { width, height };
    let len = width.checked_mul(height).and_then(|p| p.checked_mul(3));
    match (len, u32::try_from(width), u32::try_from(height)) {
        (Some(len), Ok(w), Ok(h)) if len <= isize::MAX as usize => {
            RgbImage::from_raw(w, h, vec![0; len]).ok_or(too_large)
        }
        _ => Err(too_large),
    }
}

/// Fixed-point fraction bits of Pillow's 8-bit resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel filter taps along one axis: output `i` reads `len` inputs from `start`.
struct Taps {
    /// `(start, len)` per output pixel.
    bounds: Vec<(usize, usize)>,
    /// Fixed-point weights, `stride` per output pixel (the first `len` used).
    weights: Vec<i32>,
    stride: usize,
}

impl Taps {
    /// Taps of resampling `in_size` pixels to `out_size` (Pillow `precompute_coeffs` followed by
    /// `normalize_coeffs_8bpc`), float arithmetic in Pillow's order.
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Taps {
        // Pillow takes the box extent as a C float.
        let scale = f64::from(in_size as f32) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let stride = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * stride];
        let mut window = vec![0f64; stride];
        for (i, row) in weights.chunks_exact_mut(stride).enumerate() {
            let center = (i as f64 + 0.5) * scale;
            // C `(int)` truncates toward zero.
            let start = ((center - support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let end = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(start as i64) as usize;
            let len = (end - start).min(stride);
            let mut total = 0.0;
            for (k, w) in window[..len].iter_mut().enumerate() {
                *w = filter.kernel(((k + start) as f64 - center + 0.5) * inv_filterscale);
                total += *w;
            }
            for (fixed, &w) in row.iter_mut().zip(&window[..len]) {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                // Round half away from zero, then truncate like C `(int)`.
                *fixed = if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                };
            }
            bounds.push((start, len));
        }
        Taps {
            bounds,
            weights,
            stride,
        }
    }

    /// Input range `[first, last)` read by any output pixel.
    fn span(&self) -> (usize, usize) {
        let first = self.bounds.first().map_or(0, |b| b.0);
        let last = self.bounds.last().map_or(0, |b| b.0 + b.1);
        (first, last.max(first))
    }
}

/// Pillow-exact 8-bit resize (`Image.resize` with any PIL filter, no `reducing_gap`). Nearest
/// is an affine scale ([`resize_nearest`]); the others are
/// one separable pass per changed side, 8-bit in between, horizontal first as in Pillow 12.3.0
/// (the version behind the HF reference fixtures; Pillow 13 goes vertical-first when the height
/// shrinks by more than twice the width's shrink, changing a few values by one).
/// Mirrors Pillow `ImagingResampleInner`.
pub fn resize(
    img: &RgbImage,
    width: u32,
    height: u32,
    resample: Resample,
) -> Result<RgbImage, AnyresError> {
    let (in_w, in_h) = img.dimensions();
    if in_w == 0 || in_h == 0 {
        return Err(AnyresError::Empty {
            width: in_w,
            height: in_h,
        });
    }
    if width == 0 || height == 0 {
        return Err(AnyresError::EmptyTarget { width, height });
    }
    let (in_w, in_h, out_w, out_h) = (
        in_w as usize,
        in_h as usize,
        width as usize,
        height as usize,
    );
    let mut out = blank(out_w, out_h)?;
    if resample == Resample::Nearest {
        resize_nearest(img.as_raw(), (in_w, in_h), &mut out);
        return Ok(out);
    }
    let src = img.as_raw();
    let (need_horizontal, need_vertical) = (out_w != in_w, out_h != in_h);
    let horizontal = Taps::new(in_w, out_w, resample);
    let vertical = Taps::new(in_h, out_h, resample);
    // Pillow <= 12 (the reference environment, 12.3.0): horizontal pass first, over only the
    // source rows the vertical pass reads: [rows, out_w, 3], then [out_h, out_w, 3]. (Pillow 13
    // runs the vertical pass first when the height shrinks by more than twice the width's
    // shrink, which changes a few values by one.)
    let (first, last) = if need_vertical {
        vertical.span()
    } else {
        (0, in_h)
    };
    let temp = if need_horizontal {
        horizontal_pass(src, in_w, first..last, &horizontal)
    } else {
        src[first * in_w * 3..last * in_w * 3].to_vec()
    };
    let pixels = if need_vertical {
        vertical_pass(&temp, out_w, &vertical, first)
    } else {
        temp
    };
    out.copy_from_slice(&pixels);
    Ok(out)
}

/// Nearest-neighbour scale of an `[in_h, in_w, 3]` image into `out` (Pillow `_resize` with
/// NEAREST: an affine transform `a = (in_w / out_w, 0, 0, 0, in_h / out_h, 0)` run by
/// `ImagingScaleAffine`): the source coordinate starts at half a step and accumulates the step in
/// f64, truncated toward zero, exactly as there.
fn resize_nearest(src: &[u8], (in_w, in_h): (usize, usize), out: &mut RgbImage) {
    let (out_w, out_h) = (out.width() as usize, out.height() as usize);
    // `(double)(box[2] - box[0]) / xsize`, the box in C floats.
    let step = |inp: usize, outp: usize| f64::from(inp as f32) / outp as f64;
    let coords = |inp: usize, outp: usize| -> Vec<Option<usize>> {
        let a = step(inp, outp);
        let mut o = a * 0.5;
        (0..outp)
            .map(|_| {
                // COORD(v): -1 below zero, else (int)v.
                let c = if o < 0.0 { None } else { Some(o as usize) };
                o += a;
                c.filter(|&c| c < inp)
            })
            .collect()
    };
    let (xs, ys) = (coords(in_w, out_w), coords(in_h, out_h));
    let dst: &mut [u8] = out;
    for (y, row) in dst.chunks_exact_mut(out_w * 3).enumerate() {
        let Some(sy) = ys[y] else { continue };
        let src_row = &src[sy * in_w * 3..][..in_w * 3];
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            if let Some(sx) = xs[x] {
                px.copy_from_slice(&src_row[sx * 3..sx * 3 + 3]);
            }
        }
    }
}

/// Horizontal pass over `rows` of an `[.., width, 3]` image: `[rows.len(), taps outputs, 3]`
/// (Pillow `ImagingResampleHorizontal_8bpc`: 32-bit accumulators, as there).
fn horizontal_pass(src: &[u8], width: usize, rows: Range<usize>, taps: &Taps) -> Vec<u8> {
    let out_w = taps.bounds.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for_each_row(&mut out, out_w * 3, |i, line| {
        let y = rows.start + i;
        let src_line = &src[y * width * 3..][..width * 3];
        for (x, px) in line.chunks_exact_mut(3).enumerate() {
            let (start, len) = taps.bounds[x];
            let weights = &taps.weights[x * taps.stride..][..len];
            let mut acc = [ROUND_HALF; 3];
            for (p, &w) in src_line[start * 3..][..len * 3]
                .chunks_exact(3)
                .zip(weights)
            {
                for (a, &v) in acc.iter_mut().zip(p) {
                    *a += i32::from(v) * w;
                }
            }
            for (v, a) in px.iter_mut().zip(acc) {
                *v = clip8(a);
            }
        }
    });
    out
}

/// Vertical pass of a `[.., width, 3]` image whose row 0 is source row `first_row`:
/// `[taps outputs, width, 3]` (Pillow `ImagingResampleVertical_8bpc`; a whole row of 32-bit
/// accumulators per tap, so the inner loop runs over contiguous bytes).
fn vertical_pass(src: &[u8], width: usize, taps: &Taps, first_row: usize) -> Vec<u8> {
    let row_len = width * 3;
    let mut out = vec![0u8; taps.bounds.len() * row_len];
    for_each_row(&mut out, row_len, |y, line| {
        let (start, len) = taps.bounds[y];
        let weights = &taps.weights[y * taps.stride..][..len];
        let mut acc = vec![ROUND_HALF; row_len];
        for (k, &w) in weights.iter().enumerate() {
            let src_row = &src[(start + k - first_row) * row_len..][..row_len];
            for (a, &v) in acc.iter_mut().zip(src_row) {
                *a += i32::from(v) * w;
            }
        }
        for (v, &a) in line.iter_mut().zip(&acc) {
            *v = clip8(a);
        }
    });
    out
}

/// Rounding term of the fixed-point sums (half of one 8-bit step).
const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// A fixed-point sum back to 8 bits, clamped (Pillow `clip8`).
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Calls `f(row, line)` for every `row_len`-byte row of `out`; large images are split into bands
/// of rows on scoped threads (every output byte is computed the same way either way).
fn for_each_row(out: &mut [u8], row_len: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    // Below ~64k output pixels a thread costs more than it saves.
    if threads < 2 || out.len() < 3 * 65536 || row_len == 0 {
        for (y, line) in out.chunks_exact_mut(row_len.max(1)).enumerate() {
            f(y, line);
        }
        return;
    }
    let band = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (b, chunk) in out.chunks_mut(band * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, line) in chunk.chunks_exact_mut(row_len).enumerate() {
                    f(b * band + i, line);
                }
            });
        }
    });
}
