//! `--device`: a build without the `cuda` feature refuses `--device cuda` with a clear error (no
//! hang, no half-started server); bad GPU flags are refused before anything starts.

use std::process::Command;

fn serve(args: &[&str]) -> (bool, String) {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .env("R4B_CACHE", cache.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cuda_device_without_the_feature_fails_clearly() {
    if cfg!(feature = "cuda") {
        return; // this binary has the GPU engine: the GPU machine's bench covers it
    }
    let (ok, err) = serve(&["--device", "cuda"]);
    assert!(!ok);
    assert!(err.contains("without the `cuda` feature"), "{err}");
}

#[test]
fn bad_gpu_flags_are_refused() {
    let (ok, err) = serve(&["--device", "tpu"]);
    assert!(!ok);
    assert!(err.contains("tpu"), "{err}");
    let (ok, err) = serve(&["--gpu-memory-utilization", "1.5"]);
    assert!(!ok);
    assert!(err.contains("--gpu-memory-utilization"), "{err}");
}
