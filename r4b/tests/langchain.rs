//! langchain-openai against `r4b serve` (tests/e2e/langchain_client.py): `bind_tools` with a
//! forced call and `with_structured_output` by function calling and by `response_format`
//! json_schema. With the embedded random model only constrained decoding makes these valid.

mod common;

use common::python::run_e2e;
use common::Server;

fn run_script(modes: &[&str]) {
    let s = Server::start(&[]);
    let args: Vec<&str> = std::iter::once(s.base.as_str())
        .chain(modes.iter().copied())
        .collect();
    run_e2e("langchain_client.py", &args, "langchain-openai checks");
}

#[test]
fn langchain_bind_tools_and_structured_output_by_function_calling() {
    run_script(&["bind_tools", "function_calling"]);
}

#[test]
fn langchain_structured_output_by_json_schema() {
    run_script(&["json_schema"]);
}
