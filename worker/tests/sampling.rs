//! Tests of `r4b_worker::sampling`.
//!
//! - World size 1: statistics of seeded draws against the softmax of a hand-made distribution,
//!   penalties and logprobs against values computed here in f64, reproducibility.
//! - Multi-process (world 2, 4, 8): one OS process per rank, spawned by re-executing this test
//!   binary with `--exact child_rank` (as `tests/collective.rs` does). Each rank holds its slice of a
//!   hand-made logit matrix (or of a tiny `lm_head` checkpoint) and checks that the group's result
//!   equals what world size 1 gives on the full matrix.

use std::env;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use r4b_worker::checkpoint::{Checkpoint, Weights};
use r4b_worker::collective::{Collective, SingleRank, SocketCollective, SocketConfig};
use r4b_worker::parallel::{Shard, VocabParallelHead};
use r4b_worker::sampling::{
    sample, sample_logits, SampleRow, SampledToken, SamplingParams, TokenHistory,
};

/// Vocabulary of the hand-made matrices (divisible by 2, 4 and 8).
const V: usize = 48;
/// Hidden width of the tiny head.
const H: usize = 8;

// ------------------------------------------------------------------------------------------------
// Fixtures
// ------------------------------------------------------------------------------------------------

/// One test row: parameters, history, seed.
struct Case {
    params: SamplingParams,
    history: TokenHistory,
    seed: u64,
}

fn sampling(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn history(prompt: &[u32], output: &[u32]) -> TokenHistory {
    let mut h = TokenHistory::default();
    prompt.iter().for_each(|&id| h.push_prompt(id));
    output.iter().for_each(|&id| h.push_output(id));
    h
}

fn case(params: SamplingParams, history: TokenHistory) -> Case {
    let seed = params.seed.unwrap_or(0);
    Case {
        params,
        history,
        seed,
    }
}

/// The rows every world size samples: greedy, penalties, ties, filters, logprobs, many seeds.
fn cases() -> Vec<Case> {
    let g = SamplingParams::default();
    let pen = SamplingParams {
        repetition_penalty: 1.3,
        frequency_penalty: 0.4,
        presence_penalty: 0.3,
        ..g.clone()
    };
    let hist = || history(&[1, 2, 3, 40, 47], &[7, 7, 12, 33, 1]);
    let mut v = vec![
        case(g.clone(), TokenHistory::default()),
        case(pen.clone(), hist()),
        case(g.clone(), TokenHistory::default()), // row 2 has a tie (ids 5 and 40)
        case(
            SamplingParams {
                top_k: 5,
                ..sampling(0.8, 11)
            },
            history(&[], &[3, 4, 5]),
        ),
        case(
            SamplingParams {
                top_p: 0.9,
                ..sampling(1.2, 12)
            },
            TokenHistory::default(),
        ),
        case(
            SamplingParams {
                min_p: 0.1,
                ..sampling(1.0, 13)
            },
            hist(),
        ),
        case(
            SamplingParams {
                top_k: 10,
                top_p: 0.8,
                min_p: 0.05,
                logprobs: true,
                top_logprobs: 5,
                ..SamplingParams {
                    temperature: 0.7,
                    seed: Some(14),
                    ..pen.clone()
                }
            },
            hist(),
        ),
        case(
            SamplingParams {
                logprobs: true,
                top_logprobs: 20,
                ..pen
            },
            hist(),
        ),
        case(
            SamplingParams {
                logprobs: true,
                top_logprobs: 3,
                ..sampling(1.5, 15)
            },
            hist(),
        ),
        case(
            SamplingParams {
                top_k: 1000,
                ..sampling(2.0, 16)
            },
            TokenHistory::default(),
        ),
    ];
    for s in 0..64 {
        let p = SamplingParams {
            top_p: 0.95,
            logprobs: s % 2 == 0,
            ..sampling(1.0, 100 + s)
        };
        v.push(case(p, history(&[], &vec![9; s as usize % 5])));
    }
    v
}

fn rows(cases: &[Case]) -> Vec<SampleRow<'_>> {
    cases
        .iter()
        .map(|c| SampleRow {
            params: &c.params,
            history: &c.history,
            seed: c.seed,
        })
        .collect()
}

