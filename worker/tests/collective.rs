//! Multi-process tests of `SocketCollective`: every test spawns one OS process per rank by
//! re-executing this test binary with `--exact child_rank` (works the same under `cargo test` and
//! `cargo nextest run`). The child reads RANK / WORLD / RENDEZVOUS / TEST_CASE, runs its part,
//! and panics (exit code != 0) on any mismatch. Expected values are closed-form functions of the
//! rank, computed here in the test, never by the code under test.

use std::env;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use r4b_worker::collective::{Collective, CollectiveError, SocketCollective, SocketConfig};

const WORLDS: [usize; 3] = [2, 4, 8];

/// Runs `case` on `world` child processes; panics with their logs unless all exit 0 in time.
fn run_group(case: &str, world: usize) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let rendezvous = dir.path().join("rdv.sock");
    let exe = env::current_exe().unwrap();
    let mut children = Vec::new();
    for rank in 0..world {
        let log = std::fs::File::create(dir.path().join(format!("rank{rank}.log"))).unwrap();
        let child = Command::new(&exe)
            .args(["--exact", "child_rank", "--nocapture", "--include-ignored"])
            .env("RANK", rank.to_string())
            .env("WORLD", world.to_string())
            .env("RENDEZVOUS", &rendezvous)
            .env("TEST_CASE", case)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        children.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
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
    let logs: Vec<String> = (0..world)
        .map(|r| std::fs::read_to_string(dir.path().join(format!("rank{r}.log"))).unwrap())
        .collect();
    let failed: Vec<usize> = (0..world)
        .filter(|&r| !status[r].is_some_and(|s| s.success()))
        .collect();
    if !failed.is_empty() {
        let all: Vec<String> = logs
            .iter()
            .enumerate()
            .map(|(r, l)| format!("--- rank {r} ---\n{l}"))
            .collect();
        panic!(
            "case {case}, world {world}: ranks {failed:?} failed or hung\n{}",
            all.join("\n")
        );
    }
    logs
}

#[test]
fn all_reduce_sum_across_processes() {
    WORLDS
        .iter()
        .for_each(|&w| drop(run_group("all_reduce", w)));
}

#[test]
fn all_gather_across_processes() {
    WORLDS
        .iter()
        .for_each(|&w| drop(run_group("all_gather", w)));
}

#[test]
fn broadcast_across_processes() {
    WORLDS.iter().for_each(|&w| drop(run_group("broadcast", w)));
}

#[test]
fn ops_in_sequence_across_processes() {
    WORLDS.iter().for_each(|&w| drop(run_group("sequence", w)));
}

#[test]
fn mismatched_ops_are_protocol_errors() {
    WORLDS.iter().for_each(|&w| drop(run_group("mismatch", w)));
}

#[test]
fn exiting_rank_is_an_error_not_a_hang() {
    for w in WORLDS {
        run_group("peer_exits", w);
        run_group("hub_exits", w);
    }
}

#[test]
fn silent_rank_times_out() {
    WORLDS.iter().for_each(|&w| drop(run_group("silent", w)));
}

/// `cargo test -p r4b-worker --test collective -- --ignored bench --nocapture`
#[test]
#[ignore = "benchmark"]
fn bench_all_reduce_2560_f32() {
    for w in [2, 8] {
        let logs = run_group("bench", w);
        logs[0]
            .lines()
            .filter(|l| l.starts_with("BENCH"))
            .for_each(|l| println!("{l}"));
    }
}

/// One rank of a group; does nothing unless spawned by [`run_group`].
#[test]
#[ignore = "one rank of a multi-process group, spawned by the other tests"]
fn child_rank() {
    let vars = ["RANK", "WORLD", "RENDEZVOUS", "TEST_CASE"].map(|k| env::var(k).ok());
    let [Some(rank), Some(world), Some(rendezvous), Some(case)] = vars else {
        return;
    };
    let (rank, world): (usize, usize) = (rank.parse().unwrap(), world.parse().unwrap());
    let timeout = match case.as_str() {
        "peer_exits" | "hub_exits" => Duration::from_secs(3),
        "silent" => Duration::from_secs(1),
        _ => Duration::from_secs(30),
    };
    let cfg = SocketConfig {
        rendezvous: rendezvous.into(),
        rank,
        world_size: world,
        timeout,
    };
    let c = SocketCollective::connect(&cfg).unwrap();
    assert_eq!((c.rank(), c.world_size()), (rank, world));
    match case.as_str() {
        "all_reduce" => all_reduce(&c),
        "all_gather" => all_gather(&c),
        "broadcast" => broadcast(&c),
        "sequence" => sequence(&c),
        "mismatch" => mismatch(&c),
        "peer_exits" => exits(&c, world - 1, timeout),
        "hub_exits" => exits(&c, 0, timeout),
        "silent" => silent(&c, timeout),
        "bench" => bench(&c),
        other => panic!("unknown TEST_CASE {other}"),
    }
}

