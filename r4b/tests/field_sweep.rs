//! Every field of OpenAI's chat and completions request schemas (as the pinned `openai` SDK
//! defines them) is either honoured or refused with a 400 naming it (tests/e2e/field_sweep.py).

mod common;

use common::python::python3;
use common::Server;

#[test]
fn every_openai_request_field_is_honoured_or_refused_by_name() {
    let s = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/field_sweep.py");
    let out = python3().arg(script).arg(&s.base).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "field sweep failed:\n{stdout}");
    assert!(stdout.contains("all passed"));
}