/// A closed-form logit matrix `[b, V]` with a spread of values; row 2 has a tie at the top.
fn matrix(b: usize) -> Vec<Vec<f32>> {
    (0..b)
        .map(|r| {
            let mut row: Vec<f32> = (0..V)
                .map(|j| {
                    let (r, j) = (r as f32, j as f32);
                    2.5 * (0.7 * j + 1.3 * r).sin() + 0.8 * (2.1 * j * (r + 1.0)).cos()
                })
                .collect();
            if r == 2 {
                row[5] = 10.0;
                row[40] = 10.0;
            }
            row
        })
        .collect()
}

/// Vocabulary of the wide matrix (more than `DEFAULT_CANDIDATES`, divisible by 8).
const WIDE: usize = 1024;

/// A nearly flat `[b, WIDE]` matrix: much of the mass lies beyond any rank's top 256.
fn wide_matrix(b: usize) -> Vec<Vec<f32>> {
    (0..b)
        .map(|r| {
            (0..WIDE)
                .map(|j| ((j * 31 + r * 17) % 97) as f32 * 0.05)
                .collect()
        })
        .collect()
}

/// Plain and nucleus sampling at a high temperature over [`wide_matrix`].
fn wide_cases() -> Vec<Case> {
    (0..48)
        .map(|s| {
            let top_p = [1.0, 0.99, 0.5][s as usize % 3];
            let p = SamplingParams {
                top_p,
                logprobs: true,
                top_logprobs: 4,
                ..sampling(2.0, s)
            };
            case(p, TokenHistory::default())
        })
        .collect()
}

fn tensor(m: &[Vec<f32>]) -> Tensor {
    let flat: Vec<f32> = m.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (m.len(), m[0].len()), &Device::Cpu).unwrap()
}

/// Asserts equal ids and logprobs within 1e-5.
fn assert_same(got: &[SampledToken], want: &[SampledToken], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.id, w.id, "{what} row {i}");
        assert!(
            (g.logprob - w.logprob).abs() < 1e-5,
            "{what} row {i}: {g:?} vs {w:?}"
        );
        let ids = |t: &SampledToken| t.top.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(ids(g), ids(w), "{what} row {i}");
        for (a, b) in g.top.iter().zip(&w.top) {
            assert!((a.1 - b.1).abs() < 1e-5, "{what} row {i}: {g:?} vs {w:?}");
        }
    }
}

/// Log-softmax of a row, in f64.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    let lse = m + row
        .iter()
        .map(|&x| (f64::from(x) - m).exp())
        .sum::<f64>()
        .ln();
    row.iter().map(|&x| f64::from(x) - lse).collect()
}

/// Writes a checkpoint holding `lm_head.weight [V, H]` (closed-form values) and returns it.
fn write_head_checkpoint(dir: &Path) -> Vec<f32> {
    let w: Vec<f32> = (0..V * H)
        .map(|i| ((i * 7919 % 211) as f32 / 211.0 - 0.5) * 3.0)
        .collect();
    let tensors = [
        (
            "lm_head.weight",
            Tensor::from_vec(w.clone(), (V, H), &Device::Cpu).unwrap(),
        ),
        (
            "model.language_model.norm.weight",
            Tensor::ones(H, DType::F32, &Device::Cpu).unwrap(),
        ),
    ];
    let map: std::collections::HashMap<&str, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("model.safetensors")).unwrap();
    w
}

/// Hidden states `[b, H]` for the head tests.
fn hidden(b: usize) -> Vec<Vec<f32>> {
    (0..b)
        .map(|r| {
            (0..H)
                .map(|j| ((r * H + j) as f32 * 0.37).sin() * 1.5)
                .collect()
        })
        .collect()
}

