//! Anyres preprocessing and packing against HF transformers 5.17 + Pillow fixtures and hand
//! computations.

use candle_core::{Device, Tensor};
use image::RgbImage;
use r4b_worker::model::anyres::{
    pack_features, pack_selection, preprocess, resize, views_tensor, views_u8, AnyresError,
    ImageGeometry, Normalize, Resample,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn json(path: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{path}")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The tiny-r4b geometry: tile 384, patch 14, anyres_max_9, pinpoints from config.json.
fn r4b_geometry() -> ImageGeometry {
    let config = json("tiny-r4b/config.json");
    let pinpoints = config["image_grid_pinpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_u64().unwrap() as usize,
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(config["vision_aspect_ratio"], "anyres_max_9");
    ImageGeometry {
        tile: 384,
        patch: 14,
        pinpoints,
        max_tiles: 9,
    }
}

/// Tile `side` pixels of 14-pixel patches with pinpoints up to 2x2 tiles.
fn small_geometry(side: usize, max_tiles: usize) -> ImageGeometry {
    let pinpoints = vec![
        (side, side),
        (side, 2 * side),
        (2 * side, side),
        (2 * side, 2 * side),
    ];
    ImageGeometry {
        tile: side,
        patch: 14,
        pinpoints,
        max_tiles,
    }
}

fn load(name: &str) -> RgbImage {
    image::open(format!("{FIXTURES}/{name}")).unwrap().to_rgb8()
}

#[test]
fn derived_sizes() {
    let g = r4b_geometry();
    assert_eq!(g.grid_side(), 27);
    assert_eq!(g.tokens_per_tile(), 729);
    assert!(g.validate().is_ok());
}

#[test]
fn token_counts_match_hf() {
    let g = r4b_geometry();
    let cases = json("reference.json")["image_token_counts"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(cases.len(), 16);
    for case in &cases {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let (w, h) = (get("width"), get("height"));
        assert_eq!(get("processor"), get("model"), "{w}x{h}");
        assert_eq!(g.num_image_tokens(h, w), get("model"), "{w}x{h}");
        let (rows, cols) = g.layout(h, w).grid;
        assert_eq!(1 + rows * cols, get("views"), "{w}x{h}");
    }
}

#[test]
fn packed_length_matches_hf_counts() {
    // pack_features on zero features must yield exactly the model's merged length.
    let g = r4b_geometry();
    let newline = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    for case in json("reference.json")["image_token_counts"]
        .as_array()
        .unwrap()
    {
        let get = |k: &str| case[k].as_u64().unwrap() as usize;
        let (w, h) = (get("width"), get("height"));
        let features = Tensor::zeros(
            (get("views"), g.tokens_per_tile(), 1),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let packed = pack_features(&features, (h, w), &g, &newline).unwrap();
        assert_eq!(packed.dims(), [get("model"), 1], "{w}x{h}");
    }
}

#[test]
fn spec_table_layouts() {
    // Spec §5.4 worked examples (36 pinpoints), (W, H) -> grid, unpadded, packed.
    let g = r4b_geometry();
    let l = g.layout(480, 640);
    assert_eq!((l.grid, l.unpadded, l.packed), ((2, 2), (40, 54), (40, 54)));
    let l = g.layout(1080, 1920);
    assert_eq!(
        (l.grid, l.unpadded, l.packed),
        ((3, 5), (75, 135), (60, 108))
    );
    let l = g.layout(3024, 4032);
    assert_eq!(
        (l.grid, l.unpadded, l.packed),
        ((5, 6), (121, 162), (70, 93))
    );
}

#[test]
fn select_best_resolution_by_hand() {
    let g = r4b_geometry();
    // 500x300 (WxH): (384,768) at scale 1.28 keeps all 150000 pixels with the least padding.
    assert_eq!(g.select_best_resolution(300, 500), (384, 768));
    // 640x480: (384,*) keep 512x384 at scale 0.8; (768,768) keeps everything.
    assert_eq!(g.select_best_resolution(480, 640), (768, 768));
    // Tiny and exact-fit images take the single tile (first among equals).
    assert_eq!(g.select_best_resolution(1, 1), (384, 384));
    assert_eq!(g.select_best_resolution(384, 384), (384, 384));
    // 20x10000 (WxH): the tallest column of tiles.
    assert_eq!(g.select_best_resolution(10000, 20), (2304, 384));
    // 1920x1080: 3x5 tiles at scale 0.8 keep 1536x864 pixels; 6x6 keeps the same but pads more.
    assert_eq!(g.select_best_resolution(1080, 1920), (1152, 1920));
}

#[test]
fn views_match_hf_processor_bytes() {
    let g = r4b_geometry();
    let source = load("img_500x300.png");
    assert_eq!(source.dimensions(), (500, 300));
    let views = views_u8(&source, &g, Resample::Bicubic).unwrap();
    assert_eq!(views.len(), 3);
    for (i, view) in views.iter().enumerate() {
        let expected = load(&format!("img_500x300_view{i}.png"));
        assert_eq!(view.dimensions(), expected.dimensions(), "view {i}");
        let (mut differing, mut max_diff) = (0usize, 0u8);
        for (a, b) in view.as_raw().iter().zip(expected.as_raw()) {
            if a != b {
                differing += 1;
                max_diff = max_diff.max(a.abs_diff(*b));
            }
        }
        assert_eq!(
            (differing, max_diff),
            (0, 0),
            "view {i}: differing bytes, max diff"
        );
    }
}

#[test]
fn padding_is_centered_zeros() {
    // 500x300 -> 640x384 inside 768x384: 64 zero columns left and right of the image.
    let g = r4b_geometry();
    let source = RgbImage::from_pixel(500, 300, image::Rgb([200, 100, 50]));
    let views = views_u8(&source, &g, Resample::Bilinear).unwrap();
    let (left, right) = (&views[1], &views[2]);
    assert_eq!(left.get_pixel(63, 10).0, [0, 0, 0]);
    assert_eq!(left.get_pixel(64, 10).0, [200, 100, 50]);
    assert_eq!(right.get_pixel(319, 383).0, [200, 100, 50]);
    assert_eq!(right.get_pixel(320, 0).0, [0, 0, 0]);
    // A constant image stays constant under both filters (weights sum to one).
    assert!(views[0].pixels().all(|p| p.0 == [200, 100, 50]));
}

#[test]
fn preprocess_normalises_channels_first() {
    let g = r4b_geometry();
    let source = RgbImage::from_pixel(500, 300, image::Rgb([255, 0, 51]));
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.5; 3],
        rescale: 1.0 / 255.0,
    };
    let views = preprocess(&source, &g, Resample::Bicubic, &norm).unwrap();
    assert_eq!(
        (views.views, views.tile, views.image_size),
        (3, 384, (300, 500))
    );
    let plane = 384 * 384;
    assert_eq!(views.data.len(), 3 * 3 * plane);
    // Base view: R = 1, G = -1, B = 51/255*2-1 = -0.6.
    assert!((views.data[0] - 1.0).abs() < 1e-6);
    assert!((views.data[plane] + 1.0).abs() < 1e-6);
    assert!((views.data[2 * plane] + 0.6).abs() < 1e-6);
    // First tile, top-left pixel is padding: 0 -> -1 in every channel.
    assert!((views.data[3 * plane] + 1.0).abs() < 1e-6);
    let t = views_tensor(&views, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), [3, 3, 384, 384]);
}

#[test]
fn resize_by_hand() {
    // 2 -> 1 pixel bilinear: support 2 at scale 2, center 1.0, window [0, 2), weights 1/2 each:
    // (10 + 21) / 2 = 15.5 -> fixed point rounds half up to 16.
    let img = RgbImage::from_raw(2, 1, vec![10, 0, 255, 21, 3, 0]).unwrap();
    let out = resize(&img, 1, 1, Resample::Bilinear).unwrap();
    assert_eq!(out.as_raw(), &[16, 2, 128]);
    // 1 -> 2 pixels: every window holds the single source pixel, weight 1.
    let img = RgbImage::from_raw(1, 1, vec![7, 8, 9]).unwrap();
    let out = resize(&img, 2, 3, Resample::Bicubic).unwrap();
    assert!(out.pixels().all(|p| p.0 == [7, 8, 9]));
    // Bicubic 4 -> 2 of [0, 0, 255, 255]: scale 2, support 4, center 1.0 (first output),
    // taps k = 0..3 at x = (k - 0.5) / 2 = -0.25, 0.25, 0.75, 1.25:
    // w = 0.8671875, 0.8671875, 0.2265625, -0.0703125 (sum 1.890625); output =
    // 255 * (0.2265625 - 0.0703125) / 1.890625 = 21.07 -> 21; the second output mirrors it.
    let img = RgbImage::from_raw(
        4,
        1,
        [0u8, 0, 255, 255].iter().flat_map(|&v| [v; 3]).collect(),
    )
    .unwrap();
    let out = resize(&img, 2, 1, Resample::Bicubic).unwrap();
    assert_eq!(out.get_pixel(0, 0).0, [21; 3]);
    assert_eq!(out.get_pixel(1, 0).0, [255 - 21; 3]);
}

#[test]
fn resize_with_strong_vertical_shrink_matches_pillow() {
    // 7x9 -> 6x4 shrinks the height by more than twice the width: Pillow 13 would run the vertical
    // pass first; Pillow 12.3.0, which made the HF fixtures (reference.json "versions"), runs the
    // horizontal pass first. Expected bytes recorded from Pillow 12.3.0
    // `Image.resize((6, 4), BICUBIC / BILINEAR)` on this source.
    let img = RgbImage::from_fn(7, 9, |x, y| {
        image::Rgb(
            [
                (x * 37 + y * 11) % 256,
                (x * x * 5 + y * 29) % 256,
                ((x ^ y) * 41) % 256,
            ]
            .map(|v| v as u8),
        )
    });
    #[rustfmt::skip]
    let bicubic: [u8; 72] = [10, 20, 27, 53, 28, 45, 96, 49, 81, 140, 84, 161, 183, 134, 176, 233, 204, 140, 34, 82, 120, 77, 90, 115, 120, 111, 46, 164, 147, 57, 210, 205, 121, 200, 110, 154, 60, 150, 198, 103, 158, 134, 146, 183, 161, 190, 225, 98, 235, 116, 43, 46, 60, 70, 84, 212, 91, 127, 226, 161, 170, 206, 184, 225, 104, 181, 97, 68, 92, 40, 129, 39];
    #[rustfmt::skip]
    let bilinear: [u8; 72] = [16, 25, 35, 58, 34, 53, 99, 55, 86, 141, 89, 150, 182, 135, 167, 224, 194, 140, 38, 84, 117, 80, 93, 105, 121, 114, 58, 163, 148, 66, 204, 189, 120, 196, 115, 148, 64, 150, 183, 106, 159, 137, 147, 180, 148, 189, 204, 105, 217, 121, 52, 65, 75, 73, 86, 209, 101, 128, 218, 161, 169, 197, 180, 211, 116, 169, 111, 79, 95, 47, 122, 46];
    assert_eq!(
        resize(&img, 6, 4, Resample::Bicubic).unwrap().as_raw(),
        &bicubic
    );
    assert_eq!(
        resize(&img, 6, 4, Resample::Bilinear).unwrap().as_raw(),
        &bilinear
    );
}

/// Features where view `v`, token `t`, channel `c` holds `100 v + t + 1000 c`.
fn coded_features(views: usize, tokens: usize, channels: usize) -> Tensor {
    let data: Vec<f32> = (0..views * tokens * channels)
        .map(|i| {
            let (v, t, c) = (
                i / (tokens * channels),
                (i / channels) % tokens,
                i % channels,
            );
            (100 * v + t + 1000 * c) as f32
        })
        .collect();
    Tensor::from_vec(data, (views, tokens, channels), &Device::Cpu).unwrap()
}

fn column(t: &Tensor, c: usize) -> Vec<f32> {
    t.narrow(1, c, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

const NL: f32 = -1.0;

#[test]
fn pack_2x2_grid_without_unpad() {
    // Tile 28 / patch 14: 2x2 tokens per tile; a 56x56 image takes 2x2 tiles -> 4x4 map.
    let g = small_geometry(28, 9);
    assert_eq!(g.tokens_per_tile(), 4);
    let newline = Tensor::new(&[NL, NL + 1000.0], &Device::Cpu).unwrap();
    let packed = pack_features(&coded_features(5, 4, 2), (56, 56), &g, &newline).unwrap();
    // Views: 1 = tile(0,0), 2 = tile(0,1), 3 = tile(1,0), 4 = tile(1,1); tokens row-major 2x2.
    #[rustfmt::skip]
    let expected = [
        0., 1., 2., 3.,
        100., 101., 200., 201., NL,
        102., 103., 202., 203., NL,
        300., 301., 400., 401., NL,
        302., 303., 402., 403., NL,
    ];
    assert_eq!(g.num_image_tokens(56, 56), expected.len());
    assert_eq!(column(&packed, 0), expected);
    let shifted: Vec<f32> = expected.iter().map(|v| v + 1000.0).collect();
    assert_eq!(column(&packed, 1), shifted);
}

#[test]
fn pack_unpads_wide_and_tall() {
    let g = small_geometry(28, 9);
    let newline = Tensor::new(&[NL], &Device::Cpu).unwrap();
    // H=40, W=56 -> 2x2 tiles; new_h = int(40 * 4/56) = 2, pad = 1 -> map rows 1..3.
    let l = g.layout(40, 56);
    assert_eq!((l.grid, l.unpadded, l.packed), ((2, 2), (2, 4), (2, 4)));
    let packed = pack_features(&coded_features(5, 4, 1), (40, 56), &g, &newline).unwrap();
    #[rustfmt::skip]
    let wide = [
        0., 1., 2., 3.,
        102., 103., 202., 203., NL,
        300., 301., 400., 401., NL,
    ];
    assert_eq!(column(&packed, 0), wide);
    assert_eq!(g.num_image_tokens(40, 56), wide.len());
    // H=56, W=40 -> map columns 1..3.
    let packed = pack_features(&coded_features(5, 4, 1), (56, 40), &g, &newline).unwrap();
    #[rustfmt::skip]
    let tall = [
        0., 1., 2., 3.,
        101., 200., NL,
        103., 202., NL,
        301., 400., NL,
        303., 402., NL,
    ];
    assert_eq!(column(&packed, 0), tall);
    assert_eq!(g.num_image_tokens(56, 40), tall.len());
}

#[test]
fn pack_caps_with_bilinear() {
    // Tile 42 / patch 14: 3x3 tokens per tile; a 42x84 (HxW) image takes 1x2 tiles -> 3x6 map.
    // anyres_max_1: ratio = sqrt(18 / 9) = 1.41421 > 1.1 -> (3 // r, 6 // r) = (2, 4).
    let g = small_geometry(42, 1);
    let l = g.layout(42, 84);
    assert_eq!((l.grid, l.unpadded, l.packed), ((1, 2), (3, 6), (2, 4)));
    // Map value x[r][c] = r^2 * 10 + c^2 (not linear, so interpolation weights matter).
    let x = |r: usize, c: usize| (r * r * 10 + c * c) as f32;
    let mut data = vec![0f32; 3 * 9];
    for r in 0..3 {
        for c in 0..6 {
            let (view, t) = (1 + c / 3, r * 3 + c % 3);
            data[view * 9 + t] = x(r, c);
        }
    }
    let features = Tensor::from_vec(data, (3, 9, 1), &Device::Cpu).unwrap();
    let newline = Tensor::new(&[NL], &Device::Cpu).unwrap();
    let packed = column(
        &pack_features(&features, (42, 84), &g, &newline).unwrap(),
        0,
    );
    assert_eq!(packed.len(), 9 + 2 * 5);
    // torch: scale = 3/2 = 6/4 = 1.5, src = 1.5 (i + 0.5) - 0.5 -> 0.25, 1.75, 3.25, 4.75:
    // (index, weight) pairs (floor, 1 - frac), (floor + 1, frac).
    let rows = [[(0, 0.75), (1, 0.25)], [(1, 0.25), (2, 0.75)]];
    let cols = [
        [(0, 0.75), (1, 0.25)],
        [(1, 0.25), (2, 0.75)],
        [(3, 0.75), (4, 0.25)],
        [(4, 0.25), (5, 0.75)],
    ];
    for (i, row) in rows.iter().enumerate() {
        for (j, col) in cols.iter().enumerate() {
            let want: f32 = row
                .iter()
                .flat_map(|&(r, wr)| col.iter().map(move |&(c, wc)| wr * wc * x(r, c)))
                .sum();
            let got = packed[9 + i * 5 + j];
            assert!((got - want).abs() < 1e-5, "({i},{j}): {got} vs {want}");
        }
        assert_eq!(packed[9 + i * 5 + 4], NL);
    }
    // Spot check one value fully by hand: (0,0) = .75*.75*x00 + .75*.25*x01 + .25*.75*x10
    // + .25*.25*x11 = 0 + 0.1875 + 1.875 + 0.6875 = 2.75.
    assert!((packed[9] - 2.75).abs() < 1e-6);
}

#[test]
fn pack_single_view_is_base_plus_newline() {
    let g = small_geometry(28, 9);
    let newline = Tensor::new(&[NL], &Device::Cpu).unwrap();
    let packed = pack_features(&coded_features(1, 4, 1), (56, 56), &g, &newline).unwrap();
    assert_eq!(column(&packed, 0), [0., 1., 2., 3., NL]);
}

#[test]
fn pack_rejects_wrong_shapes() {
    let g = small_geometry(28, 9);
    let newline = Tensor::new(&[NL], &Device::Cpu).unwrap();
    // 56x56 needs 5 views.
    assert!(pack_features(&coded_features(4, 4, 1), (56, 56), &g, &newline).is_err());
    // Wrong tokens per view.
    assert!(pack_features(&coded_features(5, 3, 1), (56, 56), &g, &newline).is_err());
    // Newline of the wrong width.
    assert!(pack_features(&coded_features(5, 4, 2), (56, 56), &g, &newline).is_err());
    // Zero image size with tiles.
    assert!(pack_features(&coded_features(5, 4, 1), (0, 56), &g, &newline).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let g = r4b_geometry();
    let norm = Normalize {
        mean: [0.5; 3],
        std: [0.5; 3],
        rescale: 1.0 / 255.0,
    };
    for (w, h) in [(0, 0), (0, 7), (7, 0)] {
        let img = RgbImage::new(w, h);
        assert!(matches!(
            views_u8(&img, &g, Resample::Bicubic),
            Err(AnyresError::Empty { .. })
        ));
        assert!(preprocess(&img, &g, Resample::Bicubic, &norm).is_err());
        assert!(resize(&img, 4, 4, Resample::Bilinear).is_err());
        let _ = g.num_image_tokens(h as usize, w as usize); // must not panic
    }
    let img = RgbImage::new(3, 3);
    assert!(matches!(
        resize(&img, 0, 4, Resample::Bicubic),
        Err(AnyresError::EmptyTarget { .. })
    ));
    let zero_std = Normalize {
        std: [0.5, 0.0, 0.5],
        ..norm
    };
    assert!(preprocess(&img, &g, Resample::Bicubic, &zero_std).is_err());
    for broken in [
        ImageGeometry {
            patch: 0,
            ..g.clone()
        },
        ImageGeometry {
            pinpoints: vec![],
            ..g.clone()
        },
        ImageGeometry {
            pinpoints: vec![(384, 500)],
            ..g.clone()
        },
        ImageGeometry {
            max_tiles: 0,
            ..g.clone()
        },
    ] {
        assert!(matches!(
            views_u8(&img, &broken, Resample::Bicubic),
            Err(AnyresError::Geometry(_))
        ));
        let _ = broken.num_image_tokens(3, 3); // must not panic
    }
}

/// The GPU packs image features with one row gather when `pack_selection` says the packing is a
/// selection: gathering by it must give exactly `pack_features`' rows, and an interpolating
/// packing must be refused.
#[test]
fn pack_selection_reproduces_pack_features() {
    let geom = r4b_geometry();
    let tokens = geom.tokens_per_tile();
    let c = 3;
    // (w, h) → expect a selection?
    for ((w, h), selection) in [
        ((640, 480), true),
        ((384, 384), true),
        ((1, 1), true),
        ((10000, 20), true),
        ((1280, 720), true),
        ((4032, 3024), false),
        ((2304, 2304), false),
    ] {
        let layout = geom.layout(h, w);
        let views = 1 + layout.grid.0 * layout.grid.1;
        let mut x = 0x9E3779B97F4A7C15u64;
        let data: Vec<f32> = (0..views * tokens * c)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let feats = Tensor::from_vec(data.clone(), (views, tokens, c), &Device::Cpu).unwrap();
        let newline = Tensor::from_vec(vec![7.0f32, 8.0, 9.0], c, &Device::Cpu).unwrap();
        let want: Vec<Vec<f32>> = pack_features(&feats, (h, w), &geom, &newline)
            .unwrap()
            .to_vec2()
            .unwrap();
        let sel = pack_selection(views, tokens, (h, w), &geom).unwrap();
        assert_eq!(sel.is_some(), selection, "{w}x{h}");
        if let Some(src) = sel {
            assert_eq!(src.len(), want.len(), "{w}x{h}");
            for (i, &s) in src.iter().enumerate() {
                let row: Vec<f32> = if s as usize == views * tokens {
                    vec![7.0, 8.0, 9.0]
                } else {
                    data[s as usize * c..(s as usize + 1) * c].to_vec()
                };
                assert_eq!(row, want[i], "{w}x{h} row {i}");
            }
        }
    }
}
