//! Every kernel against a host reference on random inputs (feature `cuda`; on a machine without a
//! CUDA device each test says so and passes without checking anything).
//!
//! The references are written from the kernels' documented semantics in f32/f64 with the same
//! bf16 roundings (`half`, round to nearest even, as `__float2bfloat16`); they share no code with
//! the kernels. Exact where the kernel does exact work (gathers, copies, arg-max), within a bf16
//! ulp where it rounds the same way, and within a relative L2 of 1e-2 where it sums in another
//! order (attention, GEMMs).
//!
//! On the GPU machine: `cargo test -p r4b-kernels --features cuda --release --test kernels`
//! (built here with `--no-run` and carried), and again with `R4B_KERNEL_ARCH=sm80` to check the
//! A100 build on a Hopper card.
#![cfg(feature = "cuda")]

use half::bf16;
use r4b_kernels::*;

/// Whether a CUDA device is usable. cudarc panics when the driver library is missing, so the
/// probe runs once, under `catch_unwind`, with the panic message silenced.
fn have_device() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let n = std::panic::catch_unwind(device_count);
        std::panic::set_hook(hook);
        matches!(n, Ok(Ok(n)) if n > 0)
    })
}

/// The GPU, or `None` (with a line saying the test was skipped) when there is none.
fn gpu() -> Option<Gpu> {
    if !have_device() {
        eprintln!("skipped: no CUDA device (or no CUDA driver library)");
        return None;
    }
    let arch = match std::env::var("R4B_KERNEL_ARCH").as_deref() {
        Ok("sm80") => KernelArch::Sm80,
        _ => KernelArch::Auto,
    };
    let options = KernelOptions {
        arch,
        ..KernelOptions::default()
    };
    let gpu = Gpu::new(0, &options).expect("opening GPU 0");
    eprintln!(
        "sm_{} kernels on compute capability {:?}",
        gpu.ptx_arch, gpu.compute_capability
    );
    Some(gpu)
}

/// SplitMix64: seeded, the same numbers on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

fn b(x: f32) -> bf16 {
    bf16::from_f32(x)
}
fn r(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}
fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| b(x)).collect()
}
fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// A device copy of `v`.
fn up<T: Copy>(gpu: &Gpu, v: &[T]) -> DBuf {
    let buf = gpu
        .alloc(std::mem::size_of_val(v).max(16))
        .expect("allocation");
    // SAFETY: `buf` holds `v`'s bytes.
    unsafe { gpu.htod(v, buf.ptr()) }.expect("upload");
    buf
}

/// A zeroed device buffer of `n` values of `T`.
fn zeros<T>(gpu: &Gpu, n: usize) -> DBuf {
    let bytes = (n * std::mem::size_of::<T>()).max(16);
    let buf = gpu.alloc(bytes).expect("allocation");
    // SAFETY: fresh allocation of `bytes`.
    unsafe { gpu.memset0(buf.ptr(), bytes) }.expect("memset");
    buf
}

/// `n` values of `T` back from the device.
fn down<T: Copy + Default>(gpu: &Gpu, buf: &DBuf, n: usize) -> Vec<T> {
    gpu.sync().expect("sync");
    let mut out = vec![T::default(); n];
    // SAFETY: `buf` holds at least `n` values (callers size it so).
    unsafe { gpu.dtoh(buf.ptr(), &mut out) }.expect("download");
    out
}

/// Asserts every value within `ulps` bf16 ulps of the reference (plus a floor for values near 0).
fn assert_close_bf16(got: &[f32], want: &[f32], ulps: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = ulps * (w.abs() * 2f32.powi(-7)).max(1e-3);
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol})"
        );
    }
}

/// Relative L2 error `‖got − want‖ / ‖want‖`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += f64::from(g - w).powi(2);
        den += f64::from(w).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn embedding_gather_scatter_and_row_gather_copy_exactly() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(1);
    let (rows, hidden, start) = (50usize, 136usize, 10usize);
    let table = to_bf16(&rng.vec(rows * hidden, 1.0));
    // Ids inside and outside this rank's slice [10, 60).
    let ids: Vec<i32> = vec![10, 59, 9, 60, 33, 0, 45];
    let (d_ids, d_table) = (up(&gpu, &ids), up(&gpu, &table));
    let out = zeros::<bf16>(&gpu, ids.len() * hidden);
    // SAFETY: buffers sized above.
    unsafe {
        gpu.embed_gather(
            d_ids.ptr(),
            d_table.ptr(),
            out.ptr(),
            ids.len(),
            hidden,
            (start, rows),
        )
    }
    .unwrap();
    let got: Vec<bf16> = down(&gpu, &out, ids.len() * hidden);
    for (t, &id) in ids.iter().enumerate() {
        let local = id - start as i32;
        for c in 0..hidden {
            let want = if (0..rows as i32).contains(&local) {
                table[local as usize * hidden + c]
            } else {
                b(0.0)
            };
            assert_eq!(got[t * hidden + c], want, "embed row {t} col {c}");
        }
    }
    // Scatter rows 0 and 1 of `src` to rows 5 and 2; gather rows 3, 0, 3.
    let src = to_bf16(&rng.vec(2 * hidden, 1.0));
    let d_src = up(&gpu, &src);
    let dst: Vec<i32> = vec![5, 2];
    let d_dst = up(&gpu, &dst);
    let canvas = up(&gpu, &to_bf16(&rng.vec(7 * hidden, 1.0)));
    let before: Vec<bf16> = down(&gpu, &canvas, 7 * hidden);
    // SAFETY: as above.
    unsafe { gpu.scatter_rows(d_dst.ptr(), d_src.ptr(), canvas.ptr(), 2, hidden) }.unwrap();
    let after: Vec<bf16> = down(&gpu, &canvas, 7 * hidden);
    for row in 0..7 {
        let want = match row {
            5 => &src[..hidden],
            2 => &src[hidden..],
            _ => &before[row * hidden..(row + 1) * hidden],
        };
        assert_eq!(
            &after[row * hidden..(row + 1) * hidden],
            want,
            "scatter row {row}"
        );
    }
    let idx: Vec<i32> = vec![3, 0, 3];
    let d_idx = up(&gpu, &idx);
    let picked = zeros::<bf16>(&gpu, 3 * hidden);
    // SAFETY: as above.
    unsafe { gpu.gather_rows(d_idx.ptr(), canvas.ptr(), picked.ptr(), 3, hidden) }.unwrap();
    let got: Vec<bf16> = down(&gpu, &picked, 3 * hidden);
    for (i, &row) in idx.iter().enumerate() {
        let row = row as usize;
        assert_eq!(
            &got[i * hidden..(i + 1) * hidden],
            &after[row * hidden..(row + 1) * hidden]
        );
    }
}

