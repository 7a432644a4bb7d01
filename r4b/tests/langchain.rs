//! langchain-openai against `r4b serve` (tests/e2e/langchain_client.py): `bind_tools` with a
//! forced call and `with_structured_output` by function calling and by `response_format`
//! json_schema. With the embedded random model only constrained decoding makes these valid.

mod common;

use common::python::python3;
use common::Server;

fn run_script(modes: &[&str]) {
    let s = Server::start(&[]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/langchain_client.py"
    );
    let out = python3()
        .arg(script)
        .arg(&s.base)
        .args(modes)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "langchain-openai checks failed:\n{stdout}"
    );
    assert!(stdout.contains("all passed"));
}

#[test]
fn langchain_bind_tools_and_structured_output_by_function_calling() {
    run_script(&["bind_tools", "function_calling"]);
}

#[test]
fn langchain_structured_output_by_json_schema() {
    run_script(&["json_schema"]);
}
