//! The runner reports each kind of failure with its input.

use std::sync::Arc;
use std::time::Duration;

use r4b_fuzz::runner::{self, FailureKind, Options};
use r4b_fuzz::Target;

/// Fails on the input it is told to.
struct Trap;

impl Target for Trap {
    fn name(&self) -> &'static str {
        "trap"
    }
    fn generate(&self, rng: &mut fastrand::Rng, _: &[Vec<u8>]) -> Vec<u8> {
        vec![rng.u8(b'a'..=b'z')]
    }
    fn run(&self, input: &[u8]) -> Result<bool, String> {
        match input {
            b"panic" => panic!("trap sprung"),
            b"hang" => {
                std::thread::sleep(Duration::from_secs(3));
                Ok(true)
            }
            b"property" => Err("broken".into()),
            b"memory" => Ok(!std::hint::black_box(vec![0u8; 64 << 20]).is_empty()),
            _ => Ok(true),
        }
    }
}

fn opts() -> Options {
    Options {
        duration: Duration::from_secs(30),
        max_cases: Some(50),
        // Well above a panic's cost (the hook symbolises a backtrace when RUST_BACKTRACE is set,
        // which took over 300 ms on a loaded 2-core machine and read as a hang), well below the
        // 3 s of the planted hang.
        deadline: Duration::from_millis(1500),
        max_alloc_bytes: 16 << 20,
        seed: 1,
        artifacts: None,
        progress: None,
    }
}

fn first_failure(seed: &[u8]) -> (u64, Option<runner::Failure>) {
    let seeds = vec![b"ok".to_vec(), seed.to_vec()];
    let report = runner::run(Arc::new(Trap), &seeds, &opts());
    (report.cases, report.failure)
}

#[test]
fn clean_run_counts_cases() {
    let (cases, failure) = first_failure(b"fine");
    assert_eq!(cases, 50);
    assert!(failure.is_none());
}

#[test]
fn each_failure_kind_stops_the_run_with_its_input() {
    for (input, want) in [
        (&b"panic"[..], "crash"),
        (b"hang", "hang"),
        (b"property", "property"),
        (b"memory", "memory"),
    ] {
        let (cases, failure) = first_failure(input);
        let failure = failure.expect("a failure");
        assert_eq!(cases, 2, "{want}");
        assert_eq!(failure.input, input);
        let kind = match failure.kind {
            FailureKind::Crash(m) => {
                assert!(m.contains("trap sprung"));
                "crash"
            }
            FailureKind::Hang(_) => "hang",
            FailureKind::Property(_) => "property",
            FailureKind::Memory(b) => {
                assert!(b >= 64 << 20);
                "memory"
            }
        };
        assert_eq!(kind, want);
    }
}
