//! Target `image`: image bytes → the gateway's `ImagePipeline::load` (the path of every image
//! in a chat request): data-URI decoding, `probe_dimensions` (pixel limit from the header),
//! the decode budget, `decode_rgb` with limits, and `to_proto` (R-4B's anyres views, digest,
//! token count). Properties of an accepted image: views of `3 x 384 x 384` bytes each, at most
//! `max_image_pixels` pixels, and the token count of `ImageGeometry::num_image_tokens`.
//!
//! Input: the raw image file bytes (any format the gateway's `image` build reads: PNG, JPEG,
//! GIF, WebP, BMP).

use std::io::Cursor;
use std::sync::Arc;

use base64::Engine;
use fastrand::Rng;
use r4b_gateway::images::ImageRef;

use crate::env::{r4b_geometry, Env};
use crate::mutate;
use crate::Target;

/// The `image` target.
pub struct ImageTarget {
    env: Arc<Env>,
}

impl ImageTarget {
    /// Starts the environment.
    pub fn new() -> anyhow::Result<Self> {
        Ok(ImageTarget { env: Env::start()? })
    }
}

/// CRC-32 (IEEE) as PNG chunks use it.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Recomputes the CRC of every complete PNG chunk, so mutations reach past the CRC check.
pub fn fix_png_crcs(data: &mut [u8]) {
    if !data.starts_with(b"\x89PNG\r\n\x1a\n") {
        return;
    }
    let mut at = 8;
    while at + 12 <= data.len() {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len) else {
            return;
        };
        if end + 4 > data.len() {
            return;
        }
        let crc = crc32(&data[at + 4..end]);
        data[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

/// A PNG with a valid header declaring `width x height` and one tiny IDAT (a "bomb").
pub fn png_bomb(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], body: &[u8]| {
        out.extend((body.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(body);
        out.extend(&c);
        out.extend(crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // zlib stream of a few zero bytes.
    chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
    );
    chunk(b"IEND", &[]);
    out
}

/// Small real images of every accepted format, and header-only bombs, as `(name, bytes)`.
pub fn seed_images() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
    let mut out = Vec::new();
    let rgb = RgbImage::from_fn(37, 23, |x, y| Rgb([(x * 7) as u8, (y * 11) as u8, 128]));
    let rgba = RgbaImage::from_fn(19, 41, |x, y| {
        Rgba([(x * 13) as u8, 64, (y * 5) as u8, (x + y) as u8])
    });
    let formats = [
        ("png", ImageFormat::Png),
        ("jpg", ImageFormat::Jpeg),
        ("gif", ImageFormat::Gif),
        ("webp", ImageFormat::WebP),
        ("bmp", ImageFormat::Bmp),
    ];
    for (ext, format) in formats {
        let mut buf = Cursor::new(Vec::new());
        rgb.write_to(&mut buf, format)?;
        out.push((format!("rgb-37x23.{ext}"), buf.into_inner()));
        if format != ImageFormat::Jpeg {
            let mut buf = Cursor::new(Vec::new());
            rgba.write_to(&mut buf, format)?;
            out.push((format!("rgba-19x41.{ext}"), buf.into_inner()));
        }
    }
    let wide = RgbImage::from_fn(1000, 3, |x, _| Rgb([x as u8, 0, 0]));
    let mut buf = Cursor::new(Vec::new());
    wide.write_to(&mut buf, ImageFormat::Png)?;
    out.push(("wide-1000x3.png".into(), buf.into_inner()));
    let one = RgbImage::from_pixel(1, 1, Rgb([255, 0, 0]));
    let mut buf = Cursor::new(Vec::new());
    one.write_to(&mut buf, ImageFormat::Png)?;
    out.push(("one-1x1.png".into(), buf.into_inner()));
    // A real 4K image (compresses to little): the decode and views cost of a large input.
    let big = RgbImage::from_fn(3840, 2160, |x, y| Rgb([(x / 64) as u8, (y / 64) as u8, 7]));
    let mut buf = Cursor::new(Vec::new());
    big.write_to(&mut buf, ImageFormat::Png)?;
    out.push(("big-3840x2160.png".into(), buf.into_inner()));
    out.push(("bomb-png-65535x65535.png".into(), png_bomb(65535, 65535)));
    out.push(("bomb-png-7680x4320.png".into(), png_bomb(7680, 4320)));
    out.push(("bomb-png-1x33177600.png".into(), png_bomb(1, 33_177_600)));
    // BMP header declaring 30000 x 30000 with no pixel data.
    let mut bmp = b"BM".to_vec();
    bmp.extend(
        54u32
            .to_le_bytes()
            .iter()
            .chain(&[0u8; 4])
            .chain(&54u32.to_le_bytes()),
    );
    bmp.extend(40u32.to_le_bytes());
    bmp.extend(30000i32.to_le_bytes());
    bmp.extend(30000i32.to_le_bytes());
    bmp.extend(1u16.to_le_bytes());
    bmp.extend(24u16.to_le_bytes());
    bmp.extend([0u8; 24]);
    out.push(("bomb-30000x30000.bmp".into(), bmp));
    // GIF logical screen 65535 x 65535 with one 65535 x 65535 frame and a tiny LZW body.
    let mut gif = b"GIF89a".to_vec();
    gif.extend([0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00]);
    gif.extend([0x2c, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x00]);
    gif.extend([0x02, 0x02, 0x44, 0x01, 0x00, 0x3b]);
    out.push(("bomb-65535x65535.gif".into(), gif));
    Ok(out)
}

const MAGIC: &[&[u8]] = &[
    b"\x89PNG\r\n\x1a\n",
    b"IHDR",
    b"IDAT",
    b"IEND",
    b"PLTE",
    b"tRNS",
    b"acTL",
    b"fcTL",
    b"\xff\xd8\xff",
    b"\xff\xc0",
    b"\xff\xc4",
    b"\xff\xda",
    b"\xff\xd9",
    b"GIF89a",
    b"NETSCAPE2.0",
    b"\x21\xf9\x04",
    b"RIFF",
    b"WEBPVP8 ",
    b"VP8L",
    b"VP8X",
    b"ANIM",
    b"ANMF",
    b"BM",
];

impl Target for ImageTarget {
    fn name(&self) -> &'static str {
        "image"
    }

    fn generate(&self, rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut data = match rng.u8(..10) {
            0 => {
                let a = mutate::pick(rng, seeds).cloned().unwrap_or_default();
                let b = mutate::pick(rng, seeds).cloned().unwrap_or_default();
                mutate::splice(rng, &a, &b)
            }
            1 => png_bomb(rng.u32(..), rng.u32(..)),
            _ => mutate::pick(rng, seeds).cloned().unwrap_or_default(),
        };
        // Headers are in the first bytes: aim half of the mutations there.
        if rng.bool() && data.len() > 64 {
            let mut head = data[..64].to_vec();
            mutate::bytes(rng, &mut head, 4, MAGIC);
            data.splice(..64, head);
        } else {
            mutate::bytes(rng, &mut data, 6, MAGIC);
        }
        if rng.u8(..4) != 0 {
            fix_png_crcs(&mut data);
        }
        data
    }

    fn run(&self, input: &[u8]) -> Result<bool, String> {
        let state = &self.env.state;
        let uri = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(input)
        );
        let image = ImageRef {
            param: "messages[0].content[0].image_url".into(),
            url: uri,
        };
        let Ok(img) = self.env.runtime.block_on(state.images().load(&image)) else {
            return Ok(false);
        };
        let g = r4b_geometry();
        let view_bytes = 3 * g.tile * g.tile;
        if img.tile as usize != g.tile
            || img.views == 0
            || img.views_u8.len() != img.views as usize * view_bytes
        {
            return Err(format!(
                "{} views of tile {} in {} bytes",
                img.views,
                img.tile,
                img.views_u8.len()
            ));
        }
        let pixels = u64::from(img.width) * u64::from(img.height);
        if pixels == 0 || pixels > state.config().max_image_pixels {
            return Err(format!("accepted a {}x{} image", img.width, img.height));
        }
        let tokens = g.num_image_tokens(img.height as usize, img.width as usize);
        if img.num_tokens as usize != tokens {
            return Err(format!("{} tokens, geometry says {tokens}", img.num_tokens));
        }
        Ok(true)
    }
}