/// RMSNorm reference: `(residual after the mode, out)`.
fn rmsnorm_ref(
    res: &[f32],
    x: &[f32],
    w: &[f32],
    hidden: usize,
    mode: i32,
) -> (Vec<f32>, Vec<f32>) {
    let eps = 1e-6f32;
    let mut new_res = res.to_vec();
    let mut out = vec![0f32; res.len()];
    for t in 0..res.len() / hidden {
        let row = t * hidden..(t + 1) * hidden;
        for i in row.clone() {
            new_res[i] = match mode {
                0 => res[i],
                1 => res[i] + r(x[i]),
                _ => r(x[i]),
            };
        }
        let ss: f64 = new_res[row.clone()]
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        let inv = 1.0 / ((ss / hidden as f64) as f32 + eps).sqrt();
        for i in row {
            out[i] = r(r(w[i % hidden]) * r(new_res[i] * inv));
        }
    }
    (new_res, out)
}

#[test]
fn add_rmsnorm_matches_the_reference_in_every_mode_and_width() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(2);
    // 2560: the one-pass kernel (8 values per thread); 100: the two-pass one.
    for hidden in [2560usize, 100] {
        for mode in [0, 1, 2] {
            let tokens = 5;
            let res = rng.vec(tokens * hidden, 2.0);
            let x = rng.vec(tokens * hidden, 2.0);
            let w = rng.vec(hidden, 1.5);
            let (d_res, d_x, d_w) = (
                up(&gpu, &res),
                up(&gpu, &to_bf16(&x)),
                up(&gpu, &to_bf16(&w)),
            );
            let out = zeros::<bf16>(&gpu, tokens * hidden);
            let resid = match mode {
                0 => Residual::Keep,
                1 => Residual::Add(d_x.ptr()),
                _ => Residual::Set(d_x.ptr()),
            };
            // SAFETY: buffers sized above.
            unsafe {
                gpu.add_rmsnorm(
                    d_res.ptr(),
                    resid,
                    d_w.ptr(),
                    out.ptr(),
                    (tokens, hidden),
                    1e-6,
                )
            }
            .unwrap();
            let (want_res, want_out) = rmsnorm_ref(&res, &x, &w, hidden, mode);
            let got_res: Vec<f32> = down(&gpu, &d_res, tokens * hidden);
            let got_out = from_bf16(&down::<bf16>(&gpu, &out, tokens * hidden));
            let what = format!("rmsnorm hidden {hidden} mode {mode}");
            for (g, w) in got_res.iter().zip(&want_res) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{what}: residual {g} vs {w}"
                );
            }
            assert_close_bf16(&got_out, &want_out, 2.0, &what);
        }
    }
}

#[test]
fn layernorm_matches_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(3);
    let (tokens, hidden) = (7usize, 1152usize);
    let x: Vec<f32> = rng.vec(tokens * hidden, 3.0).into_iter().map(r).collect();
    let (w, bias) = (rng.vec(hidden, 1.0), rng.vec(hidden, 0.5));
    let (d_x, d_w, d_b) = (
        up(&gpu, &to_bf16(&x)),
        up(&gpu, &to_bf16(&w)),
        up(&gpu, &to_bf16(&bias)),
    );
    let out = zeros::<bf16>(&gpu, tokens * hidden);
    // SAFETY: buffers sized above.
    unsafe {
        gpu.layernorm(
            d_x.ptr(),
            (d_w.ptr(), d_b.ptr()),
            out.ptr(),
            (tokens, hidden),
            1e-6,
        )
    }
    .unwrap();
    let got = from_bf16(&down::<bf16>(&gpu, &out, tokens * hidden));
    let mut want = vec![0f32; tokens * hidden];
    for t in 0..tokens {
        let row = &x[t * hidden..(t + 1) * hidden];
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / hidden as f64;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / hidden as f64;
        let inv = 1.0 / (var + 1e-6).sqrt();
        for i in 0..hidden {
            let v = (f64::from(row[i]) - mean) * inv * f64::from(r(w[i])) + f64::from(r(bias[i]));
            want[t * hidden + i] = r(v as f32);
        }
    }
    assert_close_bf16(&got, &want, 2.0, "layernorm");
}

