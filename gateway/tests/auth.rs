//! API keys (401 in OpenAI's error shape, open probes) and the JSON content-type rule (415),
//! against a fake coordinator.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::*;
use r4b_gateway::auth::ApiKeys;

const CHAT: &str = r#"{"model":"r4b","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;

async fn keyed(auth_probes: bool) -> TestGateway {
    let mut opts = Options::default();
    opts.config.api_keys = ApiKeys::new(["sk-alpha", "sk-beta"]);
    opts.config.auth_probes = auth_probes;
    gateway_with(|req| reply_text(req, "ok"), opts).await
}

fn post(auth: Option<&str>, content_type: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/v1/chat/completions");
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    if let Some(c) = content_type {
        b = b.header("content-type", c);
    }
    b.body(Body::from(CHAT)).expect("request")
}

fn get(path: &str, auth: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Body::empty()).expect("request")
}

fn assert_openai_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    let v = r.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"].get("param").is_some(), "{v}");
}

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let gw = keyed(false).await;
    let json = Some("application/json");
    for auth in [
        None,
        Some("Bearer sk-gamma"),
        Some("Bearer sk-alph"),
        Some("Bearer "),
        Some("Basic sk-alpha"),
        Some("sk-alpha"),
    ] {
        let r = gw.send(post(auth, json)).await;
        assert_openai_error(&r, 401, "invalid_api_key");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    assert_eq!(gw.fake.seen.lock().expect("lock").len(), 0);
    for auth in ["Bearer sk-alpha", "bearer sk-beta"] {
        let r = gw.send(post(Some(auth), json)).await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    }
    // Every route behind the key, probes open.
    for path in ["/v1/models", "/tokenize"] {
        assert_eq!(
            gw.send(get(path, None)).await.status.as_u16(),
            401,
            "{path}"
        );
    }
    for path in ["/health", "/ready", "/metrics"] {
        assert_ne!(
            gw.send(get(path, None)).await.status.as_u16(),
            401,
            "{path}"
        );
    }
}

#[tokio::test]
async fn probes_can_require_the_key() {
    let gw = keyed(true).await;
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            gw.send(get(path, None)).await.status.as_u16(),
            401,
            "{path}"
        );
        let r = gw.send(get(path, Some("Bearer sk-beta"))).await;
        assert_eq!(r.status.as_u16(), 200, "{path}: {}", r.text);
    }
}

#[tokio::test]
async fn non_json_content_type_is_415() {
    let gw = gateway(|req| reply_text(req, "ok")).await;
    for ct in [
        None,
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let r = gw.send(post(None, ct)).await;
        assert_openai_error(&r, 415, "unsupported_media_type");
    }
    assert_eq!(gw.fake.seen.lock().expect("lock").len(), 0);
    let r = gw
        .send(post(None, Some("application/json; charset=utf-8")))
        .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
}
