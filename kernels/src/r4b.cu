// r4b-serve CUDA kernels, compiled for sm_80 (A100) and sm_90 (H100/H200); sm_90-only
// instructions stay behind `__CUDA_ARCH__ >= 900`. bf16 activations, f32 arithmetic.
// Every kernel is `extern "C"` so the Rust side finds it by name in the PTX module.
// Layout conventions (row-major):
//   activations  [T, D]                          one row per token of the step
//   qkv          [T, (nq + 2·nkv)·hd]            q heads, then k heads, then v heads
//   KV cache     [num_blocks·block_size, nkv, hd] per layer, separate K and V; slot = block·bs + pos % bs
//
// This file is the one translation unit build.rs compiles (one PTX module per arch, so the Rust
// side loads a single module); the kernels live in one .cu per op family, next to the .rs file
// that launches them (kernels/README.md has the table).
#include "common.cuh"
#include "embed.cu"
#include "norm.cu"
#include "attention.cu"
#include "elementwise.cu"
#include "gemm.cu"
#include "sample.cu"
#include "collective.cu"