#[test]
fn qk_norm_rope_and_kv_write_match_the_reference_with_and_without_the_table() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(4);
    let (nq, nkv, theta, eps) = (4usize, 2usize, 1_000_000f32, 1e-6f32);
    // hd 128: the warp-per-head kernel with the cos/sin table; hd 48: the block kernel.
    for (hd, with_table) in [(128usize, true), (48, false)] {
        let tokens = 6;
        let width = (nq + 2 * nkv) * hd;
        let qkv: Vec<f32> = rng.vec(tokens * width, 2.0).into_iter().map(r).collect();
        let (qn, kn) = (rng.vec(hd, 1.5), rng.vec(hd, 1.5));
        let positions: Vec<i32> = vec![0, 1, 7, 100, 4095, 33];
        let slots: Vec<i32> = vec![3, 0, 9, 1, 5, 7];
        let max_pos = 4096;
        let d_qkv = up(&gpu, &to_bf16(&qkv));
        let (d_qn, d_kn) = (up(&gpu, &to_bf16(&qn)), up(&gpu, &to_bf16(&kn)));
        let (d_pos, d_slots) = (up(&gpu, &positions), up(&gpu, &slots));
        let (kc, vc) = (
            zeros::<bf16>(&gpu, 10 * nkv * hd),
            zeros::<bf16>(&gpu, 10 * nkv * hd),
        );
        let table = zeros::<f32>(&gpu, 2 * max_pos * hd / 2);
        if with_table {
            // SAFETY: `table` holds 2 · max_pos · hd/2 f32.
            unsafe { gpu.rope_table(table.ptr(), max_pos, hd, theta) }.unwrap();
        }
        let args = RopeKv {
            qkv: d_qkv.ptr(),
            q_norm: d_qn.ptr(),
            k_norm: d_kn.ptr(),
            positions: d_pos.ptr(),
            slots: d_slots.ptr(),
            k_cache: kc.ptr(),
            v_cache: vc.ptr(),
            tokens,
            nq,
            nkv,
            head_dim: hd,
            eps,
            theta,
            table: with_table.then_some((table.ptr(), max_pos)),
        };
        // SAFETY: buffers sized above; slots < 10.
        unsafe { gpu.qk_norm_rope_kv(&args) }.unwrap();
        let got_qkv = from_bf16(&down::<bf16>(&gpu, &d_qkv, tokens * width));
        let got_k = from_bf16(&down::<bf16>(&gpu, &kc, 10 * nkv * hd));
        let got_v = from_bf16(&down::<bf16>(&gpu, &vc, 10 * nkv * hd));
        let half = hd / 2;
        let what = format!("qk_norm_rope_kv hd {hd}");
        for t in 0..tokens {
            for h in 0..nq + 2 * nkv {
                let row = &qkv[t * width + h * hd..t * width + (h + 1) * hd];
                let slot = slots[t] as usize;
                if h >= nq + nkv {
                    let g = h - nq - nkv;
                    let cache = &got_v[(slot * nkv + g) * hd..(slot * nkv + g + 1) * hd];
                    assert_eq!(cache, row, "{what}: v head {g} of token {t}");
                    continue;
                }
                let w = if h < nq { &qn } else { &kn };
                let ss: f64 = row.iter().map(|&v| f64::from(v).powi(2)).sum();
                let inv = 1.0 / ((ss / hd as f64) as f32 + eps).sqrt();
                let normed: Vec<f32> = (0..hd).map(|i| r(r(w[i]) * r(row[i] * inv))).collect();
                let mut want = vec![0f32; hd];
                for i in 0..half {
                    let inv_freq = 1.0 / f64::from(theta).powf(2.0 * i as f64 / hd as f64);
                    let ang = f64::from(positions[t]) * inv_freq;
                    let (s, c) = ang.sin_cos();
                    let (a, bb) = (f64::from(normed[i]), f64::from(normed[i + half]));
                    want[i] = r((a * c - bb * s) as f32);
                    want[i + half] = r((bb * c + a * s) as f32);
                }
                let got = &got_qkv[t * width + h * hd..t * width + (h + 1) * hd];
                // The angle is formed in f32 on the device: at position 4095 it differs from the
                // f64 one by ~1e-4 rad, a few bf16 ulps of the rotated values.
                assert_close_bf16(got, &want, 4.0, &format!("{what} head {h} token {t}"));
                if h >= nq {
                    let g = h - nq;
                    let cache = &got_k[(slot * nkv + g) * hd..(slot * nkv + g + 1) * hd];
                    assert_eq!(cache, got, "{what}: k cache = rotated k");
                }
            }
        }
    }
}

/// A paged KV cache filled with random rows, and its layout.
struct Paged {
    k: Vec<f32>,
    v: Vec<f32>,
    d_k: DBuf,
    d_v: DBuf,
    nkv: usize,
    hd: usize,
    bs: usize,
}

impl Paged {
    fn new(gpu: &Gpu, rng: &mut Rng, (blocks, bs, nkv, hd): (usize, usize, usize, usize)) -> Self {
        let n = blocks * bs * nkv * hd;
        let k: Vec<f32> = rng.vec(n, 1.0).into_iter().map(r).collect();
        let v: Vec<f32> = rng.vec(n, 1.0).into_iter().map(r).collect();
        Paged {
            d_k: up(gpu, &to_bf16(&k)),
            d_v: up(gpu, &to_bf16(&v)),
            k,
            v,
            nkv,
            hd,
            bs,
        }
    }

    /// Key `i` of kv head `g` of a sequence with block table `table`.
    fn row<'a>(&self, cache: &'a [f32], table: &[i32], i: usize, g: usize) -> &'a [f32] {
        let slot = table[i / self.bs] as usize * self.bs + i % self.bs;
        let o = (slot * self.nkv + g) * self.hd;
        &cache[o..o + self.hd]
    }
}

/// softmax(q · Kᵀ · scale) · V over keys `0..nkeys` (causal cut applied by the caller), f64.
fn attend(q: &[f32], keys: &[&[f32]], vals: &[&[f32]], scale: f32) -> Vec<f32> {
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(*k)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum::<f64>()
                * f64::from(scale)
        })
        .collect();
    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    (0..q.len())
        .map(|d| {
            (e.iter()
                .zip(vals)
                .map(|(p, v)| p * f64::from(v[d]))
                .sum::<f64>()
                / sum) as f32
        })
        .collect()
}

