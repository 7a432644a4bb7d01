//! Time of the anyres views of one image (`views_u8`: the Pillow-exact resizes, padding and tile
//! crops the gateway runs for every image), with R-4B's geometry (384-pixel tiles, LLaVA-OV
//! pinpoints 1..6 × 1..6 tiles). Prints the best of 20 runs and a checksum of the views (equal
//! checksums = identical bytes).
//!
//! `cargo run --release -p r4b-worker --example bench_views [WIDTH HEIGHT]` (default 640 480).

use r4b_worker::model::anyres::{views_u8, ImageGeometry, Resample};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (w, h) = match args[..] {
        [w, h, ..] => (w as u32, h as u32),
        _ => (640, 480),
    };
    let pinpoints = (1..=6)
        .flat_map(|a| (1..=6).map(move |b| (a * 384, b * 384)))
        .collect();
    let geom = ImageGeometry {
        tile: 384,
        patch: 14,
        pinpoints,
        max_tiles: 9,
    };
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x * y) as u8])
    });
    let (mut best, mut checksum, mut count) = (f64::MAX, 0u64, 0);
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let views = match views_u8(&img, &geom, Resample::Bicubic) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("views: {e}");
                std::process::exit(1);
            }
        };
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        count = views.len();
        checksum = views
            .iter()
            .flat_map(|v| v.as_raw().iter())
            .map(|&b| u64::from(b))
            .sum();
    }
    println!("{w}x{h}: {count} views in {best:.2} ms (best of 20), checksum {checksum}");
}