fn load_head(dir: &Path, shard: Shard, comm: Arc<dyn Collective>) -> VocabParallelHead {
    let ckpt = Checkpoint::open(dir).unwrap();
    let w = Weights::new(&ckpt, &Device::Cpu, DType::F32);
    VocabParallelHead::load(&w.pp("lm_head"), V, H, shard, comm).unwrap()
}

// ------------------------------------------------------------------------------------------------
// World size 1
// ------------------------------------------------------------------------------------------------

/// Frequencies of each id among `tokens`.
fn frequencies(tokens: &[SampledToken], vocab: usize) -> Vec<f64> {
    let mut counts = vec![0usize; vocab];
    tokens.iter().for_each(|t| counts[t.id as usize] += 1);
    counts
        .iter()
        .map(|&c| c as f64 / tokens.len() as f64)
        .collect()
}

/// 20k draws of a 4-token distribution `probs`, one row each, varying the seed or the counter.
fn draws(params: &SamplingParams, probs: &[f64; 4], vary_seed: bool) -> Vec<SampledToken> {
    let n = 20_000;
    let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
    let logits = tensor(&vec![row; n]);
    let mut h = TokenHistory::default();
    let histories: Vec<TokenHistory> = (0..n)
        .map(|_| {
            let out = h.clone();
            if !vary_seed {
                h.push_output(1_000_000); // not in the vocabulary: no penalty, only the counter
            }
            out
        })
        .collect();
    let rows: Vec<SampleRow> = histories
        .iter()
        .enumerate()
        .map(|(i, h)| SampleRow {
            params,
            history: h,
            seed: if vary_seed { i as u64 } else { 777 },
        })
        .collect();
    sample_logits(&logits, &SingleRank, &rows).unwrap()
}

#[test]
fn seeded_draws_follow_the_softmax() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    for vary_seed in [true, false] {
        let f = frequencies(&draws(&sampling(1.0, 0), &probs, vary_seed), 4);
        for (got, want) in f.iter().zip(probs) {
            assert!((got - want).abs() < 0.01, "vary_seed {vary_seed}: {f:?}");
        }
    }
    // Temperature 0.5 squares the probabilities: p² / Σ p² = [1, 4, 9, 16] / 30.
    let f = frequencies(&draws(&sampling(0.5, 0), &probs, true), 4);
    for (got, want) in f.iter().zip([1.0, 4.0, 9.0, 16.0].map(|x| x / 30.0)) {
        assert!((got - want).abs() < 0.01, "temperature 0.5: {f:?}");
    }
}

#[test]
fn top_k_top_p_and_min_p_keep_only_the_head() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    // Each of these keeps exactly ids 3 and 2, so id 3 has 0.4 / 0.7 of the draws.
    let filters = [
        SamplingParams {
            top_k: 2,
            ..sampling(1.0, 0)
        },
        SamplingParams {
            top_p: 0.6,
            ..sampling(1.0, 0)
        },
        SamplingParams {
            min_p: 0.6,
            ..sampling(1.0, 0)
        },
    ];
    for p in filters {
        let f = frequencies(&draws(&p, &probs, true), 4);
        assert_eq!((f[0], f[1]), (0.0, 0.0), "{p:?}: {f:?}");
        assert!((f[3] - 0.4 / 0.7).abs() < 0.01, "{p:?}: {f:?}");
    }
}

#[test]
fn same_seed_same_tokens_and_counter_changes_them() {
    let c = cases();
    let logits = tensor(&matrix(c.len()));
    let a = sample_logits(&logits, &SingleRank, &rows(&c)).unwrap();
    let b = sample_logits(&logits, &SingleRank, &rows(&c)).unwrap();
    assert_eq!(a, b);
    // Over the 64 seeded rows, a different seed changes some of the tokens.
    let mut c2 = cases();
    c2.iter_mut().for_each(|c| c.seed ^= 0x5555);
    let d = sample_logits(&logits, &SingleRank, &rows(&c2)).unwrap();
    assert!(a.iter().zip(&d).skip(10).any(|(x, y)| x.id != y.id));
}