#[test]
fn paged_decode_attention_matches_the_reference_on_both_kernels() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(5);
    for hd in [128usize, 64] {
        let (nq, nkv, bs, blocks) = (32usize, 8usize, 16usize, 80usize);
        let cache = Paged::new(&gpu, &mut rng, (blocks, bs, nkv, hd));
        // Five queries with their own contexts (partitions ending mid-tile), two sharing a row.
        let ctx_lens: Vec<i32> = vec![1, 17, 100, 640, 999];
        let bt_rows: Vec<i32> = vec![0, 1, 2, 3, 3];
        let max_blocks = 64;
        let mut tables = vec![0i32; 4 * max_blocks];
        for (row, t) in tables.chunks_mut(max_blocks).enumerate() {
            for (j, e) in t.iter_mut().enumerate() {
                *e = ((row * 7 + j * 13) % blocks) as i32;
            }
        }
        let tokens = ctx_lens.len();
        let q: Vec<f32> = rng.vec(tokens * nq * hd, 1.0).into_iter().map(r).collect();
        let (part_size, parts) = (64usize, 16usize);
        let d_q = up(&gpu, &to_bf16(&q));
        let (d_ctx, d_rows, d_tables) =
            (up(&gpu, &ctx_lens), up(&gpu, &bt_rows), up(&gpu, &tables));
        let pm = zeros::<f32>(&gpu, tokens * nq * parts);
        let pl = zeros::<f32>(&gpu, tokens * nq * parts);
        let pacc = zeros::<f32>(&gpu, tokens * nq * parts * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut want = vec![0f32; tokens * nq * hd];
        for t in 0..tokens {
            let table = &tables[bt_rows[t] as usize * max_blocks..];
            for h in 0..nq {
                let g = h / (nq / nkv);
                let keys: Vec<&[f32]> = (0..ctx_lens[t] as usize)
                    .map(|i| cache.row(&cache.k, table, i, g))
                    .collect();
                let vals: Vec<&[f32]> = (0..ctx_lens[t] as usize)
                    .map(|i| cache.row(&cache.v, table, i, g))
                    .collect();
                let o = attend(
                    &q[(t * nq + h) * hd..(t * nq + h + 1) * hd],
                    &keys,
                    &vals,
                    scale,
                );
                want[(t * nq + h) * hd..(t * nq + h + 1) * hd].copy_from_slice(&o);
            }
        }
        for kernel in [DecodeAttention::TensorCore, DecodeAttention::CudaCore] {
            let out = zeros::<bf16>(&gpu, tokens * nq * hd);
            let a = DecodeAttn {
                q: d_q.ptr(),
                q_stride: nq * hd,
                k_cache: cache.d_k.ptr(),
                v_cache: cache.d_v.ptr(),
                ctx_lens: d_ctx.ptr(),
                bt_rows: d_rows.ptr(),
                block_tables: d_tables.ptr(),
                max_blocks,
                block_size: bs,
                tokens,
                nq,
                nkv,
                head_dim: hd,
                part_size,
                parts,
                scale,
                pm: pm.ptr(),
                pl: pl.ptr(),
                pacc: pacc.ptr(),
                out: out.ptr(),
                out_stride: nq * hd,
                kernel,
            };
            // SAFETY: buffers sized above; 999 keys fit in 16 partitions of 64.
            unsafe { gpu.decode_attention(&a) }.unwrap();
            let got = from_bf16(&down::<bf16>(&gpu, &out, tokens * nq * hd));
            for t in 0..tokens {
                let s = t * nq * hd..(t + 1) * nq * hd;
                let e = rel_l2(&got[s.clone()], &want[s]);
                assert!(
                    e < 1e-2,
                    "decode attention {kernel:?} hd {hd}, query {t}: rel L2 {e:.3e}"
                );
            }
        }
    }
}

#[test]
fn prefill_attention_matches_the_reference_paged_causal_and_contiguous() {
    let Some(mut gpu) = gpu() else { return };
    let mut rng = Rng(6);
    // Paged, causal: a 200-row chunk after 50 cached keys (Qwen3: hd 128, 32/8 heads).
    let (nq, nkv, hd, bs, blocks) = (32usize, 8usize, 128usize, 16usize, 40usize);
    let cache = Paged::new(&gpu, &mut rng, (blocks, bs, nkv, hd));
    let table: Vec<i32> = (0..blocks as i32).rev().collect();
    let (rows, base) = (200usize, 50usize);
    let q: Vec<f32> = rng.vec(rows * nq * hd, 1.0).into_iter().map(r).collect();
    let (d_q, d_table) = (up(&gpu, &to_bf16(&q)), up(&gpu, &table));
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; rows * nq * hd];
    for i in 0..rows {
        for h in 0..nq {
            let g = h / (nq / nkv);
            let n = base + i + 1;
            let keys: Vec<&[f32]> = (0..n).map(|j| cache.row(&cache.k, &table, j, g)).collect();
            let vals: Vec<&[f32]> = (0..n).map(|j| cache.row(&cache.v, &table, j, g)).collect();
            let o = attend(
                &q[(i * nq + h) * hd..(i * nq + h + 1) * hd],
                &keys,
                &vals,
                scale,
            );
            want[(i * nq + h) * hd..(i * nq + h + 1) * hd].copy_from_slice(&o);
        }
    }
    for rows_per_cta in [64usize, 128] {
        gpu.options.prefill_rows = Some(rows_per_cta);
        let out = zeros::<bf16>(&gpu, rows * nq * hd);
        let a = FlashAttn {
            q: d_q.ptr(),
            q_ld: nq * hd,
            q_z: 0,
            k: cache.d_k.ptr(),
            v: cache.d_v.ptr(),
            kv_ld: nkv * hd,
            kv_z: 0,
            block_table: Some((d_table.ptr(), bs)),
            out: out.ptr(),
            out_ld: nq * hd,
            out_z: 0,
            rows,
            batch: 1,
            ctx_base: base,
            nkeys: base + rows,
            nq,
            nkv,
            head_dim: hd,
            causal: true,
            scale,
        };
        // SAFETY: buffers sized above; 250 keys within 40 blocks of 16.
        unsafe { gpu.flash_attention(&a) }.unwrap();
        let got = from_bf16(&down::<bf16>(&gpu, &out, rows * nq * hd));
        let e = rel_l2(&got, &want);
        assert!(
            e < 1e-2,
            "paged causal prefill, {rows_per_cta} rows per CTA: rel L2 {e:.3e}"
        );
    }
    gpu.options.prefill_rows = None;
    // Contiguous, not causal, a batch of 3 (SigLIP: hd 72, padded to 80; 16 heads).
    let (nq, hd, rows, batch) = (16usize, 72usize, 100usize, 3usize);
    let per = rows * nq * hd;
    let q: Vec<f32> = rng.vec(batch * per, 1.0).into_iter().map(r).collect();
    let k: Vec<f32> = rng.vec(batch * per, 1.0).into_iter().map(r).collect();
    let v: Vec<f32> = rng.vec(batch * per, 1.0).into_iter().map(r).collect();
    let (d_q, d_k, d_v) = (
        up(&gpu, &to_bf16(&q)),
        up(&gpu, &to_bf16(&k)),
        up(&gpu, &to_bf16(&v)),
    );
    let out = zeros::<bf16>(&gpu, batch * per);
    let scale = 1.0 / (hd as f32).sqrt();
    let a = FlashAttn {
        q: d_q.ptr(),
        q_ld: nq * hd,
        q_z: per,
        k: d_k.ptr(),
        v: d_v.ptr(),
        kv_ld: nq * hd,
        kv_z: per,
        block_table: None,
        out: out.ptr(),
        out_ld: nq * hd,
        out_z: per,
        rows,
        batch,
        ctx_base: 0,
        nkeys: rows,
        nq,
        nkv: nq,
        head_dim: hd,
        causal: false,
        scale,
    };
    // SAFETY: buffers sized above.
    unsafe { gpu.flash_attention(&a) }.unwrap();
    let got = from_bf16(&down::<bf16>(&gpu, &out, batch * per));
    let mut want = vec![0f32; batch * per];
    for z in 0..batch {
        for i in 0..rows {
            for h in 0..nq {
                let at = |buf: &[f32], row: usize| -> Vec<f32> {
                    let o = z * per + row * nq * hd + h * hd;
                    buf[o..o + hd].to_vec()
                };
                let keys: Vec<Vec<f32>> = (0..rows).map(|j| at(&k, j)).collect();
                let vals: Vec<Vec<f32>> = (0..rows).map(|j| at(&v, j)).collect();
                let kr: Vec<&[f32]> = keys.iter().map(Vec::as_slice).collect();
                let vr: Vec<&[f32]> = vals.iter().map(Vec::as_slice).collect();
                let o = attend(&at(&q, i), &kr, &vr, scale);
                let d = z * per + i * nq * hd + h * hd;
                want[d..d + hd].copy_from_slice(&o);
            }
        }
    }
    let e = rel_l2(&got, &want);
    assert!(
        e < 1e-2,
        "contiguous batched prefill (hd 72): rel L2 {e:.3e}"
    );
}

