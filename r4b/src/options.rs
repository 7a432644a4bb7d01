//! The GPU engine's kernel choices: flags, then the environment overrides in one table. They
//! are read here once and travel to the workers in `Init` (`GpuKernelOptions`); nothing in
//! `kernels/` or the worker's GPU engine reads the environment.
//!
//! | variable | same as | what it does |
//! |---|---|---|
//! | `R4B_KERNEL_ARCH=sm80` | `--kernel-arch sm80` | load the sm_80 (A100) kernels on any device |
//! | `R4B_NO_PDL=1` | `--no-pdl` | no programmatic dependent launch (sm_90) |
//! | `R4B_FLASH_ROWS=64\|128` | `--prefill-attention-rows N` | query rows per prefill-attention CTA |
//! | `R4B_HOST_SAMPLING=1` | `--host-sampling` | sample on the host (the reference path) |
//! | `R4B_CUDA_CORE_DECODE=1` | `--cuda-core-decode` | decode attention on CUDA cores (comparisons) |
//! | `R4B_FORCE_NCCL=1` | `--force-nccl` | NCCL calls at TP = 1 too (a check of that path) |
//!
//! Settled experiments have no switch any more: the skinny one-row GEMMs (chosen per shape by
//! the load-time measurement), SiLU·mul fused into the one-row gate/up product (the same bits,
//! faster), the tensor-core prefill and decode attention (faster at every size measured).

use clap::Args;
use r4b_proto::v1 as pb;

/// GPU engine flags (`r4b serve` / `r4b coordinator`).
#[derive(Args, Debug, Clone, Default)]
pub struct GpuFlags {
    /// Kernels to load: `auto` (the device's own: sm_90 on H100/H200, sm_80 on A100) or `sm80`
    /// (the A100 kernels on any device).
    #[arg(long, value_parser = ["auto", "sm80"])]
    kernel_arch: Option<String>,
    /// No programmatic dependent launch (sm_90 only).
    #[arg(long)]
    no_pdl: bool,
    /// Query rows per CTA of the prefill attention, 64 or 128 (default: chosen per launch).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["64", "128"]))]
    prefill_attention_rows: Option<String>,
    /// Sample on the host over downloaded logits (the reference path; slow).
    #[arg(long)]
    host_sampling: bool,
    /// Decode attention on CUDA cores instead of tensor cores (comparisons).
    #[arg(long)]
    cuda_core_decode: bool,
    /// Run the NCCL calls at TP = 1 too (a one-GPU check of that path).
    #[arg(long)]
    force_nccl: bool,
    /// Tensor parallelism over NCCL instead of the all-reduce over CUDA IPC memory (the ranks
    /// must then be on different GPUs).
    #[arg(long)]
    disable_custom_all_reduce: bool,
    /// The GPU of each rank, comma-separated (`0,0,1,1`: ranks 0 and 1 on GPU 0). Default:
    /// rank % visible GPUs, so TP = 8 on one GPU runs eight ranks on it.
    #[arg(long, value_delimiter = ',')]
    device_map: Vec<u32>,
}

/// Whether an environment variable is set to something other than empty, `0` or `false`.
fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

impl GpuFlags {
    /// The options the workers get: the flags, overridden by the table's variables.
    pub fn resolve(&self) -> anyhow::Result<pb::GpuKernelOptions> {
        let arch = std::env::var("R4B_KERNEL_ARCH")
            .ok()
            .or_else(|| self.kernel_arch.clone())
            .unwrap_or_else(|| "auto".into());
        if !["auto", "sm80"].contains(&arch.as_str()) {
            anyhow::bail!("R4B_KERNEL_ARCH={arch}: expected `auto` or `sm80`");
        }
        let rows = match std::env::var("R4B_FLASH_ROWS").ok() {
            Some(v) => Some(v),
            None => self.prefill_attention_rows.clone(),
        };
        let prefill_rows = match rows.as_deref() {
            None => 0,
            Some("64") => 64,
            Some("128") => 128,
            Some(other) => anyhow::bail!("R4B_FLASH_ROWS={other}: expected 64 or 128"),
        };
        Ok(pb::GpuKernelOptions {
            arch,
            no_pdl: self.no_pdl || env_on("R4B_NO_PDL"),
            prefill_rows,
            cuda_core_decode: self.cuda_core_decode || env_on("R4B_CUDA_CORE_DECODE"),
            host_sampling: self.host_sampling || env_on("R4B_HOST_SAMPLING"),
            force_nccl: self.force_nccl || env_on("R4B_FORCE_NCCL"),
            disable_custom_all_reduce: self.disable_custom_all_reduce,
            device_map: self.device_map.clone(),
        })
    }
}
