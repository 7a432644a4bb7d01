//! Structured output with llguidance: compiling a request's grammar against the served tokenizer
//! (the gateway, to refuse a bad one with a 400) and the per-sequence token mask (every worker
//! rank, which masks its vocabulary shard before sampling).
//!
//! Design:
//! - **One [`GrammarCompiler`] per tokenizer**, built once from `tokenizer.json` (llguidance's own
//!   `token_bytes_from_tokenizer_json`, no HF tokenizer needed). One extra word, a special token
//!   past the tokenizer's last id, is llguidance's EOS: llguidance allows it where the grammar may
//!   end, and [`SeqConstraint`] replaces it by the request's own stop ids.
//! - **[`SeqConstraint`]** follows one sequence's output tokens: an optional think block (free
//!   text; the grammar applies after `</think>`, and before any output the model may still open
//!   one), then the grammar (an llguidance `Matcher`), then only stop ids once the grammar is
//!   complete. Ids the tokenizer does not have (vocabulary rows past it) are never allowed.
//! - A token the grammar rejects (a forced token, or a grammar that cannot go on) is an error of
//!   that sequence only: the caller fails it alone.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use r4b_proto::v1 as pb;

/// A grammar or tokenizer llguidance refused.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// `tokenizer.json` could not be turned into llguidance's token table.
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    /// The grammar is not valid JSON of an llguidance `TopLevelGrammar`.
    #[error("grammar: {0}")]
    Json(String),
    /// llguidance refused the grammar (its message).
    #[error("{0}")]
    Compile(String),
    /// The output broke the grammar (a token it does not allow).
    #[error("{0}")]
    Rejected(String),
}

/// Compiles grammars against one tokenizer (cheap to clone).
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
    /// Ids `0..n_tokens` are the tokenizer's; `n_tokens` is llguidance's EOS (not a real token).
    n_tokens: u32,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("n_tokens", &self.n_tokens)
            .finish()
    }
}

impl GrammarCompiler {
    /// From the text of a HF `tokenizer.json` (byte-level BPE or byte-fallback).
    pub fn from_tokenizer_json(text: &str) -> Result<Self, GrammarError> {
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        // llguidance asserts on some malformed vocabularies: a panic there is a bad file.
        let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| GrammarError::Tokenizer("llguidance panicked reading it".into()))?
            .map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        Self::from_token_bytes(words)
    }

    /// From each token id's bytes (special tokens prefixed with `TokTrie::SPECIAL_TOKEN_MARKER`).
    pub fn from_token_bytes(mut words: Vec<Vec<u8>>) -> Result<Self, GrammarError> {
        let n_tokens = u32::try_from(words.len())
            .map_err(|_| GrammarError::Tokenizer("more than 2^32 tokens".into()))?;
        let mut eos = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        eos.extend_from_slice(b"<|r4b_grammar_end|>");
        words.push(eos);
        let info = TokRxInfo::new(n_tokens + 1, n_tokens);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Tokenizer(e.to_string()))?;
        factory.quiet();
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
            n_tokens,
        })
    }

    /// Token ids the tokenizer has (`0..n`).
    pub fn n_tokens(&self) -> u32 {
        self.n_tokens
    }

    /// A matcher for `grammar` (a `TopLevelGrammar`), or llguidance's message.
    pub fn matcher(&self, grammar: &TopLevelGrammar) -> Result<Matcher, GrammarError> {
        // Request input reaches the compiler: a panic inside llguidance is that grammar's error.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(grammar.clone())
        }))
        .map_err(|_| GrammarError::Compile("llguidance failed on this grammar".into()))?
        .map_err(|e| GrammarError::Compile(e.to_string()))?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(GrammarError::Compile(e)),
            None => Ok(m),
        }
    }

    /// Compiles `grammar` and computes its first mask: what the gateway checks before sending.
    pub fn check(&self, grammar: &TopLevelGrammar) -> Result<(), GrammarError> {
        let mut m = self.matcher(grammar)?;
        m.compute_mask()
            .map(drop)
            .map_err(|e| GrammarError::Compile(first_line(&e)))
    }
}