#[test]
fn gather_kv_and_row_softmax_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(7);
    let (nkv, hd, bs, blocks) = (2usize, 16usize, 4usize, 6usize);
    let cache = Paged::new(&gpu, &mut rng, (blocks, bs, nkv, hd));
    let table: Vec<i32> = vec![5, 0, 3];
    let ctx = 11;
    let d_table = up(&gpu, &table);
    let width = nkv * hd;
    let (ko, vo) = (
        zeros::<bf16>(&gpu, ctx * width),
        zeros::<bf16>(&gpu, ctx * width),
    );
    // SAFETY: buffers sized above; 11 keys within 3 blocks of 4.
    unsafe {
        gpu.gather_kv(
            (cache.d_k.ptr(), cache.d_v.ptr()),
            d_table.ptr(),
            (bs, width, ctx),
            (ko.ptr(), vo.ptr()),
        )
    }
    .unwrap();
    let (gk, gv) = (
        from_bf16(&down::<bf16>(&gpu, &ko, ctx * width)),
        from_bf16(&down::<bf16>(&gpu, &vo, ctx * width)),
    );
    for i in 0..ctx {
        for g in 0..nkv {
            let o = i * width + g * hd;
            assert_eq!(
                &gk[o..o + hd],
                cache.row(&cache.k, &table, i, g),
                "k key {i}"
            );
            assert_eq!(
                &gv[o..o + hd],
                cache.row(&cache.v, &table, i, g),
                "v key {i}"
            );
        }
    }
    // Softmax: 2 heads x 3 rows over 9 keys, causal from base 4, and not causal.
    let (rows, n) = (6usize, 9usize);
    for causal in [Some(4usize), None] {
        let s: Vec<f32> = rng.vec(rows * n, 4.0).into_iter().map(r).collect();
        let d_s = up(&gpu, &to_bf16(&s));
        // SAFETY: `d_s` holds rows · n bf16.
        unsafe { gpu.softmax_rows(d_s.ptr(), (rows, n), 3, causal) }.unwrap();
        let got = from_bf16(&down::<bf16>(&gpu, &d_s, rows * n));
        for row in 0..rows {
            let valid = causal.map_or(n, |b| (b + row % 3 + 1).min(n));
            let x = &s[row * n..row * n + valid];
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = x.iter().map(|&v| f64::from(v - m).exp()).sum();
            let want: Vec<f32> = (0..n)
                .map(|i| {
                    if i < valid {
                        r((f64::from(s[row * n + i] - m).exp() / sum) as f32)
                    } else {
                        0.0
                    }
                })
                .collect();
            assert_close_bf16(
                &got[row * n..(row + 1) * n],
                &want,
                2.0,
                &format!("softmax {causal:?} row {row}"),
            );
        }
    }
}

fn silu_mul_ref(gu: &[f32], tokens: usize, f: usize) -> Vec<f32> {
    let mut out = vec![0f32; tokens * f];
    for t in 0..tokens {
        for i in 0..f {
            let g = gu[t * 2 * f + i];
            let u = gu[t * 2 * f + f + i];
            let sg = r(g / (1.0 + (-g).exp()));
            out[t * f + i] = r(sg * u);
        }
    }
    out
}

