//! The pinned Python packages of the end-to-end tests (`tests/python-requirements.txt`; and
//! lm-eval-harness's, `tests/lm-eval-requirements.txt`), installed by the tests themselves into
//! `target/tmp/pydeps` (`target/tmp/pydeps-lm-eval`) (pip `--target`, `--no-deps`), once per
//! change of the requirements file; concurrent tests wait on a file lock.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::Command;

const REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/python-requirements.txt"
);

const LM_EVAL_REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/lm-eval-requirements.txt"
);

/// `python3` with the pinned packages on its path (installing them first if needed).
pub fn python3() -> Command {
    let site = ensure_installed(REQUIREMENTS, "pydeps");
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", &site).env("PYTHONNOUSERSITE", "1");
    cmd
}

/// `python3 -S` (no site-packages of the machine: only the pinned set) with lm-eval-harness and
/// its dependencies on its path.
pub fn lm_eval_python3() -> Command {
    let site = ensure_installed(LM_EVAL_REQUIREMENTS, "pydeps-lm-eval");
    let mut cmd = Command::new("python3");
    cmd.arg("-S")
        .env("PYTHONPATH", &site)
        .env("PYTHONNOUSERSITE", "1");
    cmd
}

fn ensure_installed(requirements: &str, dir: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(dir);
    let site = root.join("site");
    let stamp = root.join("installed-requirements.txt");
    let wanted = fs::read_to_string(requirements).expect(requirements);
    fs::create_dir_all(&root).expect("creating target/tmp/pydeps");
    let lock = File::create(root.join(".lock")).expect("lock file");
    lock.lock().expect("locking target/tmp/pydeps");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return site;
    }
    let _ = fs::remove_dir_all(&site);
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
        ])
        .arg(&site)
        .args(["-r", requirements])
        .output()
        .expect("running python3 -m pip");
    assert!(
        out.status.success(),
        "pip install -r {requirements} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&stamp, &wanted).expect("writing the install stamp");
    site
}

/// Runs `tests/e2e/<script>` under [`python3`] with `args` (the server's base URL first, by
/// convention); fails the test, printing the script's output, unless it exits 0 having printed
/// "all passed". `what` names the checks in the failure message.
pub fn run_e2e<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S], what: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/e2e")
        .join(script);
    let out = python3()
        .arg(path)
        .args(args)
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{stdout}");
    assert!(stdout.contains("all passed"), "{what}: no \"all passed\"");
}
