//! Every field of OpenAI's chat and completions request schemas (as the pinned `openai` SDK
//! defines them) is either honoured or refused with a 400 naming it (tests/e2e/field_sweep.py).

mod common;

use common::python::run_e2e;
use common::Server;

#[test]
fn every_openai_request_field_is_honoured_or_refused_by_name() {
    let s = Server::start(&[]);
    run_e2e("field_sweep.py", &[&s.base], "field sweep");
}