#[test]
fn greedy_penalties_and_ties_match_hand_computed() {
    // Penalised, id 7 drops to 5.0 / 1.5 − 2 · 0.5 − 0.25 = 2.0833: still above id 3 (2.0) and
    // id 4 when 4 is in the prompt (3.0 / 1.5 = 2.0), below id 4 when it is not (3.0).
    let row = vec![0.5f32, -1.0, 1.0, 2.0, 3.0, 0.0, 0.2, 5.0];
    let p = SamplingParams {
        repetition_penalty: 1.5,
        frequency_penalty: 0.5,
        presence_penalty: 0.25,
        ..SamplingParams::default()
    };
    let logits = tensor(&[row]);
    let h = history(&[4], &[7, 7]);
    let got = sample_logits(
        &logits,
        &SingleRank,
        &[SampleRow {
            params: &p,
            history: &h,
            seed: 0,
        }],
    );
    assert_eq!(got.unwrap()[0].id, 7);
    let h = history(&[], &[7, 7]);
    let got = sample_logits(
        &logits,
        &SingleRank,
        &[SampleRow {
            params: &p,
            history: &h,
            seed: 0,
        }],
    );
    assert_eq!(got.unwrap()[0].id, 4);
    // The tie of row 2 in the shared matrix goes to the lower id.
    let c = cases();
    let got = sample_logits(&tensor(&matrix(c.len())), &SingleRank, &rows(&c)).unwrap();
    assert_eq!(got[2].id, 5);
}

#[test]
fn logprobs_are_the_raw_log_softmax() {
    let c = cases();
    let m = matrix(c.len());
    let got = sample_logits(&tensor(&m), &SingleRank, &rows(&c)).unwrap();
    let mut checked = 0;
    for ((t, case), row) in got.iter().zip(&c).zip(&m) {
        if !case.params.logprobs {
            assert_eq!((t.logprob, t.top.len()), (0.0, 0));
            continue;
        }
        let lsm = log_softmax(row);
        assert!(
            (f64::from(t.logprob) - lsm[t.id as usize]).abs() < 1e-5,
            "{t:?}"
        );
        let mut order: Vec<usize> = (0..V).collect();
        order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
        let n = case.params.top_logprobs as usize;
        assert_eq!(
            t.top.iter().map(|p| p.0 as usize).collect::<Vec<_>>(),
            order[..n]
        );
        for &(id, lp) in &t.top {
            assert!((f64::from(lp) - lsm[id as usize]).abs() < 1e-5, "{t:?}");
        }
        checked += 1;
    }
    assert!(checked >= 30);
}

#[test]
fn sample_uses_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let w = write_head_checkpoint(dir.path());
    let c = cases();
    let x = hidden(c.len());
    // Logits x Wᵀ computed here, row by row.
    let logits: Vec<Vec<f32>> = x
        .iter()
        .map(|xr| {
            (0..V)
                .map(|v| (0..H).map(|j| xr[j] * w[v * H + j]).sum())
                .collect()
        })
        .collect();
    let want = sample_logits(&tensor(&logits), &SingleRank, &rows(&c)).unwrap();
    let head = load_head(dir.path(), Shard::SINGLE, Arc::new(SingleRank));
    let got = sample(&head, &SingleRank, &tensor(&x), &rows(&c)).unwrap();
    assert_same(&got, &want, "head");
}

// ------------------------------------------------------------------------------------------------
// Multi-process
// ------------------------------------------------------------------------------------------------