#[test]
fn swiglu_paths_match_the_reference_and_each_other() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(8);
    // 1216 (TP 8's slice): 8-wide kernel; 100: the scalar one.
    for f in [1216usize, 100] {
        let tokens = 3;
        let gu: Vec<f32> = rng.vec(tokens * 2 * f, 4.0).into_iter().map(r).collect();
        let d_gu = up(&gpu, &to_bf16(&gu));
        let out = zeros::<bf16>(&gpu, tokens * f);
        // SAFETY: buffers sized above.
        unsafe { gpu.silu_mul(d_gu.ptr(), out.ptr(), tokens, f) }.unwrap();
        let got = from_bf16(&down::<bf16>(&gpu, &out, tokens * f));
        assert_close_bf16(
            &got,
            &silu_mul_ref(&gu, tokens, f),
            2.0,
            &format!("silu_mul F {f}"),
        );
    }
    // One row: the fused skinny kernel against the GEMM + silu_mul path it replaces (same bits).
    let (f, k) = (1216usize, 2560usize);
    let x = to_bf16(&rng.vec(k, 1.0));
    let w = to_bf16(&rng.vec(2 * f * k, 0.05));
    let (d_x, d_w) = (up(&gpu, &x), up(&gpu, &w));
    let (gu, act) = (zeros::<bf16>(&gpu, 2 * f), zeros::<bf16>(&gpu, f));
    // SAFETY: buffers sized above.
    let fused = unsafe { gpu.gate_up_silu(d_x.ptr(), d_w.ptr(), (gu.ptr(), act.ptr()), (1, f, k)) }
        .unwrap();
    assert!(fused, "one aligned row takes the fused kernel");
    let got: Vec<bf16> = down(&gpu, &act, f);
    let gu2 = zeros::<bf16>(&gpu, 2 * f);
    let act2 = zeros::<bf16>(&gpu, f);
    // SAFETY: as above.
    unsafe {
        gpu.linear_with(
            LinearImpl::Gemv,
            d_x.ptr(),
            d_w.ptr(),
            gu2.ptr(),
            (1, 2 * f, k),
            OutType::Bf16,
        )
        .unwrap();
        gpu.silu_mul(gu2.ptr(), act2.ptr(), 1, f).unwrap();
    }
    let want: Vec<bf16> = down(&gpu, &act2, f);
    assert_eq!(
        got, want,
        "fused gate/up + SiLU·mul = skinny GEMM then silu_mul, bit for bit"
    );
}

#[test]
fn elementwise_vision_kernels_match_the_reference() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(9);
    let (tokens, d) = (4usize, 300usize);
    for act in [0, 1, 2] {
        let x: Vec<f32> = rng.vec(tokens * d, 3.0).into_iter().map(r).collect();
        let bias: Vec<f32> = rng.vec(d, 1.0).into_iter().map(r).collect();
        let (d_x, d_b) = (up(&gpu, &to_bf16(&x)), up(&gpu, &to_bf16(&bias)));
        // SAFETY: buffers sized above.
        unsafe { gpu.bias_act(d_x.ptr(), d_b.ptr(), (tokens, d), act) }.unwrap();
        let got = from_bf16(&down::<bf16>(&gpu, &d_x, tokens * d));
        let want: Vec<f32> = (0..tokens * d)
            .map(|i| {
                let v = f64::from(r(x[i] + bias[i % d]));
                let y = match act {
                    1 => {
                        0.5 * v
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (v + 0.044715 * v * v * v))
                                    .tanh())
                    }
                    2 => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
                    _ => v,
                };
                r(y as f32)
            })
            .collect();
        assert_close_bf16(&got, &want, 1.0, &format!("bias_act {act}"));
    }
    // res += bf16(x + b), with and without a bias.
    for with_bias in [true, false] {
        let res: Vec<f32> = rng.vec(tokens * d, 2.0).into_iter().map(r).collect();
        let x: Vec<f32> = rng.vec(tokens * d, 2.0).into_iter().map(r).collect();
        let bias: Vec<f32> = rng.vec(d, 1.0).into_iter().map(r).collect();
        let (d_res, d_x, d_b) = (
            up(&gpu, &to_bf16(&res)),
            up(&gpu, &to_bf16(&x)),
            up(&gpu, &to_bf16(&bias)),
        );
        let bp = if with_bias { d_b.ptr() } else { 0 };
        // SAFETY: buffers sized above (a null bias is allowed).
        unsafe { gpu.bias_residual(d_res.ptr(), d_x.ptr(), bp, (tokens, d)) }.unwrap();
        let got = from_bf16(&down::<bf16>(&gpu, &d_res, tokens * d));
        let want: Vec<f32> = (0..tokens * d)
            .map(|i| {
                let xb = if with_bias {
                    r(x[i] + bias[i % d])
                } else {
                    x[i]
                };
                r(res[i] + xb)
            })
            .collect();
        assert_eq!(got, want, "bias_residual (bias {with_bias})");
    }
    // Patches: 2 views of 3x28x28 pixels, patch 14 → 8 rows of 3·14·14, (c, ky, kx) order.
    let (views, s, p) = (2usize, 28usize, 14usize);
    let px = rng.vec(views * 3 * s * s, 2.0);
    let d_px = up(&gpu, &px);
    let n = s / p;
    let kdim = 3 * p * p;
    let out = zeros::<bf16>(&gpu, views * n * n * kdim);
    // SAFETY: buffers sized above.
    unsafe { gpu.im2col_patches(d_px.ptr(), out.ptr(), views, (s, p)) }.unwrap();
    let got = from_bf16(&down::<bf16>(&gpu, &out, views * n * n * kdim));
    for v in 0..views {
        for py in 0..n {
            for pxi in 0..n {
                let row = (v * n + py) * n + pxi;
                for c in 0..3 {
                    for ky in 0..p {
                        for kx in 0..p {
                            let src = ((v * 3 + c) * s + py * p + ky) * s + pxi * p + kx;
                            let col = (c * p + ky) * p + kx;
                            assert_eq!(
                                got[row * kdim + col],
                                r(px[src]),
                                "patch row {row} col {col}"
                            );
                        }
                    }
                }
            }
        }
    }
    // Position embedding: x[v·n² + p] = bf16(bf16(x + b) + pos[p]).
    let (rows, dim, npos) = (8usize, 40usize, 4usize);
    let x: Vec<f32> = rng.vec(rows * dim, 1.0).into_iter().map(r).collect();
    let (bias, pos) = (rng.vec(dim, 1.0), rng.vec(npos * dim, 1.0));
    let (d_x, d_b, d_pos) = (
        up(&gpu, &to_bf16(&x)),
        up(&gpu, &to_bf16(&bias)),
        up(&gpu, &to_bf16(&pos)),
    );
    // SAFETY: buffers sized above.
    unsafe { gpu.add_pos_embed(d_x.ptr(), (d_b.ptr(), d_pos.ptr()), (rows, dim, npos)) }.unwrap();
    let got = from_bf16(&down::<bf16>(&gpu, &d_x, rows * dim));
    let want: Vec<f32> = (0..rows * dim)
        .map(|i| r(r(x[i] + r(bias[i % dim])) + r(pos[(i / dim % npos) * dim + i % dim])))
        .collect();
    assert_eq!(got, want, "add_pos_embed");
}

