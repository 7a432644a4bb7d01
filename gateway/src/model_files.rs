//! [`ModelFiles`]: what the gateway reads from a model directory.
//!
//! - `tokenizer.json` (required).
//! - The chat template, first found of: `chat_template.jinja`, `chat_template.json`
//!   (`{"chat_template": ...}`), `tokenizer_config.json`'s `chat_template` (a string, or a list
//!   of `{name, template}` where `default` wins).
//! - `bos_token` / `eos_token` from `tokenizer_config.json` (string or `{"content": ...}`).
//! - EOS ids: `generation_config.json` `eos_token_id` (int or list) ∪ the tokenizer's EOS token;
//!   sampling defaults (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`) from the
//!   same file, used when a request leaves them unset (as vLLM does).
//! - Ids of `<think>`, `</think>`, `<image>` and the tokens of `"\n</think>\n\n"`; `<image>`
//!   and the think tokens the template writes must be single added tokens, `<image>` with
//!   `config.json`'s `image_token_index` ([`crate::special_tokens`]), or loading fails.
//! - The resampling filter from `preprocessor_config.json` (via `r4b-model`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use r4b_model::anyres::Resample;
use r4b_model::config::{ImagePreprocessing, RConfig};
use r4b_model::grammar::GrammarCompiler;
use serde_json::Value;

use crate::special_tokens::{self, CheckedToken};
use crate::startup::GatewayError;
use crate::template::ChatTemplate;
use crate::tokens::TextTokenizer;

/// Text appended by the thinking budget to close a think block.
const THINK_CLOSE_TEXT: &str = "\n</think>\n\n";

/// Special ids the stopping parameters need.
#[derive(Clone, Debug, Default)]
pub struct StopIds {
    /// EOS ids.
    pub eos: Vec<u32>,
    /// `<think>`.
    pub think_open: Option<u32>,
    /// `</think>`.
    pub think_close: Option<u32>,
    /// Tokens of `"\n</think>\n\n"`.
    pub think_close_ids: Vec<u32>,
}

/// Sampling defaults from `generation_config.json` (unset = OpenAI defaults).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    /// `temperature`.
    pub temperature: Option<f32>,
    /// `top_p`.
    pub top_p: Option<f32>,
    /// `top_k`.
    pub top_k: Option<u32>,
    /// `min_p`.
    pub min_p: Option<f32>,
    /// `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
}

/// Tokenizer, chat template and special ids of a model directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    dir: PathBuf,
    tokenizer: Arc<TextTokenizer>,
    template: Option<Arc<ChatTemplate>>,
    stop_ids: StopIds,
    image_token_id: Option<u32>,
    sampling_defaults: SamplingDefaults,
    resample: Resample,
    template_source: &'static str,
    special_tokens: Vec<CheckedToken>,
    /// llguidance over this tokenizer (structured output), or why it could not be built.
    grammars: Result<GrammarCompiler, String>,
}

fn file_error(path: &Path, reason: impl ToString) -> GatewayError {
    GatewayError::ModelFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, GatewayError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| file_error(path, format!("not valid JSON: {e}")))
}

/// A token given as a string or as an AddedToken object `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template's text and the file it came from.
fn template_source(
    dir: &Path,
    tokenizer_config: Option<&Value>,
) -> Result<Option<(&'static str, String)>, GatewayError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(|t| Some(("chat_template.jinja", t)))
            .map_err(|e| file_error(&jinja, e));
    }
    let json_path = dir.join("chat_template.json");
    if let Some(v) = read_json(&json_path)? {
        return match v.get("chat_template") {
            Some(Value::String(s)) => Ok(Some(("chat_template.json", s.clone()))),
            _ => Err(file_error(&json_path, "no string field `chat_template`")),
        };
    }
    let from_config = |t: String| ("tokenizer_config.json (chat_template)", t);
    Ok(
        match tokenizer_config.and_then(|c| c.get("chat_template")) {
            Some(Value::String(s)) => Some(from_config(s.clone())),
            Some(Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
                        .or_else(|| list.first())
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                named("default").map(from_config)
            }
            _ => None,
        },
    )
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .into_iter()
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect(),
        _ => Vec::new(),
    }
}

