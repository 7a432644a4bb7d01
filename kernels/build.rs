//! With the `cuda` feature, compiles `src/r4b.cu` with nvcc to PTX twice, for sm_80 (A100) and
//! sm_90 (H100/H200), both embedded in the library; the GPU layer loads the one the device runs.
//! `r4b.cu` is the one translation unit: it includes `common.cuh` and every family's `.cu`, so
//! each arch is one PTX module.
//! nvcc: `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `/usr/local/cuda/bin/nvcc`, else `nvcc` on PATH.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    // The translation unit and everything it includes (every .cu / .cuh next to it).
    println!("cargo:rerun-if-changed=src/r4b.cu");
    if let Ok(dir) = std::fs::read_dir("src") {
        for entry in dir.flatten() {
            let path = entry.path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("cu" | "cuh")
            ) {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .filter(|p| p.exists())
        .or_else(|| Some(PathBuf::from("/usr/local/cuda/bin/nvcc")).filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    for arch in ["sm_80", "sm_90"] {
        let out = out_dir.join(format!("r4b_{arch}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", &format!("-arch={arch}"), "-O3", "-std=c++17", "-o"])
            .arg(&out)
            .arg("src/r4b.cu")
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!(
                "nvcc ({}) failed on src/r4b.cu for {arch}: {s}",
                nvcc.display()
            ),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc ({}: {e}); set NVCC or CUDA_HOME, or install it \
                 from PyPI as ../shared/spec/gpu-build.md and kernels/README.md say",
                nvcc.display()
            ),
        }
    }
}