/// Where a constrained sequence is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No output yet: the grammar's first token, or `<think>`.
    Start,
    /// Inside a think block: anything.
    Think,
    /// Just after `</think>`: whitespace tokens (the `"\n\n"` a thinking budget appends) are
    /// not part of the answer's grammar; the mask is the grammar's.
    AfterThink,
    /// The grammar.
    Grammar,
    /// The grammar is complete and a stop id came (`ignore_eos`): only stop ids.
    Done,
}

/// Allowed ids as a bitset over global ids (`bit i` of word `i / 32`), or everything.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenMask {
    /// No constraint this step (inside a think block).
    All,
    /// Only these ids (bits set); `len` ids covered, higher ids are disallowed.
    Only {
        /// The bits, 32 ids a word.
        words: Vec<u32>,
    },
}

impl TokenMask {
    /// Whether `id` may be sampled.
    pub fn allows(&self, id: u32) -> bool {
        match self {
            TokenMask::All => true,
            TokenMask::Only { words } => words
                .get((id / 32) as usize)
                .is_some_and(|w| w >> (id % 32) & 1 == 1),
        }
    }

    /// The mask of ids `start .. start + width` (one rank's vocabulary shard) as packed bits,
    /// bit `j` of word `j / 32` for id `start + j`; `None` when everything is allowed.
    pub fn shard_bits(&self, start: u32, width: usize) -> Option<Vec<u32>> {
        let TokenMask::Only { words } = self else {
            return None;
        };
        let mut out = vec![0u32; width.div_ceil(32)];
        if start.is_multiple_of(32) {
            // Word-aligned (every real shard: widths are multiples of 32 or the last rank's).
            let first = (start / 32) as usize;
            for (i, w) in out.iter_mut().enumerate() {
                *w = words.get(first + i).copied().unwrap_or(0);
            }
            if !width.is_multiple_of(32) {
                if let Some(last) = out.last_mut() {
                    *last &= (1u32 << (width % 32)) - 1;
                }
            }
        } else {
            for j in 0..width {
                if self.allows(start + j as u32) {
                    out[j / 32] |= 1 << (j % 32);
                }
            }
        }
        Some(out)
    }
}

/// One sequence's constraint state (see the module doc).
pub struct SeqConstraint {
    matcher: Matcher,
    env: TokEnv,
    phase: Phase,
    think_open: Option<u32>,
    think_close: Option<u32>,
    stop_ids: Vec<u32>,
    n_tokens: u32,
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("phase", &self.phase)
            .finish()
    }
}

impl SeqConstraint {
    /// The state of a sequence with constraint `c`, before any output.
    pub fn new(compiler: &GrammarCompiler, c: &pb::Constraint) -> Result<Self, GrammarError> {
        let grammar: TopLevelGrammar =
            serde_json::from_str(&c.grammar).map_err(|e| GrammarError::Json(e.to_string()))?;
        let matcher = compiler.matcher(&grammar)?;
        let thinks = c.think_open_id != 0 && c.think_close_id != 0;
        let phase = match (thinks, c.think_open_in_prompt) {
            (false, _) => Phase::Grammar,
            (true, true) => Phase::Think,
            (true, false) => Phase::Start,
        };
        Ok(SeqConstraint {
            matcher,
            env: compiler.factory.tok_env().clone(),
            phase,
            think_open: thinks.then_some(c.think_open_id),
            think_close: thinks.then_some(c.think_close_id),
            stop_ids: c.stop_token_ids.clone(),
            n_tokens: compiler.n_tokens,
        })
    }

    /// Follows one output token (sampled or forced); an error names why the grammar refuses it.
    pub fn consume(&mut self, token: u32) -> Result<(), GrammarError> {
        match self.phase {
            Phase::Start if Some(token) == self.think_open => {
                self.phase = Phase::Think;
                Ok(())
            }
            Phase::Think => {
                if Some(token) == self.think_close {
                    self.phase = Phase::AfterThink;
                }
                Ok(())
            }
            Phase::AfterThink if self.is_whitespace(token) => Ok(()),
            Phase::Start | Phase::AfterThink | Phase::Grammar => {
                self.phase = Phase::Grammar;
                if self.stop_ids.contains(&token) && self.grammar_may_end() {
                    self.phase = Phase::Done;
                    return Ok(());
                }
                if token >= self.n_tokens || self.matcher.is_stopped() {
                    return Err(self.rejected(token));
                }
                self.matcher.consume_token(token).map_err(|e| {
                    GrammarError::Rejected(format!("token {token}: {}", first_line(&e)))
                })
            }
            Phase::Done if self.stop_ids.contains(&token) => Ok(()),
            Phase::Done => Err(self.rejected(token)),
        }
    }

