//! Images: data URI or http(s) bytes → header check → decode → anyres views → `v1::Image`.
//!
//! The pixel count is read from the image header and checked before anything is decoded, so a
//! small file declaring a huge canvas costs nothing. Decoding and resizing run on the blocking
//! pool. The views come from `r4b_model::anyres::views_u8` (the same code the worker's
//! tests pin against the HF processor) and are sent channel-major (`[views, 3, tile, tile]`).

use std::io::Cursor;
use std::sync::Arc;

use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
use base64::Engine;
use image::{ImageReader, Limits, RgbImage};
use r4b_model::anyres::{views_u8, ImageGeometry, Resample};
use r4b_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::config::GatewayConfig;
use crate::fetch::{FetchError, ImageFetcher};

/// Longest URL quoted in an error message.
const MAX_QUOTED_URL: usize = 200;

/// An image failure and the request field it came from.
#[derive(Debug, thiserror::Error)]
#[error("{param}: {kind}")]
pub struct ImageError {
    /// The request field (e.g. `messages[0].content[1].image_url`).
    pub param: String,
    /// What went wrong.
    pub kind: ImageErrorKind,
}

/// What went wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageErrorKind {
    /// Neither a data URI nor an http(s) URL.
    #[error("unsupported image URL `{0}`: use a data:image/...;base64 URI or an http(s) URL")]
    Scheme(String),
    /// A data URI that is not base64 or does not decode.
    #[error("malformed data URI: {0}")]
    DataUri(String),
    /// The URL could not be fetched (or was refused).
    #[error("cannot fetch `{url}`: {source}")]
    Fetch {
        /// The URL, shortened.
        url: String,
        /// Why.
        source: FetchError,
    },
    /// The encoded image is larger than the limit.
    #[error("image of about {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size in bytes.
        bytes: usize,
        /// Limit in bytes.
        limit: usize,
    },
    /// The header declares more pixels than allowed.
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// Limit in pixels.
        limit: u64,
    },
    /// Not an image in a supported format, or corrupt.
    #[error("cannot decode image: {0}")]
    Undecodable(String),
    /// Anyres preprocessing failed.
    #[error("cannot preprocess image: {0}")]
    Preprocess(String),
    /// The served model takes no images.
    #[error("this model takes no images (the coordinator reported no image geometry)")]
    Unsupported,
    /// More images than allowed in one request.
    #[error("{count} images exceed the limit of {limit} per request")]
    TooMany {
        /// Images in the request.
        count: usize,
        /// Limit.
        limit: usize,
    },
}

/// Where one image of a request comes from.
#[derive(Clone, Debug)]
pub struct ImageRef {
    /// The request field, for errors.
    pub param: String,
    /// The URL (`data:` or http(s)).
    pub url: String,
}

/// Turns image URLs into preprocessed `v1::Image`s.
#[derive(Clone, Debug)]
pub struct ImagePipeline {
    geometry: Option<ImageGeometry>,
    resample: Resample,
    fetcher: ImageFetcher,
    max_bytes: usize,
    max_pixels: u64,
    max_images: usize,
    /// Decoded bytes all decodes together may hold, in KiB permits.
    decode_budget: Arc<Semaphore>,
    decode_budget_kib: u32,
}

/// Bytes one decode may hold per pixel at its peak: the decoder's RGBA buffer (4) plus the RGB
/// copy (3), rounded up.
const DECODE_BYTES_PER_PIXEL: u64 = 8;

impl ImagePipeline {
    /// A pipeline for `geometry` (`None`: images are refused) with the limits of `config`.
    pub fn new(
        geometry: Option<ImageGeometry>,
        resample: Resample,
        config: &GatewayConfig,
    ) -> Result<Self, FetchError> {
        let allowed = crate::fetch::AllowedHosts::new(&config.allowed_media_hosts)
            .map_err(|e| FetchError::Transport(format!("--allowed-media-hosts: {e}")))?;
        let fetcher = ImageFetcher::with_allowed_hosts(
            config.allow_private_image_urls,
            allowed,
            config.max_image_bytes,
            config.image_fetch_timeout,
        )?;
        let decode_budget_kib = u32::try_from(config.max_decode_bytes.div_ceil(1024).max(1))
            .unwrap_or(u32::MAX)
            .min(Semaphore::MAX_PERMITS as u32);
        Ok(ImagePipeline {
            geometry,
            resample,
            fetcher,
            max_bytes: config.max_image_bytes,
            max_pixels: config.max_image_pixels,
            max_images: config.max_images_per_request,
            decode_budget: Arc::new(Semaphore::new(decode_budget_kib as usize)),
            decode_budget_kib,
        })
    }

