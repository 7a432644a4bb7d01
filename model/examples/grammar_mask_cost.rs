//! What structured output costs the CPU per step: the llguidance masks of N constrained
//! sequences (rayon over sequences, as the worker computes them while the forward runs), cut to
//! one rank's shard, plus consuming each sequence's token, over the full-size bench tokenizer's
//! layout (bench/gpu/make_checkpoint.py: ids 0–255 bytes, then fillers " x<k>" up to 151,642,
//! then special tokens; 151,669 ids).
//!
//!   cargo run --release -p r4b-model --example grammar_mask_cost -- [STEPS] [STREAMS...]
//!
//! `R4B_TOKENIZER_JSON=PATH` measures a real `tokenizer.json` instead (e.g. R-4B's Qwen3 one;
//! stop id 151645, `<|im_end|>`, as in both).
//!
//! Each sequence follows a seeded random walk through its grammar (a random allowed token each
//! step), so the masks are those of real, varied parser states.
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokTrie;
use r4b_model::grammar::{GrammarCompiler, SeqConstraint, TokenMask};
use r4b_proto::v1 as pb;
use rayon::prelude::*;

fn words() -> Vec<Vec<u8>> {
    let mut w: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for k in 256..151_643u32 {
        w.push(format!(" x{k}").into_bytes());
    }
    for name in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        let mut t = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        t.extend_from_slice(name.as_bytes());
        w.push(t);
    }
    while w.len() < 151_669 {
        w.push(format!("<extra_{}>", w.len()).into_bytes());
    }
    w
}

fn next_u64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A random allowed id of `m` (stop ids excluded while others exist).
fn pick(m: &TokenMask, n: u32, stop: u32, rng: &mut u64) -> u32 {
    let allowed: Vec<u32> = (0..n).filter(|&i| m.allows(i) && i != stop).collect();
    if allowed.is_empty() {
        return stop;
    }
    allowed[(next_u64(rng) % allowed.len() as u64) as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(64);
    let streams: Vec<usize> = if args.len() > 1 {
        args[1..].to_vec()
    } else {
        vec![1, 64]
    };
    let t = Instant::now();
    // A real tokenizer instead of the bench layout: R4B_TOKENIZER_JSON=path/to/tokenizer.json.
    let compiler = match std::env::var("R4B_TOKENIZER_JSON") {
        Ok(path) => GrammarCompiler::from_tokenizer_json(&std::fs::read_to_string(path)?)?,
        Err(_) => GrammarCompiler::from_token_bytes(words())?,
    };
    println!(
        "tokenizer: {} ids, factory built in {:.0} ms; {} rayon threads",
        compiler.n_tokens(),
        t.elapsed().as_secs_f64() * 1e3,
        rayon::current_num_threads()
    );
    let stop = 151_645u32; // <|im_end|>
    let schemas = [
        (
            "person",
            serde_json::json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 40},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                "kind": {"enum": ["cat", "dog", "bird"]}},
                "required": ["name", "age", "kind"], "additionalProperties": false}),
        ),
        (
            "long array (bench/gpu/structured_bench.py)",
            serde_json::json!({"type": "object", "properties": {"items": {"type": "array",
                "items": {"type": "string", "maxLength": 12}, "minItems": 100000}},
                "required": ["items"], "additionalProperties": false,
                "x-guidance": {"whitespace_flexible": false}}),
        ),
    ];
    for (name, schema) in &schemas {
        let c = pb::Constraint {
            grammar: serde_json::to_string(&TopLevelGrammar::from_json_schema(schema.clone()))?,
            stop_token_ids: vec![stop],
            ..Default::default()
        };
        for &n in &streams {
            let t = Instant::now();
            let mut seqs = (0..n)
                .map(|_| SeqConstraint::new(&compiler, &c))
                .collect::<Result<Vec<_>, _>>()?;
            let compile_ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
            let mut rngs: Vec<u64> = (0..n as u64).collect();
            let (mut mask_s, mut consume_s) = (0.0, 0.0);
            for _ in 0..steps {
                let t = Instant::now();
                // What the worker does per step: every mask, cut to a TP = 1 shard.
                let masks: Vec<TokenMask> = seqs
                    .par_iter_mut()
                    .map(|s| s.mask())
                    .collect::<Result<_, _>>()?;
                let _bits: Vec<Option<Vec<u32>>> =
                    masks.par_iter().map(|m| m.shard_bits(0, 151_936)).collect();
                mask_s += t.elapsed().as_secs_f64();
                let picks: Vec<u32> = masks
                    .iter()
                    .zip(rngs.iter_mut())
                    .map(|(m, r)| pick(m, compiler.n_tokens(), stop, r))
                    .collect();
                let t = Instant::now();
                for (s, &id) in seqs.iter_mut().zip(&picks) {
                    s.consume(id)?;
                }
                consume_s += t.elapsed().as_secs_f64();
            }
            println!(
                "{name}: {n:3} streams: masks {:7.3} ms/step, consume {:6.3} ms/step, \
                 compile {compile_ms:.1} ms/stream ({steps} steps)",
                mask_s * 1e3 / steps as f64,
                consume_s * 1e3 / steps as f64
            );
        }
    }
    Ok(())
}
