//! Which tensor is the LM head: the one decision both backends (CPU `model`, GPU
//! `gpu::models::r4b::qwen3`) read, so they cannot disagree.
//!
//! `tie_word_embeddings` is resolved as transformers does ([`RConfig::tie_word_embeddings`]).
//! Then, with `lm_head.weight` stored or not:
//!
//! | tie | `lm_head.weight` | head | references |
//! |---|---|---|---|
//! | false | stored | `lm_head.weight` | HF, vLLM agree |
//! | false | absent | refused | HF would initialise a random head |
//! | true | absent | `embed_tokens` | HF, vLLM agree (what `save_pretrained` writes when tied) |
//! | true | stored, same bytes as `embed_tokens` | `embed_tokens` | same values either way |
//! | true | stored, different | refused | transformers 5.17 keeps the stored head (it warns; `tests/fixtures/variants/tied-stored-head/hf.json`), vLLM and transformers 4 use `embed_tokens`: any choice differs from one of them |

use crate::checkpoint::Checkpoint;
use crate::config::RConfig;
use crate::{Error, Result};

/// Canonical name of a stored head.
pub const LM_HEAD: &str = "lm_head.weight";
/// Canonical name of the token embedding.
pub const EMBED_TOKENS: &str = "model.language_model.embed_tokens.weight";

/// Where the LM head's weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadSource {
    /// The stored `lm_head.weight`.
    LmHead,
    /// Tied: `model.language_model.embed_tokens.weight`.
    TiedEmbedding,
}

impl HeadSource {
    /// The canonical tensor name the head is loaded from.
    pub fn tensor(self) -> &'static str {
        match self {
            HeadSource::LmHead => LM_HEAD,
            HeadSource::TiedEmbedding => EMBED_TOKENS,
        }
    }
}

/// Decides the head per the table in the module docs; a refusal names `tie_word_embeddings`.
pub fn head_source(cfg: &RConfig, ckpt: &Checkpoint) -> Result<HeadSource> {
    let stored = ckpt.contains(LM_HEAD);
    let source = cfg
        .provenance_of("tie_word_embeddings")
        .map_or_else(String::new, |r| format!(" ({})", r.source));
    match (cfg.tie_word_embeddings, stored) {
        (false, true) => Ok(HeadSource::LmHead),
        (false, false) => Err(Error::Config {
            field: "tie_word_embeddings".into(),
            reason: format!(
                "false{source}, but the checkpoint has no lm_head.weight: transformers would \
                 initialise a random head"
            ),
        }),
        (true, false) => Ok(HeadSource::TiedEmbedding),
        (true, true) => {
            if ckpt.same_tensor(LM_HEAD, EMBED_TOKENS)? {
                Ok(HeadSource::TiedEmbedding)
            } else {
                Err(Error::Config {
                    field: "tie_word_embeddings".into(),
                    reason: format!(
                        "true{source}, but the checkpoint also stores an lm_head.weight that \
                         differs from embed_tokens: transformers 5 keeps the stored head, vLLM and \
                         transformers 4 use embed_tokens. Set tie_word_embeddings to false (top \
                         level and text_config) to serve the stored head, or drop lm_head.weight \
                         to serve the tied one"
                    ),
                })
            }
        }
    }
}
