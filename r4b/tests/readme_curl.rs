//! Every `curl` command in README.md's "Using the API" section, run against a real `r4b serve`
//! (host and image URL pointed at loopback): each answers 200 with the expected JSON shape.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use common::*;
use serde_json::Value;

/// Serves a PNG at `http://127.0.0.1:PORT/img.png` from a thread (any path).
fn serve_png() -> String {
    use base64::Engine;
    let uri = png_data_uri(120, 90, 9);
    let png = base64::engine::general_purpose::STANDARD
        .decode(uri.split_once(',').unwrap().1)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/img.png", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len());
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(&png);
        }
    });
    url
}

/// The ```bash blocks of the "Using the API" section that call curl.
fn readme_curls() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("## Using the API")
        .expect("README has a 'Using the API' section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    section
        .split("```bash\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .filter(|b| b.trim_start().starts_with("curl"))
        .map(String::from)
        .collect()
}

#[test]
fn every_readme_curl_command_answers_200_with_the_expected_shape() {
    let cmds = readme_curls();
    assert!(cmds.len() >= 5, "found {} curl blocks", cmds.len());
    let s = Server::start(&["--allow-private-image-urls"]);
    let image = serve_png();
    for cmd in cmds {
        let cmd = cmd
            .replace("http://localhost:8000", &s.base)
            .replace(
                "http://images.cocodataset.org/val2017/000000039769.jpg",
                &image,
            )
            .replace("curl ", "curl -sS --fail-with-body ");
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        let body = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{cmd}\n→ {body}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if cmd.contains("\"stream\": true") {
            let events: Vec<&str> = body
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
            for e in &events[..events.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap();
                assert_eq!(v["object"], "chat.completion.chunk", "{e}");
            }
            let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
            assert!(
                usage["usage"]["completion_tokens"].as_u64().is_some(),
                "{body}"
            );
        } else {
            let v: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{cmd}\n→ {body}: {e}"));
            assert_eq!(v["object"], "chat.completion", "{v}");
            assert_eq!(v["model"], "r4b");
            let msg = &v["choices"][0]["message"];
            assert_eq!(msg["role"], "assistant", "{v}");
            assert!(
                msg["content"].is_string()
                    || msg["reasoning_content"].is_string()
                    || msg["tool_calls"].is_array(),
                "{v}"
            );
            assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
            if cmd.contains("image_url") {
                assert!(
                    v["usage"]["prompt_tokens"].as_u64().unwrap() > 729,
                    "image tokens missing: {v}"
                );
            }
        }
    }
}