fn f32s(rank: usize, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (rank * 1000 + i) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn flat_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn all_reduce(c: &SocketCollective) {
    let (r, w) = (c.rank(), c.world_size());
    // Integers below 2^24: exact in f32, so sum_r (1000 r + i) = 1000 w(w-1)/2 + w i exactly.
    for shape in [vec![1], vec![3, 5], vec![2, 3, 4], vec![100_000]] {
        let out = c.all_reduce_sum(&f32s(r, &shape)).unwrap();
        assert_eq!(out.dims(), shape.as_slice());
        assert_eq!(out.dtype(), DType::F32);
        let expected: Vec<f32> = (0..out.elem_count())
            .map(|i| (1000 * w * (w - 1) / 2 + w * i) as f32)
            .collect();
        assert_eq!(flat_f32(&out), expected, "shape {shape:?}");
    }
    // Non-contiguous input: element (a, b) of the transposed (5, 3) tensor is 1000 r + 3 b + a.
    let out = c.all_reduce_sum(&f32s(r, &[5, 3]).t().unwrap()).unwrap();
    assert_eq!(out.dims(), &[3, 5]);
    let expected: Vec<f32> = (0..15)
        .map(|k| (1000 * w * (w - 1) / 2 + w * (3 * (k % 5) + k / 5)) as f32)
        .collect();
    assert_eq!(flat_f32(&out), expected);
    // Inexact values: the result must be the rank-order sum, bit for bit, on every rank.
    let x = |rank: usize, i: usize| 0.1f32 * (rank + 1) as f32 + 1e-3 * i as f32 / 7.0;
    let input: Vec<f32> = (0..257).map(|i| x(r, i)).collect();
    let out = c
        .all_reduce_sum(&Tensor::new(input.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    let expected: Vec<u32> = (0..257)
        .map(|i| (1..w).fold(x(0, i), |acc, rank| acc + x(rank, i)).to_bits())
        .collect();
    let bits: Vec<u32> = flat_f32(&out).iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits, expected);
    // U32 (wrapping) sums: sum_r (7 r + i) = 7 w(w-1)/2 + w i, and u32::MAX + w - 1 wraps.
    let v: Vec<u32> = (0..10).map(|i| (7 * r + i) as u32).collect();
    let out = c
        .all_reduce_sum(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
        .unwrap();
    let expected: Vec<u32> = (0..10)
        .map(|i| (7 * w * (w - 1) / 2 + w * i) as u32)
        .collect();
    assert_eq!(out.to_vec1::<u32>().unwrap(), expected);
    let v = if r == 0 { u32::MAX } else { 1 };
    let out = c
        .all_reduce_sum(&Tensor::new(&[v], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(
        out.to_vec1::<u32>().unwrap(),
        vec![(w as u32).wrapping_sub(2)]
    );
}

fn all_gather(c: &SocketCollective) {
    let (r, w) = (c.rank(), c.world_size());
    let parts = c.all_gather(&f32s(r, &[r + 1, 2])).unwrap();
    assert_eq!(parts.len(), w);
    for (q, p) in parts.iter().enumerate() {
        assert_eq!(p.dims(), &[q + 1, 2]);
        let expected: Vec<f32> = (0..2 * (q + 1)).map(|i| (q * 1000 + i) as f32).collect();
        assert_eq!(flat_f32(p), expected, "part {q}");
    }
    // U32 of length r: rank 0 contributes an empty tensor.
    let v: Vec<u32> = (0..r).map(|i| (r * 100 + i) as u32).collect();
    let parts = c
        .all_gather(&Tensor::from_vec(v, r, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(parts.len(), w);
    for (q, p) in parts.iter().enumerate() {
        assert_eq!((p.dims(), p.dtype()), (&[q][..], DType::U32));
        let expected: Vec<u32> = (0..q).map(|i| (q * 100 + i) as u32).collect();
        assert_eq!(p.to_vec1::<u32>().unwrap(), expected, "part {q}");
    }
}

fn broadcast(c: &SocketCollective) {
    let (r, w) = (c.rank(), c.world_size());
    for root in [0, w - 1, w / 2] {
        let input = if r == root {
            f32s(r, &[4, 5])
        } else {
            Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap()
        };
        let out = c.broadcast(&input, root).unwrap();
        assert_eq!(out.dims(), &[4, 5]);
        let expected: Vec<f32> = (0..20).map(|i| (root * 1000 + i) as f32).collect();
        assert_eq!(flat_f32(&out), expected, "root {root}");
    }
    let input = Tensor::new(&[r as u32 * 10, 3], &Device::Cpu).unwrap();
    let out = c.broadcast(&input, w - 1).unwrap();
    assert_eq!(out.to_vec1::<u32>().unwrap(), vec![(w - 1) as u32 * 10, 3]);
}

fn sequence(c: &SocketCollective) {
    let (r, w) = (c.rank(), c.world_size());
    let dev = &Device::Cpu;
    for k in 0..40usize {
        let v: Vec<f32> = (0..3).map(|i| (k + r + i) as f32).collect();
        let out = c
            .all_reduce_sum(&Tensor::new(v.as_slice(), dev).unwrap())
            .unwrap();
        let expected: Vec<f32> = (0..3)
            .map(|i| (w * (k + i) + w * (w - 1) / 2) as f32)
            .collect();
        assert_eq!(out.to_vec1::<f32>().unwrap(), expected, "step {k}");
        let parts = c
            .all_gather(&Tensor::new(&[(r * k) as u32], dev).unwrap())
            .unwrap();
        let got: Vec<u32> = parts
            .iter()
            .map(|p| p.to_vec1::<u32>().unwrap()[0])
            .collect();
        assert_eq!(
            got,
            (0..w).map(|q| (q * k) as u32).collect::<Vec<_>>(),
            "step {k}"
        );
        let root = k % w;
        let out = c
            .broadcast(&Tensor::new(&[(10 * k + r) as f32], dev).unwrap(), root)
            .unwrap();
        assert_eq!(
            out.to_vec1::<f32>().unwrap(),
            vec![(10 * k + root) as f32],
            "step {k}"
        );
    }
}

fn mismatch(c: &SocketCollective) {
    let (r, w) = (c.rank(), c.world_size());
    let t = f32s(r, &[4]);
    let result = if r == w - 1 {
        c.all_gather(&t).map(|_| ())
    } else {
        c.all_reduce_sum(&t).map(|_| ())
    };
    assert!(
        matches!(result, Err(CollectiveError::Protocol(_))),
        "rank {r}: {result:?}"
    );
    let again = c.all_reduce_sum(&t);
    assert!(
        matches!(again, Err(CollectiveError::Poisoned { .. })),
        "rank {r}: {again:?}"
    );
}

fn exits(c: &SocketCollective, leaver: usize, timeout: Duration) {
    if c.rank() == leaver {
        return; // the process exits without taking part
    }
    let start = Instant::now();
    let result = c.all_reduce_sum(&f32s(c.rank(), &[64]));
    let elapsed = start.elapsed();
    assert!(
        matches!(result, Err(CollectiveError::PeerGone { rank, .. }) if rank == leaver),
        "rank {}: {result:?}",
        c.rank()
    );
    assert!(
        elapsed < timeout,
        "rank {}: error after {elapsed:?}",
        c.rank()
    );
    let again = c.broadcast(&f32s(c.rank(), &[1]), 0);
    assert!(
        matches!(again, Err(CollectiveError::Poisoned { .. })),
        "{again:?}"
    );
}

fn silent(c: &SocketCollective, timeout: Duration) {
    let (r, w) = (c.rank(), c.world_size());
    if r == w - 1 {
        std::thread::sleep(timeout * 2 + timeout / 2);
        assert!(c.all_reduce_sum(&f32s(r, &[8])).is_err());
        return;
    }
    let start = Instant::now();
    let result = c.all_reduce_sum(&f32s(r, &[8]));
    let elapsed = start.elapsed();
    assert!(
        matches!(result, Err(CollectiveError::Timeout { .. })),
        "rank {r}: {result:?}"
    );
    assert!(elapsed < timeout * 2, "rank {r}: error after {elapsed:?}");
}

fn bench(c: &SocketCollective) {
    let t = f32s(c.rank(), &[2560]);
    let mut micros = Vec::with_capacity(500);
    for i in 0..550 {
        let start = Instant::now();
        c.all_reduce_sum(&t).unwrap();
        if i >= 50 {
            micros.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    micros.sort_by(f64::total_cmp);
    let p = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    println!(
        "BENCH all_reduce_sum 2560 f32, world {}, rank {}: median {:.1} us, p10 {:.1} us, p90 {:.1} us ({} runs)",
        c.world_size(), c.rank(), p(0.5), p(0.1), p(0.9), micros.len()
    );
}