/// erf by its Maclaurin series in f64 (the reference for GELU's erf form).
fn erf(x: f64) -> f64 {
    // Below |x| = 4 the largest term is ~1e7, so cancellation costs ~1e-9; above, erf(x) is
    // within 2e-8 of ±1, far below a bf16 ulp of GELU's output.
    if x.abs() > 4.0 {
        return x.signum();
    }
    let mut sum = 0f64;
    let mut term = x;
    let mut n = 0f64;
    while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
        sum += term / (2.0 * n + 1.0);
        n += 1.0;
        term *= -x * x / n;
        if n > 200.0 {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn gemms_match_the_reference_through_every_implementation() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(10);
    let (n, k) = (520usize, 2560usize);
    let w: Vec<f32> = rng.vec(n * k, 0.05).into_iter().map(r).collect();
    let d_w = up(&gpu, &to_bf16(&w));
    for m in [1usize, 3, 8, 40] {
        let x: Vec<f32> = rng.vec(m * k, 1.0).into_iter().map(r).collect();
        let d_x = up(&gpu, &to_bf16(&x));
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c]))
                    .sum();
                want[i * n + j] = s as f32;
            }
        }
        let mut imps = vec![LinearImpl::Blas];
        if m <= GEMV_MAX_ROWS {
            imps.push(LinearImpl::Gemv);
        }
        if m == 1 {
            imps.push(LinearImpl::Gemv4);
        }
        for imp in imps {
            for out in [OutType::Bf16, OutType::F32] {
                let y = zeros::<f32>(&gpu, m * n);
                // SAFETY: buffers sized above (f32-sized output holds either type).
                unsafe { gpu.linear_with(imp, d_x.ptr(), d_w.ptr(), y.ptr(), (m, n, k), out) }
                    .unwrap();
                let got: Vec<f32> = match out {
                    OutType::F32 => down(&gpu, &y, m * n),
                    OutType::Bf16 => from_bf16(&down::<bf16>(&gpu, &y, m * n)),
                };
                let e = rel_l2(&got, &want);
                assert!(e < 1e-2, "linear {imp:?} {out:?} m {m}: rel L2 {e:.3e}");
            }
        }
    }
}

#[test]
fn argmax_takes_the_lowest_index_of_ties() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(11);
    let (rows, v) = (5usize, 151_936usize / 8);
    let mut logits = rng.vec(rows * v, 10.0);
    // Row 1: a tie at the max between two ids; row 2: all equal; row 3: -inf everywhere but one.
    logits[v + 70] = 50.0;
    logits[v + 9000] = 50.0;
    for x in &mut logits[2 * v..3 * v] {
        *x = 1.5;
    }
    for x in &mut logits[3 * v..4 * v] {
        *x = f32::NEG_INFINITY;
    }
    logits[3 * v + 12345] = -3.0;
    let d_l = up(&gpu, &logits);
    let (val, idx) = (zeros::<f32>(&gpu, rows), zeros::<i32>(&gpu, rows));
    // SAFETY: buffers sized above.
    unsafe { gpu.argmax_rows(d_l.ptr(), (rows, v), val.ptr(), idx.ptr()) }.unwrap();
    let (got_v, got_i): (Vec<f32>, Vec<i32>) = (down(&gpu, &val, rows), down(&gpu, &idx, rows));
    for row in 0..rows {
        let x = &logits[row * v..(row + 1) * v];
        let mut best = (f32::NEG_INFINITY, usize::MAX);
        for (i, &l) in x.iter().enumerate() {
            if l > best.0 || (l == best.0 && i < best.1) {
                best = (l, i);
            }
        }
        assert_eq!((got_v[row], got_i[row] as usize), best, "row {row}");
    }
}

#[test]
fn token_mask_sets_exactly_the_disallowed_columns_to_minus_infinity() {
    let Some(gpu) = gpu() else { return };
    let mut rng = Rng(23);
    // R-4B's shard width at TP 8 (not a multiple of 32: the last word is partial).
    let (rows, v) = (4usize, 151_936usize / 8);
    let words = v.div_ceil(32);
    let logits = rng.vec(rows * v, 10.0);
    // Mask logits rows 3 and 1 (in that order); rows 0 and 2 stay untouched. Row 3's mask
    // allows random ids; row 1's allows only the last column.
    let masked_rows = [3u32, 1];
    let mut allowed = vec![vec![false; v]; 2];
    for a in allowed[0].iter_mut() {
        *a = rng.next().is_multiple_of(7);
    }
    allowed[1][v - 1] = true;
    let mut rows_bits: Vec<u32> = masked_rows.to_vec();
    for a in &allowed {
        let mut m = vec![0u32; words];
        for (j, &ok) in a.iter().enumerate() {
            if ok {
                m[j / 32] |= 1 << (j % 32);
            }
        }
        rows_bits.extend(m);
    }
    let d_l = up(&gpu, &logits);
    let d_m = up(&gpu, &rows_bits);
    // SAFETY: buffers sized above.
    unsafe { gpu.apply_token_mask(d_l.ptr(), v, d_m.ptr(), masked_rows.len()) }.unwrap();
    let got: Vec<f32> = down(&gpu, &d_l, rows * v);
    for row in 0..rows {
        let mask = masked_rows.iter().position(|&r| r as usize == row);
        for j in 0..v {
            let x = logits[row * v + j];
            let want = match mask {
                Some(m) if !allowed[m][j] => f32::NEG_INFINITY,
                _ => x,
            };
            assert_eq!(got[row * v + j], want, "row {row} column {j}");
        }
    }
}

