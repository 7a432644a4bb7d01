//! Structured output through the official `openai` Python SDK against `r4b serve` on the
//! embedded random model (tests/e2e/structured_output.py): json_schema (strict), json_object,
//! guided_json/regex/choice/grammar, streamed and not, a batch mixing constrained and free
//! requests, `thinking_mode: long` with a schema, small max_tokens, bad constraints → 400 naming
//! the field. Outputs are judged by `jsonschema`, `json` and `re`, not by the server. Once with
//! one CPU rank, once with TP = 2 (each rank masks its own vocabulary shard).

mod common;

use common::python::python3;
use common::Server;

fn run(args: &[&str]) {
    let s = Server::start(args);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/e2e/structured_output.py"
    );
    let out = python3().arg(script).arg(&s.base).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "structured output checks failed:\n{stdout}"
    );
    assert!(stdout.contains("all passed"));
}

#[test]
fn structured_output_forces_valid_output_on_one_rank() {
    run(&[]);
}

#[test]
fn structured_output_forces_valid_output_with_tensor_parallel_2() {
    run(&["--tensor-parallel-size", "2"]);
}