fn sampling_defaults(gen: Option<&Value>) -> SamplingDefaults {
    let f = |k: &str| {
        gen.and_then(|g| g.get(k))
            .and_then(Value::as_f64)
            .map(|x| x as f32)
    };
    SamplingDefaults {
        temperature: f("temperature"),
        top_p: f("top_p"),
        top_k: gen
            .and_then(|g| g.get("top_k"))
            .and_then(Value::as_u64)
            .and_then(|k| u32::try_from(k).ok()),
        min_p: f("min_p"),
        repetition_penalty: f("repetition_penalty"),
    }
}

impl ModelFiles {
    /// Loads the files of the model directory `dir`.
    pub fn load(dir: &Path) -> Result<Self, GatewayError> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer =
            Arc::new(TextTokenizer::from_file(&tok_path).map_err(|e| file_error(&tok_path, e))?);
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        let generation_config = read_json(&dir.join("generation_config.json"))?;

        let bos = token_string(tokenizer_config.as_ref().and_then(|c| c.get("bos_token")));
        let eos = token_string(tokenizer_config.as_ref().and_then(|c| c.get("eos_token")));
        let source = template_source(dir, tokenizer_config.as_ref())?;
        let template = source
            .as_ref()
            .map(|(_, src)| ChatTemplate::new(src, bos.clone(), eos.clone()).map(Arc::new))
            .transpose()
            .map_err(|e| GatewayError::Template(e.0))?;
        // The config's `<image>` id, when the directory has a config.json (the gateway alone may
        // run from tokenizer files only).
        let config_path = dir.join("config.json");
        let image_token_index = if config_path.exists() {
            Some(
                RConfig::from_dir(dir)
                    .map_err(|e| file_error(&config_path, e))?
                    .image_token_index,
            )
        } else {
            None
        };
        let special_tokens = special_tokens::check(
            &tokenizer,
            source.as_ref().map(|(_, t)| t.as_str()),
            image_token_index,
        )?;

