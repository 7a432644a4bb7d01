//! Tensor parallelism with real worker processes: TP = 2, 4 and 8 `r4b-worker-offline`
//! processes meeting over the CPU socket collective give the TP = 1 greedy tokens and logits
//! (within 1e-4), which are also HF's.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Runs `tp` ranks on `job` and returns rank 0's output JSON.
fn run_tp(dir: &Path, job: &Path, tp: usize) -> Value {
    let out = dir.join(format!("out-tp{tp}.json"));
    let rdv = dir.join(format!("rdv-tp{tp}.sock"));
    let mut children: Vec<Child> = (0..tp)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_r4b-worker-offline"))
                .args(["--checkpoint", checkpoint_dir().to_str().unwrap()])
                .args(["--tp", &tp.to_string(), "--rank", &rank.to_string()])
                .args(["--rendezvous", rdv.to_str().unwrap()])
                .args([
                    "--job",
                    job.to_str().unwrap(),
                    "--out",
                    out.to_str().unwrap(),
                ])
                .args(["--timeout-s", "120"])
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut failed = Vec::new();
    for (rank, c) in children.iter_mut().enumerate() {
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut s) = c.stderr.take() {
                        std::io::Read::read_to_string(&mut s, &mut err).ok();
                    }
                    failed.push(format!("rank {rank}: {status}: {err}"));
                }
                break;
            }
            if Instant::now() > deadline {
                failed.push(format!("rank {rank}: timed out"));
                let _ = c.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(failed.is_empty(), "TP={tp} failed:\n{}", failed.join("\n"));
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn tokens(run: &Value) -> Vec<u32> {
    run["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn logits(run: &Value) -> Vec<Vec<f32>> {
    run["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// The reference prompts as job entries (image paths absolute).
fn job_prompts(r: &Value, names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|n| {
            let imgs: Vec<String> = images(r, n)
                .iter()
                .map(|f| fixtures().join(f).to_str().unwrap().to_string())
                .collect();
            json!({"input_ids": ids(r, n), "images": imgs})
        })
        .collect()
}

#[test]
fn tp_2_4_8_processes_match_tp1_and_hf() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let names = ["text", "image", "two_images"];
    let prompts = job_prompts(&r, &names);
    let job = tmp.path().join("job.json");
    std::fs::write(
        &job,
        json!({"prompts": prompts, "steps": 32, "record_logits": true}).to_string(),
    )
    .unwrap();

    let base = run_tp(tmp.path(), &job, 1);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(tokens(&base["runs"][i]), greedy(&r, n), "TP=1 {n} vs HF");
    }
    for tp in [2usize, 4, 8] {
        let got = run_tp(tmp.path(), &job, tp);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(
                tokens(&got["runs"][i]),
                tokens(&base["runs"][i]),
                "TP={tp} {n} tokens"
            );
            for (s, (a, b)) in logits(&got["runs"][i])
                .iter()
                .zip(logits(&base["runs"][i]))
                .enumerate()
            {
                let d = max_abs_diff(a, &b);
                assert!(d <= TOL, "TP={tp} {n} step {s}: max abs diff {d}");
            }
        }
    }
}

/// TP = 8 with all three prompts batched in shared steps (prefill chunks of 256 mixed with
/// decodes) gives the same tokens as TP = 1 alone.
#[test]
fn tp8_batched_and_chunked_matches_hf_tokens() {
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let names = ["text", "image", "two_images"];
    let prompts = job_prompts(&r, &names);
    let job = tmp.path().join("job.json");
    let spec = json!({"prompts": prompts, "steps": 32, "batched": true, "prefill_chunk": 256, "block_size": 8});
    std::fs::write(&job, spec.to_string()).unwrap();
    let got = run_tp(tmp.path(), &job, 8);
    for (i, n) in names.iter().enumerate() {
        assert_eq!(tokens(&got["runs"][i]), greedy(&r, n), "{n}");
    }
}

#[test]
fn an_unsupported_tp_size_is_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let job = tmp.path().join("job.json");
    std::fs::write(
        &job,
        json!({"prompts": [{"input_ids": [1, 2, 3]}], "steps": 1}).to_string(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_r4b-worker-offline"))
        .args([
            "--checkpoint",
            checkpoint_dir().to_str().unwrap(),
            "--tp",
            "3",
            "--job",
        ])
        .arg(&job)
        .args(["--out", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tensor parallel size 3") && err.contains("[1, 2, 4, 8]"),
        "{err}"
    );
}
