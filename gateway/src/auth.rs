//! API keys and the JSON content-type rule.
//!
//! [`check_request`] is one middleware: with API keys configured, every request except the open
//! probe paths (`/health`, `/ready`, `/metrics`, unless [`GatewayConfig::auth_probes`] is set)
//! must carry `Authorization: Bearer <key>` naming one of them, else 401. Keys are compared in
//! constant time: both sides are hashed with SHA-256 and the digests compared with `subtle`, so
//! neither the content nor the length of a key leaks through timing. Every POST must declare
//! `Content-Type: application/json` (parameters such as `charset` allowed), else 415: a browser
//! can send `text/plain` cross-site without a CORS preflight, JSON it cannot.
//!
//! [`GatewayConfig::auth_probes`]: crate::GatewayConfig::auth_probes

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;

/// Paths open without a key unless probes are authenticated too.
const PROBE_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

/// SHA-256 digests of the accepted keys.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// The accepted keys; empty strings are ignored. No keys: every request is accepted.
    pub fn new<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let digests = keys
            .into_iter()
            .filter(|k| !k.as_ref().is_empty())
            .map(|k| digest(k.as_ref()))
            .collect();
        ApiKeys { digests }
    }

    /// Whether any key is configured.
    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys; every key is compared, in constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented);
        let mut ok = subtle::Choice::from(0u8);
        for k in &self.digests {
            ok |= k.ct_eq(&d);
        }
        bool::from(ok)
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The bearer token of an `Authorization` header (scheme case-insensitive).
fn bearer(value: &HeaderValue) -> Option<&str> {
    let v = value.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Whether a `Content-Type` value names JSON (`application/json`, optionally with parameters).
fn is_json(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// An OpenAI-shaped error response.
fn error(status: StatusCode, message: &str, code: &str) -> Response {
    let body = json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": code,
    }});
    (status, Json(body)).into_response()
}

/// Middleware: API key (401) and JSON content type on POST (415).
pub async fn check_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let cfg = state.config();
    let path = req.uri().path();
    let open = !cfg.auth_probes && PROBE_PATHS.contains(&path);
    if cfg.api_keys.enabled() && !open {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(bearer)
            .is_some_and(|t| cfg.api_keys.accepts(t));
        if !ok {
            let mut resp = error(
                StatusCode::UNAUTHORIZED,
                "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                "invalid_api_key",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    if req.method() == Method::POST && !req.headers().get(header::CONTENT_TYPE).is_some_and(is_json)
    {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Request bodies must be JSON: send `Content-Type: application/json`.",
            "unsupported_media_type",
        );
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare() {
        let k = ApiKeys::new(["sk-one", "", "sk-two"]);
        assert!(k.enabled());
        assert!(k.accepts("sk-one"));
        assert!(k.accepts("sk-two"));
        assert!(!k.accepts("sk-on"));
        assert!(!k.accepts("sk-one "));
        assert!(!k.accepts(""));
        assert!(!ApiKeys::new([""]).enabled());
    }

    #[test]
    fn headers_parse() {
        let h = HeaderValue::from_static;
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("abc")), None);
        assert!(is_json(&h("application/json")));
        assert!(is_json(&h("Application/JSON; charset=utf-8")));
        assert!(!is_json(&h("text/plain")));
        assert!(!is_json(&h("application/x-www-form-urlencoded")));
        assert!(!is_json(&h("multipart/form-data; boundary=x")));
    }
}