        let mut eos_ids = ids_of(
            generation_config
                .as_ref()
                .and_then(|g| g.get("eos_token_id")),
        );
        if let Some(id) = eos.as_deref().and_then(|t| tokenizer.token_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let think_close_ids = tokenizer
            .encode(THINK_CLOSE_TEXT, false)
            .map_err(|e| file_error(&tok_path, e))?;
        let stop_ids = StopIds {
            eos: eos_ids,
            think_open: tokenizer.token_id("<think>"),
            think_close: tokenizer.token_id("</think>"),
            think_close_ids,
        };
        // Built once: compiling a request's grammar then only walks the token trie.
        let grammars = std::fs::read_to_string(&tok_path)
            .map_err(|e| e.to_string())
            .and_then(|t| GrammarCompiler::from_tokenizer_json(&t).map_err(|e| e.to_string()));
        let resample = ImagePreprocessing::from_dir(dir)
            .map_err(|e| file_error(&dir.join("preprocessor_config.json"), e))?
            .resample;
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
            image_token_id: special_tokens.first().map(|t| t.id),
            tokenizer,
            template,
            stop_ids,
            sampling_defaults: sampling_defaults(generation_config.as_ref()),
            resample,
            template_source: source.map_or("none", |(name, _)| name),
            special_tokens,
            grammars,
        })
    }

    /// The directory the files came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Arc<TextTokenizer> {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    /// EOS ids (generation config first, then the tokenizer's EOS token).
    pub fn eos_ids(&self) -> &[u32] {
        &self.stop_ids.eos
    }

    /// Tokens of `"\n</think>\n\n"`.
    pub fn think_close_ids(&self) -> &[u32] {
        &self.stop_ids.think_close_ids
    }

    /// EOS and think ids for the stopping parameters.
    pub fn stop_ids(&self) -> &StopIds {
        &self.stop_ids
    }

    /// Id of `<image>` in the tokenizer.
    pub fn image_token_id(&self) -> Option<u32> {
        self.image_token_id
    }

    /// Sampling defaults from `generation_config.json`.
    pub fn sampling_defaults(&self) -> &SamplingDefaults {
        &self.sampling_defaults
    }

    /// Resampling filter for anyres resizes.
    pub fn resample(&self) -> Resample {
        self.resample
    }

    /// The file the chat template came from (`none` without one).
    pub fn template_source(&self) -> &'static str {
        self.template_source
    }

    /// The llguidance compiler over the served tokenizer, or why there is none.
    pub fn grammars(&self) -> Result<&GrammarCompiler, &str> {
        self.grammars.as_ref().map_err(String::as_str)
    }

    /// `<image>` and the template's think tokens, checked at load ([`crate::special_tokens`]).
    pub fn special_tokens(&self) -> &[CheckedToken] {
        &self.special_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::embedded::write_tokenizer_files(dir.path()).expect("embedded files");
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).expect("rm");
        std::fs::remove_file(dir.path().join("generation_config.json")).expect("rm");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn template_sources_in_order() {
        let d = dir_with(&[
            ("chat_template.jinja", "J"),
            ("chat_template.json", r#"{"chat_template": "S"}"#),
        ]);
        let f = ModelFiles::load(d.path()).expect("load");
        assert_eq!(
            f.template()
                .expect("tpl")
                .render(&[], false, &Default::default())
                .expect("render"),
            "J"
        );
        let d = dir_with(&[
            ("chat_template.json", r#"{"chat_template": "S"}"#),
            ("tokenizer_config.json", r#"{"chat_template": "T"}"#),
        ]);
        let f = ModelFiles::load(d.path()).expect("load");
        assert_eq!(
            f.template()
                .expect("tpl")
                .render(&[], false, &Default::default())
                .expect("render"),
            "S"
        );
        let list = r#"{"chat_template": [{"name": "tool_use", "template": "U"}, {"name": "default", "template": "D"}]}"#;
        let d = dir_with(&[("tokenizer_config.json", list)]);
        let f = ModelFiles::load(d.path()).expect("load");
        assert_eq!(
            f.template()
                .expect("tpl")
                .render(&[], false, &Default::default())
                .expect("render"),
            "D"
        );
        let d = dir_with(&[]);
        assert!(ModelFiles::load(d.path())
            .expect("load")
            .template()
            .is_none());
    }

    #[test]
    fn eos_ids_union_and_defaults() {
        let d = dir_with(&[
            (
                "generation_config.json",
                r#"{"eos_token_id": 256, "temperature": 0.6, "top_k": 20, "top_p": 0.95}"#,
            ),
            (
                "tokenizer_config.json",
                r#"{"eos_token": {"content": "<|im_end|>", "special": true}}"#,
            ),
        ]);
        let f = ModelFiles::load(d.path()).expect("load");
        assert_eq!(f.eos_ids(), &[256, 258]);
        assert_eq!(f.sampling_defaults().temperature, Some(0.6));
        assert_eq!(f.sampling_defaults().top_k, Some(20));
        assert_eq!(f.stop_ids().think_open, Some(259));
        assert_eq!(f.image_token_id(), Some(261));
    }

    #[test]
    fn missing_tokenizer_is_a_named_error() {
        let d = tempfile::tempdir().expect("tempdir");
        match ModelFiles::load(d.path()) {
            Err(GatewayError::ModelFile { path, .. }) => assert!(path.ends_with("tokenizer.json")),
            other => panic!("expected ModelFile error, got {other:?}"),
        }
    }

    /// `<image>` is 261 in the embedded tokenizer and in the embedded config.json; any other
    /// config id stops the load, naming the token.
    #[test]
    fn image_token_must_have_the_config_id() {
        let d = dir_with(&[]);
        let mut cfg = r4b_model::embedded::config_json();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).expect("write");
        let f = ModelFiles::load(d.path()).expect("ids agree");
        assert_eq!(f.image_token_id(), Some(261));
        assert_eq!(f.template_source(), "none");
        cfg["image_token_index"] = 262.into();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).expect("write");
        match ModelFiles::load(d.path()) {
            Err(GatewayError::SpecialToken { token, reason }) => {
                assert_eq!(token, "<image>");
                assert!(reason.contains("262"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn bad_template_is_a_startup_error() {
        let d = dir_with(&[("chat_template.jinja", "{% for %}")]);
        assert!(matches!(
            ModelFiles::load(d.path()),
            Err(GatewayError::Template(_))
        ));
    }
}