    /// Loads all images of a request concurrently, in order.
    pub async fn load_all(&self, refs: &[ImageRef]) -> Result<Vec<pb::Image>, ImageError> {
        if refs.len() > self.max_images {
            let param = refs
                .get(self.max_images)
                .map(|r| r.param.clone())
                .unwrap_or_default();
            return Err(ImageError {
                param,
                kind: ImageErrorKind::TooMany {
                    count: refs.len(),
                    limit: self.max_images,
                },
            });
        }
        futures::future::try_join_all(refs.iter().map(|r| self.load(r))).await
    }

    /// Loads one image.
    pub async fn load(&self, image: &ImageRef) -> Result<pb::Image, ImageError> {
        self.load_image(image)
            .instrument(tracing::info_span!("image", param = %image.param))
            .await
    }

    async fn load_image(&self, image: &ImageRef) -> Result<pb::Image, ImageError> {
        let at = |kind| ImageError {
            param: image.param.clone(),
            kind,
        };
        let geometry = self
            .geometry
            .clone()
            .ok_or(ImageErrorKind::Unsupported)
            .map_err(at)?;
        let bytes = self
            .bytes_of(&image.url)
            .instrument(tracing::info_span!("image fetch"))
            .await
            .map_err(at)?;
        let (max_pixels, resample) = (self.max_pixels, self.resample);
        // The header alone says how much memory decoding takes; wait for that much room.
        let (width, height) = probe_dimensions(&bytes, max_pixels).map_err(at)?;
        crate::trim::after_large_request();
        let need = u64::from(width) * u64::from(height) * DECODE_BYTES_PER_PIXEL;
        let kib = u32::try_from(need.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.decode_budget_kib);
        let permit = self
            .decode_budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| {
                at(ImageErrorKind::Preprocess(
                    "the image decoder is shut down".into(),
                ))
            })?;
        let parent = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let t = std::time::Instant::now();
            let rgb = tracing::info_span!(parent: &parent, "image decode", width, height)
                .in_scope(|| decode_rgb(&bytes, max_pixels))?;
            let decoded = t.elapsed();
            let out = tracing::info_span!(parent: &parent, "image views")
                .in_scope(|| to_proto(&rgb, &geometry, resample));
            tracing::debug!(
                "image {}x{}: decoded in {:.1} ms, views in {:.1} ms",
                rgb.width(),
                rgb.height(),
                decoded.as_secs_f64() * 1e3,
                (t.elapsed() - decoded).as_secs_f64() * 1e3
            );
            out
        });
        match task.await {
            Ok(result) => result.map_err(at),
            Err(e) => Err(at(ImageErrorKind::Preprocess(format!(
                "worker task failed: {e}"
            )))),
        }
    }

    async fn bytes_of(&self, url: &str) -> Result<Vec<u8>, ImageErrorKind> {
        if url.starts_with("data:") {
            return decode_data_uri(url, self.max_bytes);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return self
                .fetcher
                .fetch(url)
                .await
                .map_err(|source| ImageErrorKind::Fetch {
                    url: shorten(url),
                    source,
                });
        }
        Err(ImageErrorKind::Scheme(shorten(url)))
    }
}

fn shorten(url: &str) -> String {
    match url.char_indices().nth(MAX_QUOTED_URL) {
        Some((cut, _)) => format!("{}...", &url[..cut]),
        None => url.to_string(),
    }
}

