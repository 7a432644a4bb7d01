//! Start-up checks of the tokens the prompt path depends on, so that a tokenizer that does not
//! fit the model stops `serve` / `gateway` instead of failing every image request:
//!
//! - `<image>` must be one added token (the text `<image>` encodes to exactly its id), and that
//!   id must be `config.json`'s `image_token_index` (when the directory has a `config.json`);
//! - every think token the chat template writes (`<think>`, `</think>`) must be one added token.
//!
//! The errors name the token and the ids involved.

use crate::startup::GatewayError;
use crate::tokens::TextTokenizer;

/// The image placeholder.
pub const IMAGE: &str = "<image>";
/// Think tokens the template may write.
pub const THINK: [&str; 2] = ["<think>", "</think>"];

/// A checked token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedToken {
    /// The token text.
    pub token: &'static str,
    /// Its id.
    pub id: u32,
    /// Whether the tokenizer marks it special (skipped by `skip_special_tokens`).
    pub special: bool,
    /// Why it is needed.
    pub role: &'static str,
}

fn refuse(token: &str, reason: String) -> GatewayError {
    GatewayError::SpecialToken {
        token: token.to_string(),
        reason,
    }
}

/// `token` must be one added token that `token` (as text) encodes to.
fn single_added(tok: &TextTokenizer, token: &'static str) -> Result<(u32, bool), GatewayError> {
    let ids = tok
        .encode(token, false)
        .map_err(|e| refuse(token, format!("cannot be tokenized: {}", e.0)))?;
    let Some(id) = tok.added_token_id(token) else {
        return Err(refuse(
            token,
            format!(
                "is not an added token of tokenizer.json (the text tokenizes to {ids:?}); the \
                 prompt could not mark its positions"
            ),
        ));
    };
    if ids != [id] {
        return Err(refuse(
            token,
            format!("is added token {id}, but the text tokenizes to {ids:?}, not one token"),
        ));
    }
    Ok((id, tok.is_special(id)))
}

/// Runs the checks; `template` is the chat template's source, `image_token_index` the config's.
pub fn check(
    tok: &TextTokenizer,
    template: Option<&str>,
    image_token_index: Option<u32>,
) -> Result<Vec<CheckedToken>, GatewayError> {
    let (id, special) = single_added(tok, IMAGE)?;
    if let Some(want) = image_token_index {
        if id != want {
            return Err(refuse(
                IMAGE,
                format!(
                    "is token {id} in tokenizer.json, but config.json's image_token_index is \
                     {want}: image features would replace the wrong tokens"
                ),
            ));
        }
    }
    let mut out = vec![CheckedToken {
        token: IMAGE,
        id,
        special,
        role: "image placeholder (config image_token_index)",
    }];
    for token in THINK {
        if template.is_some_and(|t| t.contains(token)) {
            let (id, special) = single_added(tok, token)?;
            out.push(CheckedToken {
                token,
                id,
                special,
                role: "written by the chat template",
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded tokenizer (ids fixed by hand in `embedded.rs`): `<think>` 259,
    /// `</think>` 260, `<image>` 261.
    fn tok() -> TextTokenizer {
        TextTokenizer::new(crate::embedded::build_tokenizer().expect("tokenizer"))
    }

    #[test]
    fn embedded_tokens_pass_with_their_ids() {
        let got = check(&tok(), Some("{{ '<think>\n' }}</think>"), Some(261)).expect("ok");
        let ids: Vec<(&str, u32)> = got.iter().map(|t| (t.token, t.id)).collect();
        assert_eq!(
            ids,
            vec![("<image>", 261), ("<think>", 259), ("</think>", 260)]
        );
    }

    #[test]
    fn a_config_id_that_differs_is_refused() {
        match check(&tok(), None, Some(151_669)) {
            Err(GatewayError::SpecialToken { token, reason }) => {
                assert_eq!(token, "<image>");
                assert!(
                    reason.contains("261") && reason.contains("151669"),
                    "{reason}"
                );
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_tokenizer_without_the_added_token_is_refused() {
        // A byte-level tokenizer with no added tokens: `<image>` is seven byte tokens.
        let mut inner = crate::embedded::build_tokenizer().expect("tokenizer");
        let plain: tokenizers::Tokenizer = {
            let json = inner.to_string(false).expect("json");
            let mut v: serde_json::Value = serde_json::from_str(&json).expect("parse");
            v["added_tokens"] = serde_json::json!([]);
            v.to_string().parse().expect("tokenizer")
        };
        inner = plain;
        match check(&TextTokenizer::new(inner), None, Some(261)) {
            Err(GatewayError::SpecialToken { token, .. }) => assert_eq!(token, "<image>"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
