//! Prompt log-probabilities and token keys as vLLM returns them.
//!
//! - `echo` + `logprobs` (completions): the prompt tokens come first in `choices[].logprobs`,
//!   the first one with `null` log-probability and alternatives (nothing predicts it); each later
//!   one with its log-probability and a dict of the token itself plus its `logprobs` most likely
//!   alternatives (vLLM's dict: up to `k + 1` entries).
//! - `prompt_logprobs: k` (vLLM's extension, both endpoints): a list with `null` first, then per
//!   prompt token `{token_id: {logprob, rank, decoded_token}}` for the token and its `k` most
//!   likely alternatives. Completions carry it per choice, chat at the top level (as vLLM does).
//!   Not available when streaming (vLLM refuses it too).
//! - Keys: completions' `top_logprobs` are dicts keyed by token text, so alternatives with the
//!   same text (byte tokens that are not UTF-8 on their own all read U+FFFD) share a key and only
//!   one survives, exactly as in vLLM. `return_tokens_as_token_ids: true` names every token
//!   `token_id:N` instead (vLLM's option, on both endpoints), which keeps them apart.
//!
//! Log-probabilities of `-inf` are sent as `-9999.0` (vLLM's clamp; JSON has no infinity).

use r4b_proto::v1 as pb;

use crate::api::{PromptLogprobEntry, PromptLogprobs};
use crate::tokens::TextTokenizer;
use crate::validate::ValidationError;

/// vLLM's floor for log-probabilities in responses.
pub const FLOOR: f32 = -9999.0;

/// `lp`, with `-inf` and NaN raised to [`FLOOR`].
pub fn clamp(lp: f32) -> f32 {
    if lp.is_nan() {
        FLOOR
    } else {
        lp.max(FLOOR)
    }
}

/// How a token is named in logprobs: its text, or `token_id:N`.
pub fn token_key(tok: &TextTokenizer, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        tok.token_text(id)
    }
}

/// Checks vLLM's `prompt_logprobs` (`0..=max`; `-1`, vLLM's whole vocabulary, is refused).
pub fn prompt_logprobs_param(
    v: Option<i64>,
    max: u32,
    stream: bool,
) -> Result<Option<u32>, ValidationError> {
    let Some(k) = v else {
        return Ok(None);
    };
    if !(0..=i64::from(max)).contains(&k) {
        return Err(ValidationError::OutOfRange {
            field: "prompt_logprobs".into(),
            bound: format!("in [0, {max}]"),
            value: k.to_string(),
        });
    }
    if stream {
        return Err(ValidationError::Invalid {
            field: "prompt_logprobs".into(),
            reason: "prompt_logprobs are not available when stream is true".into(),
        });
    }
    Ok(u32::try_from(k).ok())
}

/// vLLM's `prompt_logprobs` list for a prompt: `null`, then one dict per entry (position order).
pub fn vllm_prompt_logprobs(
    tok: &TextTokenizer,
    entries: &[pb::PromptLogprob],
    k: usize,
) -> Vec<Option<PromptLogprobs>> {
    let mut out = Vec::with_capacity(entries.len() + 1);
    out.push(None);
    for e in entries {
        let mut d = PromptLogprobs::new();
        d.insert(
            e.id.to_string(),
            PromptLogprobEntry {
                logprob: clamp(e.logprob),
                rank: e.rank,
                decoded_token: tok.token_text(e.id),
            },
        );
        for (i, t) in e.top.iter().take(k).enumerate() {
            d.entry(t.id.to_string())
                .or_insert_with(|| PromptLogprobEntry {
                    logprob: clamp(t.logprob),
                    rank: i as u32 + 1,
                    decoded_token: tok.token_text(t.id),
                });
        }
        out.push(Some(d));
    }
    out
}

/// One position of completions logprobs before formatting: the token, its log-probability and
/// alternatives (`None` for the first prompt token), and whether the token itself belongs in the
/// alternatives (prompt positions, as vLLM's dict holds it).
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    /// The token.
    pub id: u32,
    /// Its log-probability and alternatives; `None` when nothing predicts it.
    pub scored: Option<(f32, Vec<(u32, f32)>)>,
}

/// The echoed prompt's positions: `ids[0]` unscored, then the entries' (alternatives cut to `k`,
/// the prompt token itself added first when not among them).
pub fn echo_positions(ids: &[u32], entries: &[pb::PromptLogprob], k: usize) -> Vec<Position> {
    let mut out = Vec::with_capacity(ids.len());
    if let Some(&first) = ids.first() {
        out.push(Position {
            id: first,
            scored: None,
        });
    }
    for e in entries {
        let mut top: Vec<(u32, f32)> = e.top.iter().take(k).map(|t| (t.id, t.logprob)).collect();
        if !top.iter().any(|t| t.0 == e.id) {
            top.insert(0, (e.id, e.logprob));
        }
        out.push(Position {
            id: e.id,
            scored: Some((e.logprob, top)),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_and_param() {
        assert_eq!(clamp(f32::NEG_INFINITY), FLOOR);
        assert_eq!(clamp(f32::NAN), FLOOR);
        assert_eq!(clamp(-1.5), -1.5);
        assert_eq!(prompt_logprobs_param(None, 20, true).ok(), Some(None));
        assert_eq!(
            prompt_logprobs_param(Some(3), 20, false).ok(),
            Some(Some(3))
        );
        for (v, stream) in [(-1, false), (21, false), (2, true)] {
            let e = prompt_logprobs_param(Some(v), 20, stream).expect_err("refused");
            assert_eq!(e.param().as_deref(), Some("prompt_logprobs"));
        }
    }

    #[test]
    fn echo_positions_put_the_prompt_token_in_its_alternatives() {
        let tl = |id, logprob| pb::TopLogprob { id, logprob };
        let entries = [
            pb::PromptLogprob {
                position: 1,
                id: 7,
                logprob: -3.0,
                rank: 4,
                top: vec![tl(1, -0.5), tl(2, -1.0), tl(3, -2.0)],
            },
            pb::PromptLogprob {
                position: 2,
                id: 2,
                logprob: -1.0,
                rank: 2,
                top: vec![tl(1, -0.5), tl(2, -1.0)],
            },
        ];
        let got = echo_positions(&[5, 7, 2], &entries, 2);
        assert_eq!(
            got,
            vec![
                Position {
                    id: 5,
                    scored: None
                },
                Position {
                    id: 7,
                    scored: Some((-3.0, vec![(7, -3.0), (1, -0.5), (2, -1.0)]))
                },
                Position {
                    id: 2,
                    scored: Some((-1.0, vec![(1, -0.5), (2, -1.0)]))
                },
            ]
        );
    }
}
