//! Error statuses and bodies, images, `/v1/completions`, models, health, readiness and metrics,
//! against a fake coordinator.

mod common;

use std::io::Cursor;

use base64::Engine;
use common::*;
use r4b_proto::v1 as pb;
use serde_json::{json, Value};

fn assert_error(r: &Reply, status: u16, param: Option<&str>, code: &str) -> Value {
    assert_eq!(r.status.as_u16(), status, "{}", r.text);
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert_eq!(e["param"].as_str(), param, "{v}");
    assert_eq!(e["code"], code, "{v}");
    v
}

async fn echo_gateway() -> TestGateway {
    gateway(|req| reply_text(req, "ok")).await
}

#[tokio::test]
async fn unknown_model_is_404() {
    let gw = echo_gateway().await;
    let mut body = chat_body("x");
    body["model"] = json!("gpt-4");
    let r = gw.post("/v1/chat/completions", body).await;
    let v = assert_error(&r, 404, Some("model"), "model_not_found");
    assert!(v["error"]["message"]
        .as_str()
        .expect("message")
        .contains("gpt-4"));
    assert!(gw.seen().is_empty());
}

#[tokio::test]
async fn bad_bodies_are_400_with_the_field_named() {
    let gw = echo_gateway().await;
    let r = gw
        .post_raw("/v1/chat/completions", r#"{"model": "r4b", "messages": ["#)
        .await;
    assert_error(&r, 400, None, "invalid_json");
    let r = gw
        .post("/v1/chat/completions", json!({"model": "r4b"}))
        .await;
    assert_error(&r, 400, Some("messages"), "missing_required_parameter");
    let mut body = chat_body("x");
    body["temperature"] = json!("hot");
    assert_error(
        &gw.post("/v1/chat/completions", body).await,
        400,
        Some("temperature"),
        "invalid_json",
    );
    let body = json!({"model": "r4b", "messages": "hello"});
    assert_error(
        &gw.post("/v1/chat/completions", body).await,
        400,
        Some("messages"),
        "invalid_json",
    );
    let mut body = chat_body("x");
    body["max_tokens"] = json!(0);
    let r = gw.post("/v1/chat/completions", body).await;
    let v = assert_error(&r, 400, Some("max_tokens"), "invalid_value");
    assert!(v["error"]["message"]
        .as_str()
        .expect("message")
        .contains("got 0"));
    let mut body = chat_body("x");
    body["top_p"] = json!(0);
    assert_error(
        &gw.post("/v1/chat/completions", body).await,
        400,
        Some("top_p"),
        "invalid_value",
    );
    let mut body = chat_body("x");
    body["chat_template_kwargs"] = json!({"thinking_mode": "sometimes"});
    assert_error(
        &gw.post("/v1/chat/completions", body).await,
        400,
        Some("chat_template_kwargs.thinking_mode"),
        "invalid_value",
    );
    assert!(gw.seen().is_empty(), "nothing reaches the coordinator");
}

#[tokio::test]
async fn too_long_prompts_are_400_like_vllm() {
    let gw = echo_gateway().await;
    let r = gw
        .post("/v1/chat/completions", chat_body(&"a".repeat(300)))
        .await;
    assert_error(&r, 400, Some("messages"), "context_length_exceeded");
    let mut body = chat_body("Hi");
    body["max_tokens"] = json!(190);
    let r = gw.post("/v1/chat/completions", body).await;
    let v = assert_error(&r, 400, Some("messages"), "context_length_exceeded");
    assert_eq!(
        v["error"]["message"],
        "This model's maximum context length is 200 tokens. However, you requested 211 tokens \
         (21 in the messages, 190 in the completion). Please reduce the length of the messages or completion."
    );
}

#[tokio::test]
async fn body_over_the_limit_is_413_json() {
    let mut opts = Options::default();
    opts.config.body_limit_bytes = 2048;
    let gw = gateway_with(|req| reply_text(req, "ok"), opts).await;
    let r = gw
        .post("/v1/chat/completions", chat_body(&"y".repeat(5000)))
        .await;
    assert_error(&r, 413, None, "request_too_large");
}

#[tokio::test]
async fn queue_full_is_429_with_retry_after() {
    let gw = gateway(|_| {
        let mut s = tonic::Status::resource_exhausted("queue full");
        s.metadata_mut()
            .insert("retry-after", "3".parse().expect("ascii"));
        Script::Refuse(s)
    })
    .await;
    for stream in [false, true] {
        let mut body = chat_body("x");
        body["stream"] = json!(stream);
        let r = gw.post("/v1/chat/completions", body).await;
        assert_error(&r, 429, None, "rate_limit_exceeded");
        assert_eq!(r.headers["retry-after"], "3");
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    }
}

#[tokio::test]
async fn coordinator_statuses_map_to_http() {
    let gw = gateway(|req| {
        if req.prompt_ids.contains(&u32::from(b'U')) {
            Script::Refuse(tonic::Status::unavailable("not ready"))
        } else if req.prompt_ids.contains(&u32::from(b'I')) {
            Script::Refuse(tonic::Status::invalid_argument("prompt has bad ids"))
        } else {
            Script::Refuse(tonic::Status::data_loss("secret detail"))
        }
    })
    .await;
    assert_error(
        &gw.post("/v1/chat/completions", chat_body("U")).await,
        503,
        None,
        "service_unavailable",
    );
    let r = gw.post("/v1/chat/completions", chat_body("I")).await;
    let v = assert_error(&r, 400, None, "invalid_value");
    assert_eq!(v["error"]["message"], "prompt has bad ids");
    let r = gw.post("/v1/chat/completions", chat_body("z")).await;
    assert_error(&r, 500, None, "internal_error");
    assert!(!r.text.contains("secret detail"));
}

#[tokio::test]
async fn unknown_route_is_404_json() {
    let gw = echo_gateway().await;
    let r = gw.get("/v2/nothing").await;
    assert_error(&r, 404, None, "not_found");
}

fn image_body(url: &str) -> Value {
    json!({"model": "r4b", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]})
}