/// Bytes of a `data:[<mime>][;params];base64,<payload>` URI (padding optional, whitespace
/// ignored), refusing payloads over `max_bytes` before decoding.
pub fn decode_data_uri(uri: &str, max_bytes: usize) -> Result<Vec<u8>, ImageErrorKind> {
    let rest = uri
        .strip_prefix("data:")
        .ok_or_else(|| ImageErrorKind::DataUri("missing `data:` prefix".into()))?;
    let (meta, payload) = rest
        .split_once(',')
        .ok_or_else(|| ImageErrorKind::DataUri("missing `,` before the payload".into()))?;
    if !meta
        .split(';')
        .any(|p| p.trim().eq_ignore_ascii_case("base64"))
    {
        return Err(ImageErrorKind::DataUri(
            "only base64 data URIs are supported".into(),
        ));
    }
    let mime = meta.split(';').next().unwrap_or_default().trim();
    if !mime.is_empty() && !mime.starts_with("image/") && mime != "application/octet-stream" {
        return Err(ImageErrorKind::DataUri(format!(
            "media type `{mime}` is not an image"
        )));
    }
    let approx = payload.len() / 4 * 3;
    if approx > max_bytes.saturating_add(3) {
        return Err(ImageErrorKind::TooLarge {
            bytes: approx,
            limit: max_bytes,
        });
    }
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let engine = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let bytes = engine
        .decode(compact.as_bytes())
        .map_err(|e| ImageErrorKind::DataUri(format!("invalid base64: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(ImageErrorKind::TooLarge {
            bytes: bytes.len(),
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageErrorKind> {
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageErrorKind::Undecodable(e.to_string()))
}

/// `(width, height)` from the header alone; refuses an unknown format, a zero size and more
/// than `max_pixels`.
pub fn probe_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), ImageErrorKind> {
    let mut probe = reader(bytes)?;
    probe.limits(Limits::no_limits()); // only the header is read here
    if probe.format().is_none() {
        return Err(ImageErrorKind::Undecodable("unknown image format".into()));
    }
    let (width, height) = probe
        .into_dimensions()
        .map_err(|e| ImageErrorKind::Undecodable(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(ImageErrorKind::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    if width == 0 || height == 0 {
        return Err(ImageErrorKind::Undecodable(format!(
            "image has zero size {width}x{height}"
        )));
    }
    Ok((width, height))
}

/// Reads the dimensions from the header, refuses more than `max_pixels`, then decodes to RGB.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ImageErrorKind> {
    let (width, height) = probe_dimensions(bytes, max_pixels)?;
    let mut decoder = reader(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    decoder.limits(limits);
    let img = decoder
        .decode()
        .map_err(|e| ImageErrorKind::Undecodable(e.to_string()))?;
    Ok(img.to_rgb8())
}

/// Anyres views of `rgb` as a `v1::Image`: views channel-major, SHA-256 digest of the size and
/// pixels, and the `<image>` token count.
pub fn to_proto(
    rgb: &RgbImage,
    geometry: &ImageGeometry,
    resample: Resample,
) -> Result<pb::Image, ImageErrorKind> {
    let (width, height) = rgb.dimensions();
    let views =
        views_u8(rgb, geometry, resample).map_err(|e| ImageErrorKind::Preprocess(e.to_string()))?;
    let plane = geometry.tile * geometry.tile;
    let mut chw = Vec::with_capacity(views.len() * 3 * plane);
    for view in &views {
        for c in 0..3 {
            chw.extend(view.as_raw().chunks_exact(3).map(|px| px[c]));
        }
    }
    let mut hasher = Sha256::new();
    hasher.update(width.to_le_bytes());
    hasher.update(height.to_le_bytes());
    hasher.update(rgb.as_raw());
    let too_big =
        |what: &str| ImageErrorKind::Preprocess(format!("{what} does not fit in 32 bits"));
    let num_tokens = geometry.num_image_tokens(height as usize, width as usize);
    Ok(pb::Image {
        views_u8: chw,
        views: u32::try_from(views.len()).map_err(|_| too_big("view count"))?,
        tile: u32::try_from(geometry.tile).map_err(|_| too_big("tile"))?,
        height,
        width,
        digest: hasher.finalize().to_vec(),
        num_tokens: u32::try_from(num_tokens).map_err(|_| too_big("token count"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (IEEE) as PNG chunks use it.
    fn crc32(data: &[u8]) -> u32 {
        crc32fast::hash(data)
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    }

    /// A PNG that declares `w x h` (8-bit RGB) but carries only a token IDAT.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // depth 8, colour type 2 (RGB), deflate, filter 0, no interlace
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(
            b"IDAT",
            &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(chunk(b"IEND", &[]));
        png
    }

    fn encode_png(img: &RgbImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    #[test]
    fn crc_of_iend_is_the_known_constant() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }

    #[test]
    fn huge_declared_png_is_refused_from_the_header() {
        let png = png_header_only(30000, 30000);
        assert!(png.len() < 100);
        match decode_rgb(&png, 64_000_000) {
            Err(ImageErrorKind::TooManyPixels {
                width: 30000,
                height: 30000,
                limit: 64_000_000,
            }) => {}
            other => panic!("expected TooManyPixels, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_undecodable() {
        assert!(matches!(
            decode_rgb(b"definitely not an image", 1000),
            Err(ImageErrorKind::Undecodable(_))
        ));
        let mut png = encode_png(&RgbImage::new(4, 4));
        png.truncate(png.len() / 2 + 20);
        assert!(matches!(
            decode_rgb(&png, 1000),
            Err(ImageErrorKind::Undecodable(_))
        ));
    }

    #[test]
    fn png_round_trip() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        let back = decode_rgb(&encode_png(&img), 1000).expect("decode");
        assert_eq!(back, img);
    }

    #[test]
    fn data_uri_forms() {
        // "hello" = aGVsbG8= ; unpadded and with whitespace too.
        assert_eq!(
            decode_data_uri("data:image/png;base64,aGVsbG8=", 100).expect("padded"),
            b"hello"
        );
        assert_eq!(
            decode_data_uri("data:image/png;base64,aGVsbG8", 100).expect("unpadded"),
            b"hello"
        );
        assert_eq!(
            decode_data_uri("data:;base64,aGVs\nbG8=", 100).expect("newline"),
            b"hello"
        );
        assert!(matches!(
            decode_data_uri("data:image/png,hello", 100),
            Err(ImageErrorKind::DataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("data:image/png;base64", 100),
            Err(ImageErrorKind::DataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("data:text/plain;base64,aGVsbG8=", 100),
            Err(ImageErrorKind::DataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("data:image/png;base64,!!!!", 100),
            Err(ImageErrorKind::DataUri(_))
        ));
        assert!(matches!(
            decode_data_uri("data:image/png;base64,aGVsbG8=", 4),
            Err(ImageErrorKind::TooLarge { .. })
        ));
    }

    fn small_geometry() -> ImageGeometry {
        ImageGeometry {
            tile: 28,
            patch: 14,
            pinpoints: vec![(28, 28), (28, 56), (56, 28), (56, 56)],
            max_tiles: 9,
        }
    }

    #[test]
    fn proto_image_of_a_square_image() {
        // 28x28 picks pinpoint 28x28: 1x1 grid; base + 1 tile = 2 views. Features: 2x2 per tile,
        // unpadded 2x2, no cap; tokens = 4 (base) + 2*2 + 2 (newlines) = 10.
        let img = RgbImage::from_fn(28, 28, |x, y| image::Rgb([x as u8, y as u8, 200]));
        let p = to_proto(&img, &small_geometry(), Resample::Bicubic).expect("proto");
        assert_eq!(
            (p.views, p.tile, p.height, p.width, p.num_tokens),
            (2, 28, 28, 28, 10)
        );
        assert_eq!(p.views_u8.len(), 2 * 3 * 28 * 28);
        // The tile of an image already at the pinpoint size is the image itself, channel-major.
        let tile = &p.views_u8[3 * 28 * 28..];
        assert_eq!(tile[0], 0); // R plane (0,0)
        assert_eq!(tile[5], 5); // R plane (x=5, y=0)
        assert_eq!(tile[28 * 28 + 28 * 3], 3); // G plane (x=0, y=3)
        assert_eq!(tile[2 * 28 * 28 + 17], 200); // B plane
        let mut h = Sha256::new();
        h.update(28u32.to_le_bytes());
        h.update(28u32.to_le_bytes());
        h.update(img.as_raw());
        assert_eq!(p.digest, h.finalize().to_vec());
    }

    #[test]
    fn proto_image_of_a_wide_image() {
        // 56x28 (w x h) picks pinpoint (h 28, w 56): 1x2 grid, 3 views; feature map 2x4 fills the
        // grid exactly, so tokens = 4 + 2*4 + 2 = 14.
        let img = RgbImage::new(56, 28);
        let p = to_proto(&img, &small_geometry(), Resample::Bilinear).expect("proto");
        assert_eq!((p.views, p.num_tokens), (3, 14));
    }
}