    /// Whether `token` is text made of whitespace only.
    fn is_whitespace(&self, token: u32) -> bool {
        token < self.n_tokens && {
            let bytes = self.env.tok_trie().token(token);
            !bytes.is_empty() && bytes.iter().all(|b| b.is_ascii_whitespace())
        }
    }

    fn rejected(&self, token: u32) -> GrammarError {
        GrammarError::Rejected(format!(
            "token {token} does not continue the output's grammar"
        ))
    }

    /// Whether the grammar is complete or may end here.
    fn grammar_may_end(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// The ids allowed next.
    pub fn mask(&mut self) -> Result<TokenMask, GrammarError> {
        let words = (self.n_tokens as usize).div_ceil(32);
        let set = |words: &mut Vec<u32>, id: u32| {
            if let Some(w) = words.get_mut((id / 32) as usize) {
                *w |= 1 << (id % 32);
            }
        };
        let mut only = match self.phase {
            Phase::Think => return Ok(TokenMask::All),
            Phase::Done => vec![0u32; words],
            Phase::Start | Phase::AfterThink | Phase::Grammar if self.matcher.is_stopped() => {
                vec![0u32; words]
            }
            Phase::Start | Phase::AfterThink | Phase::Grammar => {
                let vob = self
                    .matcher
                    .compute_mask()
                    .map_err(|e| GrammarError::Rejected(first_line(&e)))?;
                let mut only: Vec<u32> = vob.as_slice().iter().take(words).copied().collect();
                only.resize(words, 0);
                // llguidance's EOS (id n_tokens) is past `words` bits unless n_tokens % 32 != 0.
                if !self.n_tokens.is_multiple_of(32) {
                    if let Some(last) = only.last_mut() {
                        *last &= (1u32 << (self.n_tokens % 32)) - 1;
                    }
                }
                // `<think>` / `</think>` are text to llguidance; in the answer they are not.
                for id in [self.think_open, self.think_close].into_iter().flatten() {
                    if let Some(w) = only.get_mut((id / 32) as usize) {
                        *w &= !(1 << (id % 32));
                    }
                }
                only
            }
        };
        if self.phase == Phase::Start {
            if let Some(id) = self.think_open {
                set(&mut only, id);
            }
        }
        if self.phase == Phase::Done || self.grammar_may_end() {
            for &id in &self.stop_ids {
                set(&mut only, id);
            }
        }
        if only.iter().all(|&w| w == 0) {
            return Err(GrammarError::Rejected(
                "the grammar allows no token here".into(),
            ));
        }
        Ok(TokenMask::Only { words: only })
    }
}

/// llguidance's errors carry a dump of the parser state after their first line.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes 0..=255 as tokens, then `<think>` (256), `</think>` (257), `<|im_end|>` (258,
    /// special).
    fn compiler() -> GrammarCompiler {
        let mut words: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        words.push(b"<think>".to_vec());
        words.push(b"</think>".to_vec());
        let mut end = vec![TokTrie::SPECIAL_TOKEN_MARKER];
        end.extend_from_slice(b"<|im_end|>");
        words.push(end);
        GrammarCompiler::from_token_bytes(words).expect("compiler")
    }

    fn constraint(g: TopLevelGrammar, think: bool, in_prompt: bool) -> pb::Constraint {
        pb::Constraint {
            grammar: serde_json::to_string(&g).expect("json"),
            think_open_id: if think { 256 } else { 0 },
            think_close_id: if think { 257 } else { 0 },
            think_open_in_prompt: in_prompt,
            stop_token_ids: vec![258],
        }
    }

    fn allowed(m: &TokenMask) -> Vec<u32> {
        (0..300).filter(|&i| m.allows(i)).collect()
    }

