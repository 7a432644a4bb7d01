//! Starts the real `r4b serve` binary on loopback for end-to-end tests.
#![allow(dead_code)]

pub mod cluster;
pub mod procs;
pub mod python;
pub mod reference;

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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the server to exit; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `r4b serve` with the embedded default and `args`; waits until `/ready` is 200.
    pub fn start(args: &[&str]) -> Server {
        Self::start_env(args, &[])
    }

    /// [`Server::start`] with extra environment variables (inherited by the workers).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
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
            .envs(env.iter().copied())
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

/// How one streamed request ended, with its timings.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// HTTP status.
    pub status: u16,
    /// The body of a non-200 answer.
    pub body: String,
    /// `data: [DONE]` arrived.
    pub done: bool,
    /// The last `finish_reason` seen.
    pub finish: Option<String>,
    /// The message of an error event (`data: {"error": ...}`).
    pub error: Option<String>,
    /// Content or reasoning pieces received.
    pub pieces: usize,
    /// When the request was sent.
    pub sent: Instant,
    /// When the first chunk with output arrived.
    pub first: Option<Instant>,
    /// When the response ended (or the connection broke).
    pub ended: Instant,
    /// The `Retry-After` header of a 429.
    pub retry_after: Option<Duration>,
}

impl Outcome {
    /// A 200 stream that finished normally (finish reason and `[DONE]`, no error).
    pub fn complete(&self) -> bool {
        self.status == 200 && self.done && self.error.is_none() && self.finish.is_some()
    }

    /// A stream that ended with an error event and `[DONE]`, or a non-200 answer with an
    /// OpenAI error body.
    pub fn clear_error(&self) -> bool {
        (self.status == 200 && self.done && self.error.is_some())
            || (self.status != 200 && self.body.contains("\"error\""))
    }
}

/// Sends a streamed chat request and reads it to the end.
pub fn stream_chat(base: &str, body: &Value) -> Outcome {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let sent = Instant::now();
    let mut out = Outcome {
        status: 0,
        body: String::new(),
        done: false,
        finish: None,
        error: None,
        pieces: 0,
        sent,
        first: None,
        ended: sent,
        retry_after: None,
    };
    let resp = match client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
    {
        Ok(r) => r,
        Err(e) => {
            out.body = format!("request failed: {e}");
            out.ended = Instant::now();
            return out;
        }
    };
    out.status = resp.status().as_u16();
    out.retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    if out.status != 200 {
        out.body = resp.text().unwrap_or_default();
        out.ended = Instant::now();
        return out;
    }
    for line in BufReader::new(resp).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            out.done = true;
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(msg) = v["error"]["message"].as_str() {
            out.error = Some(msg.to_string());
            continue;
        }
        let choice = &v["choices"][0];
        let d = &choice["delta"];
        if d["content"].as_str().is_some_and(|c| !c.is_empty())
            || d["reasoning_content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        {
            out.pieces += 1;
            out.first.get_or_insert_with(Instant::now);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            out.finish = Some(f.to_string());
        }
    }
    out.ended = Instant::now();
    out
}
