//! `POST /tokenize` and `POST /detokenize`, shaped like vLLM's.
//!
//! `/tokenize` takes a chat body (`messages`, rendered exactly as `/v1/chat/completions` renders
//! it, through [`prompt::render_chat`], `thinking_mode` included) or a completion body (`prompt`,
//! a string). Images in a chat body are fetched and preprocessed as in chat, so each `<image>`
//! is expanded to the token count the coordinator would see. The answer carries the ids, their
//! count and the context length (no length check, as in vLLM: `count` may exceed
//! `max_model_len`), each token's vocabulary string on request (`return_token_strs`), and the r4b
//! extension `prompt`: the text that was tokenized. `/detokenize` decodes ids with special tokens
//! kept, so `/tokenize`'s `tokens` decode back to its `prompt` (unless images were expanded or
//! the post-processor added tokens).
//!
//! `GET /tokenizer_info` answers as vLLM's: the checkpoint's `tokenizer_config.json` (so clients
//! such as lm-eval and guidellm take the server's tokenizer), with `tokenizer_class` always set
//! and `model_max_length` filled in with the served context when the file has none.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use crate::api::{DetokenizeBody, DetokenizeResponse, TokenizeBody, TokenizeResponse};
use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::prompt;
use crate::state::AppState;
use crate::validate::ValidationError;

/// The tokenizer routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/tokenizer_info", get(tokenizer_info))
}

async fn tokenizer_info(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let path = state.files().dir().join("tokenizer_config.json");
    let mut info = match tokio::fs::read(&path).await {
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => map,
            _ => {
                return Err(ApiError::Internal(format!(
                    "{} is not a JSON object",
                    path.display()
                )))
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Map::new(),
        Err(e) => return Err(ApiError::Internal(format!("{}: {e}", path.display()))),
    };
    info.entry("tokenizer_class")
        .or_insert_with(|| Value::from("PreTrainedTokenizerFast"));
    info.entry("model_max_length")
        .or_insert_with(|| Value::from(state.max_model_len()));
    Ok(Json(Value::Object(info)))
}

async fn tokenize(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let req: TokenizeBody = body.parse()?;
    crate::models::check_model(req.model.as_deref(), &state.config().served_model_name)?;
    let return_token_strs = req.return_token_strs.unwrap_or(false);
    let (text, tokens) = text_and_ids(&state, req).await?;
    let token_strs = return_token_strs.then(|| {
        let tok = state.files().tokenizer();
        tokens.iter().map(|&id| tok.token_piece(id)).collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_model_len(),
        tokens,
        token_strs,
        prompt: text,
    }))
}

/// The text to tokenize and its ids: the rendered chat template (images expanded) or the prompt.
async fn text_and_ids(state: &AppState, req: TokenizeBody) -> Result<(String, Vec<u32>), ApiError> {
    match (req.messages, req.prompt) {
        (Some(messages), None) => {
            let kwargs = req.chat_template_kwargs;
            let generation = req.add_generation_prompt.unwrap_or(true);
            let special = req.add_special_tokens.unwrap_or(false);
            let tools = crate::tools::ToolRequest::parse(req.tools.as_ref(), None, None)?
                .map(|t| t.tools)
                .unwrap_or_default();
            let chat = prompt::off_runtime(state, move |state| {
                let messages = Some(messages);
                prompt::render_chat(state, messages, tools, kwargs, generation, special, false)
            })
            .await?;
            let images = state.images().load_all(&chat.images).await?;
            let ids = prompt::expand_images(state, chat.ids, &images)?;
            Ok((chat.text, ids))
        }
        (None, Some(text)) => {
            let special = req.add_special_tokens.unwrap_or(true);
            prompt::off_runtime(state, move |state| {
                let ids = prompt::tokenize(state, &text, special)?;
                Ok((text, ids))
            })
            .await
        }
        (Some(_), Some(_)) => Err(ValidationError::Invalid {
            field: "prompt".into(),
            reason:
                "give either `messages` (a chat body) or `prompt` (a completion body), not both"
                    .into(),
        }
        .into()),
        (None, None) => Err(ValidationError::Invalid {
            field: "messages".into(),
            reason: "required for a chat body; send `prompt` instead for a completion body".into(),
        }
        .into()),
    }
}

async fn detokenize(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let req: DetokenizeBody = body.parse()?;
    crate::models::check_model(req.model.as_deref(), &state.config().served_model_name)?;
    let raw = req.tokens.ok_or_else(|| ValidationError::Missing {
        field: "tokens".into(),
    })?;
    let ids = raw
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t).map_err(|_| ValidationError::OutOfRange {
                field: format!("tokens[{i}]"),
                bound: format!("a token id in [0, {}]", u32::MAX),
                value: t.to_string(),
            })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = state
        .files()
        .tokenizer()
        .decode(&ids, false)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