/// Runs `case` on `world` child processes; panics with their logs unless all exit 0 in time.
fn run_group(case: &str, world: usize, dir: &Path) {
    let rendezvous = dir.join(format!("{case}-{world}.sock"));
    let exe = env::current_exe().unwrap();
    let log = |rank: usize| dir.join(format!("{case}-{world}-rank{rank}.log"));
    let mut children = Vec::new();
    for rank in 0..world {
        let file = std::fs::File::create(log(rank)).unwrap();
        let child = Command::new(&exe)
            .args(["--exact", "child_rank", "--nocapture", "--include-ignored"])
            .env("RANK", rank.to_string())
            .env("WORLD", world.to_string())
            .env("RENDEZVOUS", &rendezvous)
            .env("TEST_CASE", case)
            .env("TEST_DIR", dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = vec![None; world];
    while status.iter().any(Option::is_none) && Instant::now() < deadline {
        for (s, child) in status.iter_mut().zip(&mut children) {
            if s.is_none() {
                *s = child.try_wait().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (s, child) in status.iter().zip(&mut children) {
        if s.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    let failed: Vec<usize> = (0..world)
        .filter(|&r| !status[r].is_some_and(|s| s.success()))
        .collect();
    if !failed.is_empty() {
        let logs: Vec<String> = (0..world)
            .map(|r| {
                format!(
                    "--- rank {r} ---\n{}",
                    std::fs::read_to_string(log(r)).unwrap_or_default()
                )
            })
            .collect();
        panic!(
            "case {case}, world {world}: ranks {failed:?} failed or hung\n{}",
            logs.join("\n")
        );
    }
}

#[test]
fn every_rank_matches_world_size_1_on_logit_slices() {
    let dir = tempfile::tempdir().unwrap();
    for world in [2, 4, 8] {
        run_group("logits", world, dir.path());
    }
}

#[test]
fn every_rank_matches_world_size_1_through_the_head() {
    let dir = tempfile::tempdir().unwrap();
    write_head_checkpoint(dir.path());
    for world in [2, 4] {
        run_group("head", world, dir.path());
    }
}

/// One rank of a group; does nothing unless spawned by [`run_group`].
#[test]
#[ignore = "one rank of a multi-process group, spawned by the other tests"]
fn child_rank() {
    let vars = ["RANK", "WORLD", "RENDEZVOUS", "TEST_CASE", "TEST_DIR"].map(|k| env::var(k).ok());
    let [Some(rank), Some(world), Some(rendezvous), Some(case), Some(dir)] = vars else {
        return;
    };
    let (rank, world): (usize, usize) = (rank.parse().unwrap(), world.parse().unwrap());
    let cfg = SocketConfig {
        rendezvous: rendezvous.into(),
        rank,
        world_size: world,
        timeout: Duration::from_secs(60),
    };
    let comm = Arc::new(SocketCollective::connect(&cfg).unwrap());
    let c = cases();
    match case.as_str() {
        "logits" => {
            let full = tensor(&matrix(c.len()));
            let want = sample_logits(&full, &SingleRank, &rows(&c)).unwrap();
            let w = V / world;
            let local = full.narrow(1, rank * w, w).unwrap();
            let got = sample_logits(&local, comm.as_ref(), &rows(&c)).unwrap();
            assert_same(&got, &want, &format!("logits, rank {rank} of {world}"));
            // A second step on the same group (sequence numbers advance; still identical).
            let again = sample_logits(&local, comm.as_ref(), &rows(&c)).unwrap();
            assert_eq!(again, got);
            // A vocabulary wider than the candidate count: the union of per-rank candidates is cut
            // to the global top K, so high-temperature draws still match world size 1.
            let wide_cases = wide_cases();
            let full = tensor(&wide_matrix(wide_cases.len()));
            let want = sample_logits(&full, &SingleRank, &rows(&wide_cases)).unwrap();
            let w = WIDE / world;
            let local = full.narrow(1, rank * w, w).unwrap();
            let got = sample_logits(&local, comm.as_ref(), &rows(&wide_cases)).unwrap();
            assert_same(&got, &want, &format!("wide, rank {rank} of {world}"));
        }
        "head" => {
            let dir = Path::new(&dir);
            let x = tensor(&hidden(c.len()));
            let full = load_head(dir, Shard::SINGLE, Arc::new(SingleRank));
            let want = sample(&full, &SingleRank, &x, &rows(&c)).unwrap();
            let head = load_head(dir, Shard { rank, world }, comm.clone());
            let got = sample(&head, comm.as_ref(), &x, &rows(&c)).unwrap();
            assert_same(&got, &want, &format!("head, rank {rank} of {world}"));
        }
        other => panic!("unknown TEST_CASE {other}"),
    }
}
