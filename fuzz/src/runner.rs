//! The loop: seeds first, then mutated and generated inputs, each on a worker thread under a
//! deadline and an allocation ceiling; the first failure is written to
//! `fuzz/artifacts/<target>/` and ends the run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Target;

/// When to stop and what counts as a failure.
#[derive(Clone, Debug)]
pub struct Options {
    /// Stop after this long.
    pub duration: Duration,
    /// Stop after this many cases (seeds included).
    pub max_cases: Option<u64>,
    /// A case running longer is a hang.
    pub deadline: Duration,
    /// A case whose peak live heap grows by more is a failure.
    pub max_alloc_bytes: usize,
    /// Random seed.
    pub seed: u64,
    /// Where failing inputs go (`<dir>/<target>/`); `None`: not written.
    pub artifacts: Option<PathBuf>,
    /// Print progress every this long.
    pub progress: Option<Duration>,
}

/// What broke.
#[derive(Clone, Debug)]
pub enum FailureKind {
    /// The target panicked.
    Crash(String),
    /// A property the target checks was false.
    Property(String),
    /// The case ran past the deadline.
    Hang(Duration),
    /// The case allocated past the ceiling.
    Memory(usize),
}

/// A failing input.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What broke.
    pub kind: FailureKind,
    /// The input.
    pub input: Vec<u8>,
    /// Where it was written.
    pub artifact: Option<PathBuf>,
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Report {
    /// Cases run (the failing one included).
    pub cases: u64,
    /// Cases the gateway accepted (the rest it refused with an error, as it should).
    pub accepted: u64,
    /// Corpus seeds among them.
    pub seeds: usize,
    /// Slowest case.
    pub slowest: Duration,
    /// Largest peak allocation of a case over the live heap at its start.
    pub max_alloc: usize,
    /// The first failure, if any.
    pub failure: Option<Failure>,
}

/// The seed files of `dir`, sorted by name (none if it does not exist).
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    paths.sort();
    paths.iter().map(std::fs::read).collect()
}

type Outcome = (Result<bool, FailureKind>, Duration, usize);

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".into()
    }
}

/// Runs `target` over `seeds` and then generated inputs until `opts` says stop or a case fails.
pub fn run(target: Arc<dyn Target>, seeds: &[Vec<u8>], opts: &Options) -> Report {
    let (to_worker, inputs) = mpsc::channel::<Vec<u8>>();
    let (results, from_worker) = mpsc::channel::<Outcome>();
    let worker_target = target.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name()))
        .spawn(move || {
            for input in inputs {
                crate::alloc::reset_peak();
                let base = crate::alloc::live();
                let t = Instant::now();
                let result = catch_unwind(AssertUnwindSafe(|| worker_target.run(&input)));
                let took = t.elapsed();
                let grew = crate::alloc::peak().saturating_sub(base);
                let result = match result {
                    Ok(Ok(accepted)) => Ok(accepted),
                    Ok(Err(p)) => Err(FailureKind::Property(p)),
                    Err(payload) => Err(FailureKind::Crash(panic_text(payload.as_ref()))),
                };
                if results.send((result, took, grew)).is_err() {
                    return;
                }
            }
        });
    let mut report = Report {
        cases: 0,
        accepted: 0,
        seeds: seeds.len(),
        slowest: Duration::ZERO,
        max_alloc: 0,
        failure: None,
    };
    if let Err(e) = spawned {
        report.failure = Some(Failure {
            kind: FailureKind::Crash(format!("cannot start the worker thread: {e}")),
            input: Vec::new(),
            artifact: None,
        });
        return report;
    }
    let mut rng = fastrand::Rng::with_seed(opts.seed);
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut next_seed = 0;
    loop {
        if start.elapsed() >= opts.duration || opts.max_cases.is_some_and(|m| report.cases >= m) {
            break;
        }
        let input = match seeds.get(next_seed) {
            Some(s) => {
                next_seed += 1;
                s.clone()
            }
            None => target.generate(&mut rng, seeds),
        };
        report.cases += 1;
        if to_worker.send(input.clone()).is_err() {
            fail(
                &mut report,
                &*target,
                opts,
                FailureKind::Crash("the worker thread died".into()),
                input,
            );
            break;
        }
        let kind = match from_worker.recv_timeout(opts.deadline) {
            Ok((result, took, grew)) => {
                report.slowest = report.slowest.max(took);
                report.max_alloc = report.max_alloc.max(grew);
                match result {
                    Err(kind) => Some(kind),
                    Ok(_) if took > opts.deadline => Some(FailureKind::Hang(took)),
                    Ok(_) if grew > opts.max_alloc_bytes => Some(FailureKind::Memory(grew)),
                    Ok(accepted) => {
                        report.accepted += u64::from(accepted);
                        None
                    }
                }
            }
            // The worker is stuck: report; the process exit ends the thread.
            Err(_) => Some(FailureKind::Hang(opts.deadline)),
        };
        if let Some(kind) = kind {
            fail(&mut report, &*target, opts, kind, input);
            break;
        }
        if let Some(every) = opts.progress {
            if last_progress.elapsed() >= every {
                last_progress = Instant::now();
                println!(
                    "{}: {} cases ({} accepted) in {:.0} s, slowest {:.1} ms, largest allocation {:.1} MiB",
                    target.name(),
                    report.cases,
                    report.accepted,
                    start.elapsed().as_secs_f64(),
                    report.slowest.as_secs_f64() * 1e3,
                    report.max_alloc as f64 / (1 << 20) as f64
                );
            }
        }
    }
    report
}

fn fail(
    report: &mut Report,
    target: &dyn Target,
    opts: &Options,
    kind: FailureKind,
    input: Vec<u8>,
) {
    let artifact = opts.artifacts.as_ref().and_then(|dir| {
        let dir = dir.join(target.name());
        let name = format!("{}-{:016x}", kind_name(&kind), fnv(&input));
        let path = dir.join(name);
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&path, &input))
            .map(|()| path)
            .map_err(|e| eprintln!("cannot write the artifact: {e}"))
            .ok()
    });
    report.failure = Some(Failure {
        kind,
        input,
        artifact,
    });
}

fn kind_name(kind: &FailureKind) -> &'static str {
    match kind {
        FailureKind::Crash(_) => "crash",
        FailureKind::Property(_) => "property",
        FailureKind::Hang(_) => "hang",
        FailureKind::Memory(_) => "memory",
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs one input (a replayed artifact) under the same deadline.
pub fn replay(target: Arc<dyn Target>, input: Vec<u8>, opts: &Options) -> Report {
    let opts = Options {
        max_cases: Some(1),
        artifacts: None,
        ..opts.clone()
    };
    run(target, &[input], &opts)
}
