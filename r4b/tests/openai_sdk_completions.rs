//! `/v1/completions` batched prompts (strings and token-id lists, `index` = i·n + j, usage
//! summed), `echo` (text), and `/tokenizer_info`, through the official `openai` Python SDK
//! usage details (`reasoning_tokens` against the tokens before `</think>`), `max_completion_tokens`,
//! `user`, `metadata` (tests/e2e/openai_sdk_completions.py; packages installed as in openai_sdk.rs).

mod common;

use common::python::run_e2e;
use common::Server;

#[test]
fn completions_batches_echo_and_tokenizer_info_through_the_openai_sdk() {
    let s = Server::start(&[]);
    run_e2e(
        "openai_sdk_completions.py",
        &[&s.base],
        "completions SDK checks",
    );
}
