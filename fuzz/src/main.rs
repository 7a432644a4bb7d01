//! `cargo run -p r4b-fuzz --release -- <request|image|template|all> --minutes N`: runs a target
//! until N minutes pass; a failing input goes to `fuzz/artifacts/<target>/` and the exit status
//! is 1. `--replay FILE` runs one input; `--write-image-seeds` regenerates the generated files
//! of `fuzz/corpus/image/`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use r4b_fuzz::runner::{self, FailureKind, Options};

#[derive(Parser)]
#[command(about = "Fuzz the gateway's request, image and template paths")]
struct Args {
    /// request, image, template, or all (one after another).
    target: String,
    /// Minutes per target.
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Stop after this many cases per target.
    #[arg(long)]
    cases: Option<u64>,
    /// Per-input deadline in milliseconds (over it: a hang).
    #[arg(long, default_value_t = 2000)]
    deadline_ms: u64,
    /// Allocation ceiling per input in MiB (peak live heap growth).
    #[arg(long, default_value_t = 2048)]
    max_alloc_mib: usize,
    /// Random seed (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Run this one input instead.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Write the generated image seeds into fuzz/corpus/image/ and exit.
    #[arg(long)]
    write_image_seeds: bool,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if args.write_image_seeds {
        let dir = r4b_fuzz::crate_dir().join("corpus").join("image");
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in r4b_fuzz::image::seed_images()? {
            std::fs::write(dir.join(name), bytes)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let names: Vec<&str> = if args.target == "all" {
        r4b_fuzz::TARGETS.to_vec()
    } else {
        vec![args.target.as_str()]
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let opts = Options {
        duration: Duration::from_secs_f64(args.minutes * 60.0),
        max_cases: args.cases,
        deadline: Duration::from_millis(args.deadline_ms),
        max_alloc_bytes: args.max_alloc_mib << 20,
        seed,
        artifacts: Some(r4b_fuzz::crate_dir().join("artifacts")),
        progress: Some(Duration::from_secs(30)),
    };
    for name in names {
        let target: Arc<dyn r4b_fuzz::Target> = Arc::from(r4b_fuzz::target(name)?);
        let report = if let Some(path) = &args.replay {
            runner::replay(target, std::fs::read(path)?, &opts)
        } else {
            let seeds = runner::load_corpus(&r4b_fuzz::crate_dir().join("corpus").join(name))?;
            println!("{name}: {} seeds, random seed {seed}", seeds.len());
            runner::run(target, &seeds, &opts)
        };
        println!(
            "{name}: {} cases ({} seeds, {} accepted), slowest {:.1} ms, largest allocation {:.1} MiB, {}",
            report.cases,
            report.seeds,
            report.accepted,
            report.slowest.as_secs_f64() * 1e3,
            report.max_alloc as f64 / (1 << 20) as f64,
            if report.failure.is_some() { "1 failure" } else { "0 failures" }
        );
        if let Some(f) = report.failure {
            let what = match &f.kind {
                FailureKind::Crash(m) => format!("crash: {m}"),
                FailureKind::Property(m) => format!("property: {m}"),
                FailureKind::Hang(d) => format!("hang: over {:.0} ms", d.as_secs_f64() * 1e3),
                FailureKind::Memory(b) => {
                    format!("memory: {:.0} MiB", *b as f64 / (1 << 20) as f64)
                }
            };
            println!("{name}: FAILURE {what}");
            if let Some(p) = f.artifact {
                println!("{name}: input written to {}", p.display());
            }
            // A hung case's thread is still running: leave now.
            std::process::exit(1);
        }
    }
    Ok(ExitCode::SUCCESS)
}
