//! The official `openai` Python SDK against `r4b serve` (pinned in tests/python-requirements.txt,
//! installed by the test itself):
//! non-streamed and streamed chat with include_usage, images by data: URI and by http URL from
//! a local server, two images in one message, thinking_mode via extra_body, typed errors.

mod common;

use common::python::run_e2e;
use common::Server;

#[test]
fn the_openai_python_sdk_works_against_r4b_serve() {
    let s = Server::start(&["--allow-private-image-urls"]);
    run_e2e("openai_sdk.py", &[&s.base], "openai SDK checks");
}
