//! Each target for a few hundred cases (seeds first), so CI keeps the harness compiling and
//! sane. The long runs are `cargo run -p r4b-fuzz --release -- <target> --minutes 5`.

use std::sync::Arc;
use std::time::Duration;

use r4b_fuzz::runner::{self, Options};

fn smoke(name: &str, cases: u64) {
    let target: Arc<dyn r4b_fuzz::Target> = Arc::from(r4b_fuzz::target(name).expect("target"));
    let seeds =
        runner::load_corpus(&r4b_fuzz::crate_dir().join("corpus").join(name)).expect("corpus");
    assert!(!seeds.is_empty(), "fuzz/corpus/{name}/ has no seeds");
    let opts = Options {
        duration: Duration::from_secs(120),
        max_cases: Some(cases),
        // Debug builds are slower; a hang is still caught.
        deadline: Duration::from_secs(20),
        max_alloc_bytes: 2 << 30,
        seed: 15,
        artifacts: None,
        progress: None,
    };
    let report = runner::run(target, &seeds, &opts);
    assert!(report.failure.is_none(), "{name}: {:?}", report.failure);
    assert_eq!(report.cases, cases);
    // Every seed is a valid input: the gateway accepts at least the seeds' share.
    assert!(report.accepted > 0, "{name}: nothing was accepted");
    eprintln!(
        "{name}: {} cases, {} accepted",
        report.cases, report.accepted
    );
}

#[test]
fn request_smoke() {
    smoke("request", 300);
}

#[test]
fn image_smoke() {
    smoke("image", 200);
}

#[test]
fn template_smoke() {
    smoke("template", 300);
}
