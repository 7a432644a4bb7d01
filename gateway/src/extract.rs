//! The JSON body extractor: every body problem becomes an OpenAI-style [`ApiError`].
//!
//! Malformed JSON, a non-object body and fields of the wrong type are 400s naming the field (via
//! `serde_path_to_error`); a body over the limit is 413. A literal `"extra_body": {...}` object
//! (what the OpenAI Python client's `extra_body=` argument becomes when the request is written by
//! hand, e.g. in curl) is merged into the top level: its keys fill fields the top level does not
//! set, and its `chat_template_kwargs` merge with the top-level ones (top level wins).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::state::AppState;

/// Bodies at least this large are parsed off the async runtime.
const BLOCKING_PARSE_BYTES: usize = 256 << 10;

/// A request body parsed as a JSON object, `extra_body` merged.
#[derive(Clone, Debug)]
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config().body_limit_bytes;
        let timeout = state.config().body_read_timeout;
        let read = tokio::time::timeout(timeout, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| ApiError::BodyTimeout(timeout.as_secs()))?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::BadJson {
                        message: rejection.body_text(),
                        param: None,
                    }
                }
            })?;
        if bytes.len() >= crate::trim::LARGE_REQUEST_BYTES {
            crate::trim::after_large_request();
        }
        if bytes.len() < BLOCKING_PARSE_BYTES {
            return parse_body(&bytes).map(JsonBody);
        }
        // A large body is parsed on the blocking pool, so it cannot stall other requests.
        tokio::task::spawn_blocking(move || parse_body(&bytes))
            .await
            .map_err(|e| ApiError::Internal(format!("parsing task failed: {e}")))?
            .map(JsonBody)
    }
}

impl JsonBody {
    /// Deserialises the fields of `T` from the body; a wrong type names the field.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_path_to_error::deserialize(&self.0).map_err(|e| {
            let path = e.path().to_string();
            let param = (path != ".").then_some(path);
            let message = match &param {
                Some(p) => format!("Invalid value for `{p}`: {}", e.inner()),
                None => format!("Invalid request body: {}", e.inner()),
            };
            ApiError::BadJson { message, param }
        })
    }
}

/// Parses `bytes` as a JSON object and merges `extra_body`.
pub fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::BadJson {
        message: format!("Invalid JSON body: {e}"),
        param: None,
    })?;
    let Value::Object(mut obj) = value else {
        return Err(ApiError::BadJson {
            message: "The request body must be a JSON object.".into(),
            param: None,
        });
    };
    merge_extra_body(&mut obj)?;
    Ok(Value::Object(obj))
}

fn merge_extra_body(obj: &mut Map<String, Value>) -> Result<(), ApiError> {
    let extra = match obj.remove("extra_body") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(extra)) => extra,
        Some(_) => {
            return Err(ApiError::BadJson {
                message: "Invalid value for `extra_body`: expected an object".into(),
                param: Some("extra_body".into()),
            })
        }
    };
    for (key, value) in extra {
        match (obj.get_mut(&key), value) {
            (Some(Value::Object(top)), Value::Object(inner)) if key == "chat_template_kwargs" => {
                for (k, v) in inner {
                    top.entry(k).or_insert(v);
                }
            }
            (Some(existing), value) if existing.is_null() => *existing = value,
            (Some(_), _) => {}
            (None, value) => {
                obj.insert(key, value);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn malformed_json_and_non_objects() {
        assert!(matches!(
            parse_body(b"{\"model\": "),
            Err(ApiError::BadJson { param: None, .. })
        ));
        assert!(matches!(
            parse_body(b"[1, 2]"),
            Err(ApiError::BadJson { .. })
        ));
        assert!(matches!(parse_body(b""), Err(ApiError::BadJson { .. })));
    }

    #[test]
    fn extra_body_merges_under_top_level() {
        let body = json!({
            "temperature": 0.5,
            "chat_template_kwargs": {"a": 1},
            "extra_body": {"chat_template_kwargs": {"thinking_mode": "long", "a": 2}, "top_k": 5, "temperature": 1.5},
        });
        let v = parse_body(body.to_string().as_bytes()).expect("parse");
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["top_k"], 5);
        assert_eq!(
            v["chat_template_kwargs"],
            json!({"a": 1, "thinking_mode": "long"})
        );
        assert!(v.get("extra_body").is_none());
    }

    #[test]
    fn extra_body_alone_provides_kwargs() {
        let body = json!({"extra_body": {"chat_template_kwargs": {"thinking_mode": "short"}}});
        let v = parse_body(body.to_string().as_bytes()).expect("parse");
        assert_eq!(v["chat_template_kwargs"]["thinking_mode"], "short");
        let bad = json!({"extra_body": 3});
        assert!(
            matches!(parse_body(bad.to_string().as_bytes()), Err(ApiError::BadJson { param: Some(p), .. }) if p == "extra_body")
        );
    }

    #[test]
    fn wrong_type_names_the_field() {
        let body = JsonBody(json!({"temperature": "hot", "messages": []}));
        match body.parse::<crate::api::CommonParams>() {
            Err(ApiError::BadJson {
                param: Some(p),
                message,
            }) => {
                assert_eq!(p, "temperature");
                assert!(message.contains("temperature"), "{message}");
            }
            other => panic!("expected BadJson, got {other:?}"),
        }
        let body = JsonBody(json!({"messages": [{"content": "x"}]}));
        match body.parse::<crate::api::ChatBody>() {
            Err(ApiError::BadJson {
                param: Some(p),
                message,
            }) => {
                assert_eq!(p, "messages[0]");
                assert!(message.contains("role"), "{message}");
            }
            other => panic!("expected BadJson, got {other:?}"),
        }
    }
}
