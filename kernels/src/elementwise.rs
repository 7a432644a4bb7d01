//! Elementwise family (`elementwise.cu`): SwiGLU's SiLU·mul, bias + activation (SigLIP's GELU),
//! bias + residual.
use crate::launch::{grid2, i, kernel_set, KernelArg};
use crate::{DevPtr, Gpu, Result};

kernel_set! {
    /// The elementwise kernels.
    struct Kernels { silu_mul, silu_mul_v8, bias_act, bias_residual }
}

impl Gpu {
    /// `out[t, i] = silu(gu[t, i]) · gu[t, F + i]`.
    pub unsafe fn silu_mul(&self, gu: DevPtr, out: DevPtr, tokens: usize, f: usize) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let k = &self.kernels.elementwise;
        // 8 values per thread where the rows allow 16-byte accesses.
        let (func, grid) = if f.is_multiple_of(8) && gu.is_multiple_of(16) && out.is_multiple_of(16)
        {
            (&k.silu_mul_v8, f.div_ceil(8 * 256))
        } else {
            (&k.silu_mul, f.div_ceil(256))
        };
        self.launch(func, grid2(grid, tokens, 256), &[&gu, &out, &i(f)])
    }

    /// `x = act(x + b)`; act 0 none, 1 gelu-tanh, 2 gelu-erf.
    pub unsafe fn bias_act(
        &self,
        x: DevPtr,
        b: DevPtr,
        (tokens, d): (usize, usize),
        act: i32,
    ) -> Result<()> {
        let args: [&dyn KernelArg; 4] = [&x, &b, &i(d), &act];
        self.launch_row_threads(&self.kernels.elementwise.bias_act, (tokens, d), &args)
    }

    /// `res += x + b` (b may be 0 = no bias).
    pub unsafe fn bias_residual(
        &self,
        res: DevPtr,
        x: DevPtr,
        b: DevPtr,
        (tokens, d): (usize, usize),
    ) -> Result<()> {
        let args: [&dyn KernelArg; 4] = [&res, &x, &b, &i(d)];
        self.launch_row_threads(&self.kernels.elementwise.bias_residual, (tokens, d), &args)
    }
}
