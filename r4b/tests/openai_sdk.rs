//! The official `openai` Python SDK against `r4b serve` (pinned in tests/python-requirements.txt,
//! installed by the test itself):
//! non-streamed and streamed chat with include_usage, images by data: URI and by http URL from
//! a local server, two images in one message, thinking_mode via extra_body, typed errors.

mod common;

use common::python::python3;
use common::Server;

#[test]
fn the_openai_python_sdk_works_against_r4b_serve() {
    let s = Server::start(&["--allow-private-image-urls"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/openai_sdk.py");
    let out = python3().arg(script).arg(&s.base).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai SDK checks failed:\n{stdout}");
    assert!(stdout.contains("all passed"));
}
