//! Bad input against the real `r4b serve`: every case answers with the right status and an
//! OpenAI error object, never a panic or a hang; a full queue answers 429 with Retry-After.

mod common;

use common::*;
use serde_json::{json, Value};

/// Asserts an OpenAI error body: `{"error": {"message", "type", "code", "param"?}}`.
fn assert_error(status: u16, body: &Value, want: u16, what: &str) {
    assert_eq!(status, want, "{what}: {body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
    assert!(e["type"].is_string(), "{what}: no type: {body}");
    assert!(e.get("code").is_some(), "{what}: no code: {body}");
}

fn chat(content: Value) -> Value {
    json!({"model": "r4b", "messages": [{"role": "user", "content": content}], "max_tokens": 4})
}

fn raw_post(s: &Server, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().unwrap()).unwrap_or(Value::Null),
    )
}

/// CRC-32 (IEEE), for a hand-made PNG header.
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG whose header says 30000×30000 (the pixel data is absent: it must never be decoded).
fn huge_png_uri() -> String {
    use base64::Engine;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend(30000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png.extend(13u32.to_be_bytes());
    png.extend(&ihdr);
    png.extend(crc32(&ihdr).to_be_bytes());
    png.extend(0u32.to_be_bytes());
    png.extend(b"IEND");
    png.extend(crc32(b"IEND").to_be_bytes());
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = Server::start(&[
        "--max-model-len",
        "256",
        "--max-body-mb",
        "1",
        "--max-n",
        "4",
    ]);

    let (st, b) = raw_post(&s, b"{\"model\": \"r4b\", \"messages\": [".to_vec());
    assert_error(st, &b, 400, "malformed JSON");

    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "r4b", "max_tokens": 4}),
    );
    assert_error(st, &b, 400, "missing messages");

    let (st, b) = s.post(
        "/v1/chat/completions",
        &json!({"model": "r4b", "messages": "hello"}),
    );
    assert_error(st, &b, 400, "messages of the wrong type");
    let mut body = chat(json!("hi"));
    body["temperature"] = json!("hot");
    let (st, b) = s.post("/v1/chat/completions", &body);
    assert_error(st, &b, 400, "temperature of the wrong type");
    assert!(b.to_string().contains("temperature"), "{b}");

    for bad in [json!(0), json!(-3)] {
        let mut body = chat(json!("hi"));
        body["max_tokens"] = bad;
        let (st, b) = s.post("/v1/chat/completions", &body);
        assert_error(st, &b, 400, "max_tokens <= 0");
        assert!(b.to_string().contains("max_tokens"), "{b}");
    }

    let (st, b) = s.post("/v1/chat/completions", &chat(json!("word ".repeat(100))));
    assert_error(st, &b, 400, "prompt longer than --max-model-len");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("256"),
        "{b}"
    );

    let mut body = chat(json!("hi"));
    body["model"] = json!("gpt-4");
    let (st, b) = s.post("/v1/chat/completions", &body);
    assert_error(st, &b, 404, "unknown model");

    let parts = |url: &str| json!([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]);
    let (st, b) = s.post(
        "/v1/chat/completions",
        &chat(parts("data:image/png;base64,aGVsbG8gd29ybGQ=")),
    );
    assert_error(st, &b, 400, "undecodable image bytes");

    let (st, b) = s.post(
        "/v1/chat/completions",
        &chat(parts("http://127.0.0.1:9/cat.png")),
    );
    assert_error(
        st,
        &b,
        400,
        "image URL on loopback without --allow-private-image-urls",
    );

    let (st, b) = s.post("/v1/chat/completions", &chat(parts(&huge_png_uri())));
    assert_error(st, &b, 400, "30000x30000 PNG");

    let big = format!(
        "{{\"model\": \"r4b\", \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(2 << 20)
    );
    let (st, b) = raw_post(&s, big.into_bytes());
    assert_error(st, &b, 413, "body over the size cap");

    let mut body = chat(json!("hi"));
    body["n"] = json!(50);
    let (st, b) = s.post("/v1/chat/completions", &body);
    assert_error(st, &b, 400, "n over its cap");

    // The server is still healthy after all of that.
    let ok = s.greedy_chat("still alive?", 4);
    assert_eq!(ok["choices"][0]["finish_reason"], "length");
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let s = Server::start(&["--max-num-seqs", "1", "--max-queue", "1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let statuses = rt.block_on(async {
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (client, base) = (client.clone(), s.base.clone());
            let mut body = greedy_body(&format!("long request {i}"), 12000);
            body["stream"] = json!(true);
            tasks.push(tokio::spawn(async move {
                // A request waiting in the queue gets its headers only once admitted: give up
                // waiting after a few seconds (status 0 = still queued).
                let send = client
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&body)
                    .send();
                let Ok(r) = tokio::time::timeout(std::time::Duration::from_secs(5), send).await
                else {
                    return (0, None, String::new(), None);
                };
                let r = r.unwrap();
                let retry = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let status = r.status().as_u16();
                // Keep admitted streams open (a dropped response aborts its generation).
                let (text, open) = if status == 200 {
                    (String::new(), Some(r))
                } else {
                    (r.text().await.unwrap(), None)
                };
                (status, retry, text, open)
            }));
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut out = Vec::new();
        let mut open = Vec::new();
        for t in tasks {
            let (status, retry, text, r) = t.await.unwrap();
            out.push((status, retry, text));
            open.extend(r);
        }
        drop(open);
        out
    });
    let rejected: Vec<_> = statuses.iter().filter(|(st, _, _)| *st == 429).collect();
    assert!(!rejected.is_empty(), "no 429 among {statuses:?}");
    for (_, retry, text) in &rejected {
        assert!(
            retry.as_deref().is_some_and(|r| r.parse::<u64>().is_ok()),
            "Retry-After missing: {retry:?}"
        );
        let b: Value = serde_json::from_str(text).unwrap();
        assert_error(429, &b, 429, "queue full");
    }
    assert!(statuses.iter().any(|(st, _, _)| *st == 200), "{statuses:?}");
    assert!(
        statuses.iter().all(|(st, _, _)| [0, 200, 429].contains(st)),
        "{statuses:?}"
    );
}
