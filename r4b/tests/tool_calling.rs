//! Tool calling through the official `openai` Python SDK against `r4b serve`
//! (tests/e2e/tool_calling.py): tools rendered by the checkpoint's template, a two-turn agent
//! loop, `tool_choice` none/auto, streamed == non-streamed, the 400s; and calls forced by
//! `tool_choice` required/named, whose arguments must follow the function's schema even from
//! the embedded random model.

mod common;

use common::python::run_e2e;
use common::Server;

fn run_script(s: &Server, args: &[&str]) {
    let all: Vec<&str> = std::iter::once(s.base.as_str())
        .chain(args.iter().copied())
        .collect();
    run_e2e("tool_calling.py", &all, "tool-calling checks");
}

#[test]
fn tools_render_and_calls_parse_through_the_openai_sdk() {
    let s = Server::start(&[]);
    run_script(&s, &[]);
}

/// Needs the workers' grammar masking (issue 17 item 3, on another branch until merged).
#[test]
fn forced_tool_calls_follow_the_schema_through_the_openai_sdk() {
    let s = Server::start(&[]);
    run_script(&s, &["forced"]);
}