#[tokio::test]
async fn data_uri_image_is_preprocessed_and_expanded() {
    let gw = echo_gateway().await;
    let r = gw
        .post("/v1/chat/completions", image_body(&png_data_uri(28, 28)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let req = &gw.seen()[0];
    // `<|im_start|>user <image>\nWhat?<|im_end|><|im_start|>assistant\n`; a 28x28 image on 28-pixel
    // tiles is 1 base view + 1 tile, 2x2 features per view: 4 + 2*2 + 2 newlines = 10 tokens.
    let mut expected = vec![257];
    expected.extend(ids("user "));
    expected.extend([IMAGE; 10]);
    expected.extend(ids("\nWhat?"));
    expected.extend([EOS, 257]);
    expected.extend(ids("assistant\n"));
    assert_eq!(req.prompt_ids, expected);
    assert_eq!(req.images.len(), 1);
    let img = &req.images[0];
    assert_eq!(
        (img.views, img.tile, img.height, img.width, img.num_tokens),
        (2, 28, 28, 28, 10)
    );
    assert_eq!(img.views_u8.len(), 2 * 3 * 28 * 28);
    assert_eq!(img.digest.len(), 32);
}

#[tokio::test]
async fn several_images_in_order() {
    let gw = echo_gateway().await;
    let body = json!({"model": "r4b", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": png_data_uri(28, 28)}, {"type": "text", "text": "a"}]},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri(56, 28)}}, {"type": "text", "text": "c"}]},
    ]});
    let r = gw.post("/v1/chat/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let req = &gw.seen()[0];
    let tokens: Vec<u32> = req.images.iter().map(|i| i.num_tokens).collect();
    assert_eq!(tokens, vec![10, 14]);
    assert_eq!(req.images[1].width, 56);
    assert_eq!(req.prompt_ids.iter().filter(|&&t| t == IMAGE).count(), 24);
}

#[tokio::test]
async fn bad_images_are_400() {
    let gw = echo_gateway().await;
    let garbage = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"not an image at all")
    );
    let r = gw.post("/v1/chat/completions", image_body(&garbage)).await;
    let v = assert_error(
        &r,
        400,
        Some("messages[0].content[1].image_url"),
        "invalid_image",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("cannot decode"),
        "{v}"
    );

    let r = gw
        .post(
            "/v1/chat/completions",
            image_body("http://127.0.0.1:9/cat.png"),
        )
        .await;
    let v = assert_error(
        &r,
        400,
        Some("messages[0].content[1].image_url"),
        "invalid_image",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("http://127.0.0.1:9/cat.png"),
        "{v}"
    );

    let r = gw
        .post("/v1/chat/completions", image_body("file:///etc/passwd"))
        .await;
    assert_error(
        &r,
        400,
        Some("messages[0].content[1].image_url"),
        "invalid_image",
    );

    assert!(gw.seen().is_empty());
    // A literal `<image>` in the text is text (only the template places `<image>` tokens).
    let r = gw
        .post("/v1/chat/completions", chat_body("look: <image>"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(gw.seen()[0].prompt_ids, user_prompt_ids("look: <image>"));
}

/// A black 28×28 PNG.
fn black_png_28() -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image::RgbImage::new(28, 28)
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

#[tokio::test]
async fn private_urls_are_fetched_when_allowed() {
    let png = black_png_28();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/cat.png",
        axum::routing::get(move || async move { png.clone() }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut opts = Options::default();
    opts.config.allow_private_image_urls = true;
    let gw = gateway_with(|req| reply_text(req, "a cat"), opts).await;
    let r = gw
        .post(
            "/v1/chat/completions",
            image_body(&format!("http://{addr}/cat.png")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(gw.seen()[0].images[0].num_tokens, 10);
    let r = gw
        .post(
            "/v1/chat/completions",
            image_body(&format!("http://{addr}/missing.png")),
        )
        .await;
    let v = assert_error(
        &r,
        400,
        Some("messages[0].content[1].image_url"),
        "invalid_image",
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .expect("message")
            .contains("404"),
        "{v}"
    );
}

#[tokio::test]
async fn completions_with_text_and_token_prompts() {
    let gw = gateway(|req| {
        let mut t = vec![THINK];
        t.extend(ids("x"));
        t.push(UNTHINK);
        t.extend(ids("y"));
        t.push(EOS);
        reply_ids(req, &t, pb::FinishReason::Stop, std::time::Duration::ZERO)
    })
    .await;
    let r = gw
        .post(
            "/v1/completions",
            json!({"model": "r4b", "prompt": "Say hi", "max_tokens": 10}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"], "<think>x</think>y",
        "completions keep the raw text"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(gw.seen()[0].prompt_ids, ids("Say hi"));

    let r = gw
        .post(
            "/v1/completions",
            json!({"prompt": [72, 105], "logprobs": 1}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let lp = &r.json()["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"],
        json!(["<think>", "x", "</think>", "y", "<|im_end|>"])
    );
    assert_eq!(lp["text_offset"], json!([0, 7, 8, 16, 17]));
    assert_eq!(lp["token_logprobs"][0], -0.5);
    assert_eq!(lp["top_logprobs"][1], json!({"x": -0.5, "?": -2.0}));
    assert_eq!(gw.seen()[1].prompt_ids, vec![72, 105]);
    assert!(
        !gw.seen()[1]
            .stopping
            .clone()
            .expect("stopping")
            .think_open_in_prompt
    );

    assert_error(
        &gw.post("/v1/completions", json!({"model": "r4b"})).await,
        400,
        Some("prompt"),
        "missing_required_parameter",
    );
    assert_error(
        &gw.post("/v1/completions", json!({"prompt": [1, -2]})).await,
        400,
        Some("prompt"),
        "invalid_value",
    );
    assert_error(
        &gw.post("/v1/completions", json!({"prompt": ""})).await,
        400,
        Some("prompt"),
        "invalid_value",
    );
}

#[tokio::test]
async fn streamed_completion() {
    let gw = gateway(|req| reply_text(req, "abc")).await;
    let body = json!({"prompt": "go", "stream": true, "stream_options": {"include_usage": true}});
    let r = gw.post("/v1/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events = r.sse_data();
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
        .collect();
    assert_eq!(text, "abc");
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn models_health_and_metrics() {
    let gw = echo_gateway().await;
    let v = gw.get("/v1/models").await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "r4b");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["max_model_len"], MAX_MODEL_LEN);
    assert_eq!(gw.get("/v1/models/r4b").await.status, 200);
    assert_error(
        &gw.get("/v1/models/other").await,
        404,
        Some("model"),
        "model_not_found",
    );
    assert_eq!(gw.get("/health").await.status, 200);
    let ready = gw.get("/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text);

    assert_eq!(
        gw.post("/v1/chat/completions", chat_body("Hi"))
            .await
            .status,
        200
    );
    let m = gw.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.headers["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/plain"));
    for line in [
        "r4b_gateway_http_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 1",
        "vllm:prompt_tokens_total{model_name=\"r4b\"} 21",
        "vllm:generation_tokens_total{model_name=\"r4b\"} 3",
        "vllm:e2e_request_latency_seconds_count{model_name=\"r4b\"} 1",
        "vllm:time_to_first_token_seconds_count{model_name=\"r4b\"} 1",
        "gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"r4b\",model_name=\"r4b\"} 1",
        "vllm:inter_token_latency_seconds_count{model_name=\"r4b\"} 2",
        "vllm:request_success_total{finished_reason=\"stop\",model_name=\"r4b\"} 1",
        "r4b_gateway_requests_running{model_name=\"r4b\"} 0",
    ] {
        assert!(
            m.text.lines().any(|l| l == line),
            "missing `{line}` in\n{}",
            m.text
        );
    }
    // The replica's Load as the gateway sees it, per replica; the engine's own gauges
    // (vllm:num_requests_waiting, KV usage) are the coordinators' to export.
    for prefix in [
        "r4b_replica_requests_waiting{replica=",
        "r4b_replica_kv_blocks_used{replica=",
        "r4b_replica_up{replica=",
    ] {
        assert!(
            m.text.lines().any(|l| l.starts_with(prefix)),
            "missing {prefix} in\n{}",
            m.text
        );
    }
    assert!(!m.text.contains("vllm:num_requests_waiting"), "{}", m.text);
}

#[tokio::test]
async fn not_ready_replica_makes_ready_503() {
    let opts = Options {
        ready: false,
        ..Options::default()
    };
    let gw = gateway_with(|req| reply_text(req, "x"), opts).await;
    let r = gw.get("/ready").await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.json()["replicas"][0]["detail"], "warming up");
    assert_eq!(gw.get("/health").await.status, 200);
}

/// Image URLs that name this host in any spelling (loopback, unspecified, IPv4-mapped,
/// IPv4-compatible, 6to4, NAT64, numeric forms) get a 400 and are never dialled: listeners on
/// that port, IPv4 and IPv6, see no connection.
#[tokio::test]
async fn internal_image_urls_are_refused_without_a_connection() {
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind v4");
    let port = v4.local_addr().expect("addr").port();
    let v6 = std::net::TcpListener::bind(("::1", port)).ok();
    v4.set_nonblocking(true).expect("nonblocking");
    if let Some(l) = &v6 {
        l.set_nonblocking(true).expect("nonblocking");
    }
    let gw = echo_gateway().await;
    let hosts = [
        "127.0.0.1",
        "localhost",
        "127.1",
        "2130706433",
        "0x7f.0.0.1",
        "0.0.0.0",
        "[::1]",
        "[::]",
        "[::ffff:127.0.0.1]",
        "[::7f00:1]",
        "[2002:7f00:1::]",
        "[64:ff9b::7f00:1]",
        "[64:ff9b:1::7f00:1]",
        "[2001:0:7f00:1::]",
    ];
    for host in hosts {
        let url = format!("http://{host}:{port}/cat.png");
        let r = gw.post("/v1/chat/completions", image_body(&url)).await;
        assert_eq!(r.status.as_u16(), 400, "{url}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_image", "{url}");
    }
    let dialled = |l: &std::net::TcpListener| match l.accept() {
        Ok((_, peer)) => Some(peer),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    };
    assert_eq!(dialled(&v4), None, "a refused URL was dialled (IPv4)");
    if let Some(l) = &v6 {
        assert_eq!(dialled(l), None, "a refused URL was dialled (IPv6)");
    }
    assert!(gw.seen().is_empty());
}

/// Redirects are checked hop by hop: an allowed first hop (an operator's media host on
/// loopback) that redirects to this host in an internal spelling gets a 400, and listeners on
/// the redirect target's port, IPv4 and IPv6, see no connection; a redirect to the allowed host
/// itself is followed.
#[tokio::test]
async fn redirects_to_internal_addresses_are_refused_without_a_connection() {
    let target_v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind v4");
    let port = target_v4.local_addr().expect("addr").port();
    let target_v6 = std::net::TcpListener::bind(("::1", port)).ok();
    target_v4.set_nonblocking(true).expect("nonblocking");
    if let Some(l) = &target_v6 {
        l.set_nonblocking(true).expect("nonblocking");
    }
    let png = black_png_28();
    // The redirector: /to?u=URL answers 302 to URL; /cat.png serves an image.
    let redirector = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let first = redirector.local_addr().expect("addr");
    let app = axum::Router::new()
        .route(
            "/to",
            axum::routing::get(
                |q: axum::extract::Query<std::collections::HashMap<String, String>>| async move {
                    let to = q.get("u").cloned().unwrap_or_default();
                    (
                        axum::http::StatusCode::FOUND,
                        [(axum::http::header::LOCATION, to)],
                    )
                },
            ),
        )
        .route(
            "/cat.png",
            axum::routing::get(move || async move { png.clone() }),
        );
    tokio::spawn(async move { axum::serve(redirector, app).await });

    let mut opts = Options::default();
    opts.config.allowed_media_hosts = vec![first.to_string()];
    let gw = gateway_with(|req| reply_text(req, "a cat"), opts).await;
    let via = |to: &str| {
        let mut u = reqwest::Url::parse(&format!("http://{first}/to")).expect("url");
        u.query_pairs_mut().append_pair("u", to);
        u.to_string()
    };
    // The control: the allowed host redirecting to itself is fetched.
    let r = gw
        .post(
            "/v1/chat/completions",
            image_body(&via(&format!("http://{first}/cat.png"))),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for host in [
        "[::7f00:1]",
        "[2002:7f00:1::]",
        "[64:ff9b::7f00:1]",
        "127.0.0.1",
        "localhost",
        "[::1]",
    ] {
        let url = via(&format!("http://{host}:{port}/cat.png"));
        let r = gw.post("/v1/chat/completions", image_body(&url)).await;
        assert_eq!(r.status.as_u16(), 400, "{host}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_image", "{host}");
    }
    let dialled = |l: &std::net::TcpListener| match l.accept() {
        Ok((_, peer)) => Some(peer),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    };
    assert_eq!(
        dialled(&target_v4),
        None,
        "a redirect target was dialled (IPv4)"
    );
    if let Some(l) = &target_v6 {
        assert_eq!(dialled(l), None, "a redirect target was dialled (IPv6)");
    }
    assert_eq!(
        gw.seen().len(),
        1,
        "only the control request reached the coordinator"
    );
}