/// `world` ranks of one IPC group in this process: one `Gpu` (own stream, shared context) per
/// rank, wired directly (the multi-process path differs only in how the regions are mapped).
fn ipc_group(world: usize, stage_bytes: usize) -> Option<(Vec<Gpu>, Vec<IpcAllReduce>)> {
    gpu()?;
    let gpus: Vec<Gpu> = (0..world)
        .map(|_| Gpu::new(0, &KernelOptions::default()).expect("opening GPU 0"))
        .collect();
    let mut group: Vec<IpcAllReduce> = gpus
        .iter()
        .enumerate()
        .map(|(rank, g)| {
            IpcAllReduce::new(
                g,
                (rank, world),
                stage_bytes,
                std::time::Duration::from_secs(10),
            )
            .expect("IPC region")
            .0
        })
        .collect();
    IpcAllReduce::connect_local(&mut group, &gpus[0]).expect("wiring the group");
    Some((gpus, group))
}

/// The all-reduce over IPC memory, one-shot and two-shot, eager and captured in CUDA graphs, at
/// 2, 4 and 8 ranks: every rank gets the same bits, and they are the float64 sum of the inputs
/// rounded to bf16 (within one bf16 ulp: the kernel sums in f32).
#[test]
fn ipc_all_reduce_gives_every_rank_the_f64_sum_within_bf16_rounding() {
    use r4b_kernels::cudarc::driver::sys as cu;
    // Counts: one decode row, a tail of 7, 64 rows, one that crosses the staging buffer (run
    // in two pieces), and 256 rows.
    let stage = 2 << 20;
    for world in [2usize, 4, 8] {
        let Some((gpus, mut group)) = ipc_group(world, stage) else {
            return;
        };
        let mut rng = Rng(world as u64);
        for (count, two_shot_min, graph) in [
            (2560usize, usize::MAX, false),
            (2567, usize::MAX, false),
            (64 * 2560, usize::MAX, false),
            (64 * 2560, 0, false),
            (stage / 2 + 2560 * 3 + 5, 0, false),
            (256 * 2560, 1 << 20, false),
            (2560, usize::MAX, true),
            (64 * 2560, 0, true),
        ] {
            for g in group.iter_mut() {
                g.set_two_shot_min_bytes(two_shot_min);
            }
            let inputs: Vec<Vec<f32>> = (0..world)
                .map(|_| (0..count).map(|_| r(rng.uniform() * 4.0)).collect())
                .collect();
            let bufs: Vec<DBuf> = gpus
                .iter()
                .zip(&inputs)
                .map(|(g, x)| up(g, &to_bf16(x)))
                .collect();
            for g in &gpus {
                g.sync().expect("sync");
            }
            // Three calls in a row (epochs and both staging buffers in use), the last on the
            // results: run 1 sums the inputs, runs 2 and 3 multiply by `world` each (exactly,
            // for world a power of two, up to bf16 rounding of the sums).
            let mut graphs = Vec::new();
            for (rank, g) in gpus.iter().enumerate() {
                if graph {
                    g.stream
                        .begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                        .expect("capture");
                }
                for _ in 0..3 {
                    // SAFETY: `bufs[rank]` holds `count` bf16 on this context.
                    unsafe { group[rank].all_reduce_bf16(g, bufs[rank].ptr(), count) }
                        .expect("all-reduce");
                }
                if graph {
                    let gr = g
                        .stream
                        .end_capture(cu::CUgraphInstantiate_flags(0))
                        .expect("end capture")
                        .expect("a graph");
                    graphs.push(gr);
                }
            }
            for gr in &graphs {
                gr.launch().expect("graph launch");
            }
            let outs: Vec<Vec<bf16>> = gpus
                .iter()
                .zip(&bufs)
                .map(|(g, b)| down::<bf16>(g, b, count))
                .collect();
            let what =
                format!("world {world}, count {count}, two-shot ≥ {two_shot_min}, graph {graph}");
            for (rank, o) in outs.iter().enumerate().skip(1) {
                let same = o
                    .iter()
                    .zip(&outs[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{what}: rank {rank} differs from rank 0");
            }
            // The reference: the f64 sum, rounded to bf16, times world² (runs 2 and 3), each
            // step rounded as the kernel's output is.
            let want: Vec<f32> = (0..count)
                .map(|j| {
                    let s1 = r(inputs.iter().map(|x| f64::from(x[j])).sum::<f64>() as f32);
                    let s2 = r(s1 * world as f32);
                    r(s2 * world as f32)
                })
                .collect();
            assert_close_bf16(&from_bf16(&outs[0]), &want, 1.0, &what);
            eprintln!("ipc all-reduce {what}: {world} ranks identical, within one bf16 ulp of f64");
        }
    }
}

/// The IPC all-gather puts every rank's words in rank order, on every rank.
#[test]
fn ipc_all_gather_puts_every_rank_in_order() {
    for world in [2usize, 8] {
        let Some((gpus, group)) = ipc_group(world, 1 << 20) else {
            return;
        };
        let count = 1000;
        let sends: Vec<DBuf> = gpus
            .iter()
            .enumerate()
            .map(|(rank, g)| {
                let v: Vec<u32> = (0..count).map(|i| (rank * 1_000_000 + i) as u32).collect();
                up(g, &v)
            })
            .collect();
        let recvs: Vec<DBuf> = gpus
            .iter()
            .map(|g| zeros::<u32>(g, world * count))
            .collect();
        for g in &gpus {
            g.sync().expect("sync");
        }
        for (rank, g) in gpus.iter().enumerate() {
            // SAFETY: sizes as allocated above.
            unsafe { group[rank].all_gather_u32(g, sends[rank].ptr(), recvs[rank].ptr(), count) }
                .expect("all-gather");
        }
        let want: Vec<u32> = (0..world)
            .flat_map(|r| (0..count).map(move |i| (r * 1_000_000 + i) as u32))
            .collect();
        for (rank, g) in gpus.iter().enumerate() {
            assert_eq!(
                down::<u32>(g, &recvs[rank], world * count),
                want,
                "rank {rank}"
            );
        }
    }
}
