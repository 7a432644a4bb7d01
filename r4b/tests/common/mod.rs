//! Starts the real `r4b serve` binary on loopback for end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `r4b serve` (killed on drop).
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    _cache: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts `r4b serve` with the embedded default and `args`; waits until `/ready` is 200.
    pub fn start(args: &[&str]) -> Server {
        let cache = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_r4b"))
            .arg("serve")
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--kv-cache-space",
                "0.25",
            ])
            .args(args)
            .env("R4B_CACHE", cache.path())
            .env("RAYON_NUM_THREADS", "1")
            .env(
                "R4B_LOG",
                std::env::var("R4B_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep the server's log: printed by the test harness when a test fails.
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                println!("[r4b:{port}] {line}");
            }
        });
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = client();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("r4b serve exited early: {status}");
            }
            if let Ok(r) = client.get(format!("{base}/ready")).send() {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "r4b serve did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        Server {
            child,
            base,
            _cache: cache,
        }
    }

    /// POSTs JSON, returns (status, body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// GETs a path as text.
    pub fn get_text(&self, path: &str) -> String {
        client()
            .get(format!("{}{path}", self.base))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// A greedy chat completion of `text`, `max_tokens` tokens, EOS ignored.
    pub fn greedy_chat(&self, text: &str, max_tokens: u32) -> Value {
        let (status, body) = self.post("/v1/chat/completions", &greedy_body(text, max_tokens));
        assert_eq!(status, 200, "{body}");
        body
    }

    /// A metric's value from `/metrics` (first sample whose name and labels start with `prefix`).
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.get_text("/metrics")
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// Body of a greedy chat request.
pub fn greedy_body(text: &str, max_tokens: u32) -> Value {
    json!({
        "model": "r4b",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true
    })
}

/// A small PNG as a `data:` URI.
pub fn png_data_uri(w: u32, h: u32, seed: u8) -> String {
    use base64::Engine;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + seed as u32) as u8,
            (y * 5) as u8,
            ((x + y) * 3 + seed as u32 * 11) as u8,
        ])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// The text of the first choice (reasoning + content, so nothing the model said is lost).
pub fn choice_text(body: &Value) -> String {
    let m = &body["choices"][0]["message"];
    format!(
        "{}|{}",
        m["reasoning_content"].as_str().unwrap_or(""),
        m["content"].as_str().unwrap_or("")
    )
}

/// A blocking HTTP client (5-minute timeout per request).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}
