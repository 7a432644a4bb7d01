//! Structured output in one CPU rank's step executor (the tiny fixture checkpoint plus a
//! hand-written byte-level tokenizer.json): constrained and free sequences in one batch, the
//! grammar state rebuilt from output tokens that arrive in a first chunk (a preempted
//! sequence's re-run), and a token the grammar refuses failing its sequence alone.

mod common;

use std::collections::HashMap;

use llguidance::api::TopLevelGrammar;
use r4b_proto::v1 as pb;
use r4b_worker::service::StepExecutor;

/// GPT-2's byte-level alphabet: the character each byte is written as in tokenizer.json.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// Ids 0–255 are the bytes; 256 `<|im_end|>` (special).
fn tokenizer_json() -> serde_json::Value {
    let vocab: HashMap<String, u32> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), u32::from(b)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [{"id": 256, "content": "<|im_end|>", "special": true}],
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": []}
    })
}

fn executor() -> (StepExecutor, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(common::checkpoint_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tokenizer_json().to_string(),
    )
    .unwrap();
    let (exec, _) = StepExecutor::init(&pb::InitRequest {
        checkpoint: dir.path().to_string_lossy().into_owned(),
        rank: 0,
        world_size: 1,
        block_size: 16,
        num_blocks: 64,
        device: "cpu".into(),
        ..Default::default()
    })
    .unwrap();
    (exec, dir)
}

fn regex(rx: &str) -> pb::Constraint {
    pb::Constraint {
        grammar: serde_json::to_string(&TopLevelGrammar::from_regex(rx)).unwrap(),
        stop_token_ids: vec![256],
        ..Default::default()
    }
}

/// A first chunk of `tokens` (prompt `prompt_len` long, then output), blocks `4·seq ..`.
fn first(seq: u64, tokens: Vec<u32>, prompt_len: u32, c: Option<pb::Constraint>) -> pb::SeqStep {
    pb::SeqStep {
        seq_id: seq,
        block_table: (0..4).map(|b| 4 * seq as u32 + b).collect(),
        tokens,
        start_pos: 0,
        prompt_len,
        sample: true,
        sampling: Some(pb::SamplingParams {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        constraint: c,
        ..Default::default()
    }
}

fn decode(seq: u64, token: u32, pos: u32) -> pb::SeqStep {
    pb::SeqStep {
        seq_id: seq,
        block_table: (0..4).map(|b| 4 * seq as u32 + b).collect(),
        tokens: vec![token],
        start_pos: pos,
        sample: true,
        ..Default::default()
    }
}

fn sampled(r: &pb::StepResponse) -> HashMap<u64, u32> {
    r.sampled
        .iter()
        .map(|s| (s.seq_id, s.token.as_ref().unwrap().id))
        .collect()
}

#[test]
fn constrained_and_free_sequences_share_a_step_and_a_refused_token_fails_only_its_sequence() {
    let (mut exec, _dir) = executor();
    let prompt: Vec<u32> = b"Say it:".iter().map(|&b| u32::from(b)).collect();
    let p = prompt.len() as u32;
    let (a, b) = (u32::from(b'a'), u32::from(b'b'));
    // The free sequence alone, as the reference for its tokens.
    let (mut alone, _d) = executor();
    let r = alone
        .step(&pb::StepRequest {
            step_id: 1,
            seqs: vec![first(2, prompt.clone(), p, None)],
            ..Default::default()
        })
        .unwrap();
    let free_alone = sampled(&r)[&2];

    // 1: seq 1 constrained to ab+c; seq 2 free; seq 3 a re-run whose chunk already holds the
    // output "ab"; seq 4 a re-run whose output "x" the grammar refuses.
    let with = |out: &[u32]| [prompt.as_slice(), out].concat();
    let r = exec
        .step(&pb::StepRequest {
            step_id: 1,
            seqs: vec![
                first(1, prompt.clone(), p, Some(regex("ab+c"))),
                first(2, prompt.clone(), p, None),
                first(3, with(&[a, b]), p, Some(regex("ab+c"))),
                first(4, with(&[u32::from(b'x')]), p, Some(regex("ab+c"))),
            ],
            ..Default::default()
        })
        .unwrap();
    let got = sampled(&r);
    assert_eq!(got.get(&1), Some(&a), "{got:?}");
    assert_eq!(
        got.get(&2),
        Some(&free_alone),
        "free row changed by its neighbours"
    );
    assert!(
        [b, u32::from(b'c')].contains(&got[&3]),
        "after \"ab\": b or c, got {}",
        got[&3]
    );
    assert_eq!(r.rejected.len(), 1, "{:?}", r.rejected);
    assert_eq!(r.rejected[0].seq_id, 4);
    assert!(
        r.rejected[0].reason.contains("structured output"),
        "{}",
        r.rejected[0].reason
    );
    assert!(!got.contains_key(&4));

    // 2: decoding on; seq 1 must go on with b.
    let r = exec
        .step(&pb::StepRequest {
            step_id: 2,
            seqs: vec![decode(1, a, p), decode(2, got[&2], p)],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(sampled(&r).get(&1), Some(&b));
    assert!(r.rejected.is_empty());
}