    #[test]
    fn regex_masks_follow_the_output() {
        let c = compiler();
        let mut s = SeqConstraint::new(
            &c,
            &constraint(TopLevelGrammar::from_regex("a[bc]"), false, false),
        )
        .expect("compiles");
        assert_eq!(allowed(&s.mask().expect("mask")), vec![u32::from(b'a')]);
        s.consume(u32::from(b'a')).expect("a");
        assert_eq!(
            allowed(&s.mask().expect("mask")),
            vec![u32::from(b'b'), u32::from(b'c')]
        );
        s.consume(u32::from(b'c')).expect("c");
        // Complete: only the stop id.
        assert_eq!(allowed(&s.mask().expect("mask")), vec![258]);
        s.consume(258).expect("stop");
        assert_eq!(allowed(&s.mask().expect("mask")), vec![258]);
        assert!(s.consume(u32::from(b'a')).is_err());
    }

    #[test]
    fn a_refused_token_is_an_error() {
        let c = compiler();
        let mut s = SeqConstraint::new(
            &c,
            &constraint(TopLevelGrammar::from_regex("ab"), false, false),
        )
        .expect("compiles");
        assert!(matches!(
            s.consume(u32::from(b'x')),
            Err(GrammarError::Rejected(_))
        ));
    }

    #[test]
    fn think_block_is_free_then_the_grammar_applies() {
        let c = compiler();
        let g = || TopLevelGrammar::from_regex("[0-9]");
        let mut start = SeqConstraint::new(&c, &constraint(g(), true, false)).expect("compiles");
        let digits: Vec<u32> = (u32::from(b'0')..=u32::from(b'9')).collect();
        let mut with_open = digits.clone();
        with_open.push(256);
        assert_eq!(allowed(&start.mask().expect("mask")), with_open);
        start.consume(256).expect("open");
        assert_eq!(start.mask().expect("mask"), TokenMask::All);
        start.consume(u32::from(b'x')).expect("free text");
        start.consume(257).expect("close");
        assert_eq!(allowed(&start.mask().expect("mask")), digits);

        let mut long = SeqConstraint::new(&c, &constraint(g(), true, true)).expect("compiles");
        assert_eq!(long.mask().expect("mask"), TokenMask::All);
        long.consume(257).expect("close");
        assert_eq!(allowed(&long.mask().expect("mask")), digits);
        // A budget's forced "\n\n" after `</think>` is not the answer's; the grammar still is.
        long.consume(u32::from(b'\n')).expect("newline");
        long.consume(u32::from(b'\n')).expect("newline");
        assert_eq!(allowed(&long.mask().expect("mask")), digits);
        long.consume(u32::from(b'7')).expect("digit");
        assert!(long.consume(u32::from(b'\n')).is_err());
    }

    #[test]
    fn shard_bits_cut_the_vocabulary() {
        let m = TokenMask::Only {
            words: vec![0b1010, 1 << 31, 0b1],
        };
        // Ids 1, 3, 63, 64.
        assert_eq!(m.shard_bits(0, 32), Some(vec![0b1010]));
        assert_eq!(m.shard_bits(32, 64), Some(vec![1 << 31, 1]));
        assert_eq!(m.shard_bits(64, 40), Some(vec![1, 0]));
        assert_eq!(m.shard_bits(2, 4), Some(vec![0b10]));
        assert_eq!(m.shard_bits(96, 32), Some(vec![0]));
        assert_eq!(TokenMask::All.shard_bits(0, 10), None);
    }

    #[test]
    fn bad_grammars_are_refused_with_llguidance_message() {
        let c = compiler();
        let e = c
            .check(&TopLevelGrammar::from_regex("a("))
            .expect_err("bad regex");
        assert!(matches!(e, GrammarError::Compile(_)), "{e:?}");
        let e = c
            .check(&TopLevelGrammar::from_json_schema(
                serde_json::json!({"type": "nonsense"}),
            ))
            .expect_err("bad schema");
        assert!(matches!(e, GrammarError::Compile(_)), "{e:?}");
        c.check(&TopLevelGrammar::from_json_schema(
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
        ))
        .expect("good schema");
    }
}
