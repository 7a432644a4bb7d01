//! Linear layers: `y = x · Wᵀ (+ b)` for PyTorch-layout weights `[out, in]`, row-major
//! activations `[rows, in]`.

use r4b_kernels::{DBuf, DevPtr, Gpu, LinearImpl, OutType};

use super::Ctx;
use crate::gpu::weights::{gpu_err, Loader, Split};
use crate::{Error, Result};

/// Element type of a weight on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    /// bf16, no scale (every weight today).
    Bf16,
}

/// One weight `[out, in]` (this rank's part of it), its element type and optional scale and bias.
pub struct Linear {
    weight: DBuf,
    dtype: WeightDtype,
    /// Dequantisation scale (quantised dtypes only; `None` for bf16).
    scale: Option<DBuf>,
    bias: Option<DBuf>,
    /// This rank's `(out, in)`.
    out: usize,
    inp: usize,
}

impl Linear {
    /// Loads this rank's part of `{name}.weight [out, in]` (and, with `bias`, of `{name}.bias`,
    /// replicated layers only) as bf16.
    pub fn load(
        l: &mut Loader,
        name: &str,
        (out, inp): (usize, usize),
        split: Split,
        bias: bool,
    ) -> Result<Self> {
        let mut linear = Self::load_tensor(l, &format!("{name}.weight"), (out, inp), split)?;
        if bias {
            linear.bias = Some(l.upload(&format!("{name}.bias"), &[out], split)?);
        }
        Ok(linear)
    }

    /// This rank's part of the weight tensor `tensor [out, in]` (full name), no bias.
    pub fn load_tensor(
        l: &mut Loader,
        tensor: &str,
        (out, inp): (usize, usize),
        split: Split,
    ) -> Result<Self> {
        let weight = l.upload(tensor, &[out, inp], split)?;
        let world = l.shard.world.max(1);
        let (out, inp) = match split {
            Split::Replicated => (out, inp),
            Split::Rows => (out / world, inp),
            Split::Cols => (out, inp / world),
        };
        Ok(Linear {
            weight,
            dtype: WeightDtype::Bf16,
            scale: None,
            bias: None,
            out,
            inp,
        })
    }

    /// Several checkpoint tensors `{name}.weight [out_i, in]` stacked by rows into one weight
    /// (this rank's rows of each, in the order given), and with `bias` their `{name}.bias` into
    /// one bias: one product instead of several (`q | k | v`, `gate | up`).
    pub fn load_stacked(
        l: &mut Loader,
        parts: &[(&str, usize)],
        inp: usize,
        split: Split,
        bias: bool,
    ) -> Result<Self> {
        let world = match split {
            Split::Replicated => 1,
            Split::Rows => l.shard.world.max(1),
            Split::Cols => {
                return Err(Error::Gpu(
                    "stacked weights are split by rows or replicated".into(),
                ))
            }
        };
        let out: usize = parts.iter().map(|p| p.1 / world).sum();
        let weight = l.gpu.alloc(out * inp * 2).map_err(gpu_err)?;
        let bias_buf = match bias {
            true => Some(l.gpu.alloc(out * 2).map_err(gpu_err)?),
            false => None,
        };
        let (mut at, mut at_b) = (0, 0);
        for &(name, rows) in parts {
            at += l.upload_into(&format!("{name}.weight"), &[rows, inp], split, &weight, at)?;
            if let Some(b) = &bias_buf {
                at_b += l.upload_into(&format!("{name}.bias"), &[rows], split, b, at_b)?;
            }
        }
        Ok(Linear {
            weight,
            dtype: WeightDtype::Bf16,
            scale: None,
            bias: bias_buf,
            out,
            inp,
        })
    }

    /// This rank's `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The weight's element type.
    pub fn dtype(&self) -> WeightDtype {
        self.dtype
    }

    /// The weight's device address (for kernels that fuse the product).
    fn weight_ptr(&self) -> DevPtr {
        self.weight.ptr()
    }

    /// `y [rows, out] = x [rows, in] · Wᵀ` (no bias), bf16 or f32 output.
    ///
    /// # Safety
    /// `x` and `y` are device buffers of at least `rows` rows of `in` / `out` values.
    pub unsafe fn forward(
        &self,
        gpu: &Gpu,
        x: DevPtr,
        y: DevPtr,
        rows: usize,
        out: OutType,
    ) -> Result<()> {
        match (self.dtype, &self.scale) {
            (WeightDtype::Bf16, None) => gpu
                .linear(
                    x,
                    self.weight.ptr(),
                    y,
                    (rows, self.out, self.inp),
                    out,
                    false,
                )
                .map_err(gpu_err),
            (WeightDtype::Bf16, Some(_)) => Err(Error::Gpu("a bf16 weight has no scale".into())),
        }
    }

    /// One row through the implementation `imp` (load-time tuning: the runner times each and
    /// records the fastest with `Gpu::set_linear_impl`, which [`Linear::forward`] then uses).
    ///
    /// # Safety
    /// `x` and `y` hold one row of `in` / `out` values.
    pub unsafe fn forward_one_row_with(
        &self,
        gpu: &Gpu,
        imp: LinearImpl,
        (x, y): (DevPtr, DevPtr),
        out: OutType,
    ) -> r4b_kernels::Result<()> {
        match self.dtype {
            WeightDtype::Bf16 => {
                gpu.linear_with(imp, x, self.weight.ptr(), y, (1, self.out, self.inp), out)
            }
        }
    }

    /// `y = act(x · Wᵀ + b)`, bf16 (act as in [`Gpu::bias_act`]: 0 none, 1 gelu-tanh, 2 gelu-erf).
    ///
    /// # Safety
    /// As [`Linear::forward`].
    pub unsafe fn forward_bias_act(
        &self,
        gpu: &Gpu,
        x: DevPtr,
        y: DevPtr,
        rows: usize,
        act: i32,
    ) -> Result<()> {
        self.forward(gpu, x, y, rows, OutType::Bf16)?;
        gpu.bias_act(y, self.bias_ptr()?, (rows, self.out), act)
            .map_err(gpu_err)
    }

    /// `res += x · Wᵀ + b` (bf16), through the scratch `tmp` (`rows × out`).
    ///
    /// # Safety
    /// As [`Linear::forward`]; `tmp` and `res` hold `rows × out` values.
    pub unsafe fn forward_residual(
        &self,
        gpu: &Gpu,
        x: DevPtr,
        (tmp, res): (DevPtr, DevPtr),
        rows: usize,
    ) -> Result<()> {
        self.forward(gpu, x, tmp, rows, OutType::Bf16)?;
        gpu.bias_residual(res, tmp, self.bias_ptr()?, (rows, self.out))
            .map_err(gpu_err)
    }

    fn bias_ptr(&self) -> Result<DevPtr> {
        self.bias
            .as_ref()
            .map(|b| b.ptr())
            .ok_or_else(|| Error::Gpu("linear layer loaded without a bias".into()))
    }
}

/// Split by output features (rows of `[out, in]`); the output stays sharded (`[T, out / world]`).
/// Several checkpoint tensors can share one weight (`q | k | v`, `gate | up`).
pub struct ColumnParallelLinear {
    linear: Linear,
}

impl ColumnParallelLinear {
    /// This rank's rows of each `{name}.weight [out_i, in]`, stacked in the order given.
    pub fn load(l: &mut Loader, parts: &[(&str, usize)], inp: usize) -> Result<Self> {
        Ok(ColumnParallelLinear {
            linear: Linear::load_stacked(l, parts, inp, Split::Rows, false)?,
        })
    }

    /// As [`ColumnParallelLinear::load`], with this rank's part of each `{name}.bias`.
    pub fn load_biased(l: &mut Loader, parts: &[(&str, usize)], inp: usize) -> Result<Self> {
        Ok(ColumnParallelLinear {
            linear: Linear::load_stacked(l, parts, inp, Split::Rows, true)?,
        })
    }

    /// `[T, in] -> act([T, out / world] + b)` (bf16; act as in [`Linear::forward_bias_act`]).
    ///
    /// # Safety
    /// As [`Linear::forward`].
    pub unsafe fn forward_bias_act(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        y: DevPtr,
        rows: usize,
        act: i32,
    ) -> Result<()> {
        self.linear.forward_bias_act(ctx.gpu, x, y, rows, act)
    }

    /// The local weight.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// `[T, in] -> [T, out / world]` (bf16).
    ///
    /// # Safety
    /// As [`Linear::forward`].
    pub unsafe fn forward(&self, ctx: &Ctx, x: DevPtr, y: DevPtr, rows: usize) -> Result<()> {
        self.linear.forward(ctx.gpu, x, y, rows, OutType::Bf16)
    }

    /// For a `gate | up` weight `[2F, in]`: `act = silu(x · gateᵀ) · (x · upᵀ)` `[T, F]`, through
    /// `gu` `[T, 2F]` (one fused kernel for a single row, [`Gpu::gate_up_silu`]).
    ///
    /// # Safety
    /// As [`Linear::forward`]; `gu` holds `rows × 2F`, `act` `rows × F` values.
    pub unsafe fn forward_silu_mul(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        (gu, act): (DevPtr, DevPtr),
        rows: usize,
    ) -> Result<()> {
        let (two_f, inp) = self.linear.shape();
        match self.linear.dtype {
            WeightDtype::Bf16 => ctx
                .gpu
                .gate_up_silu(
                    x,
                    self.linear.weight_ptr(),
                    (gu, act),
                    (rows, two_f / 2, inp),
                )
                .map(|_| ())
                .map_err(gpu_err),
        }
    }
}

/// Split by input features (columns of `[out, in]`); the partial products are summed over the
/// group in place.
pub struct RowParallelLinear {
    linear: Linear,
}

impl RowParallelLinear {
    /// This rank's columns of `{name}.weight [out, in]`.
    pub fn load(l: &mut Loader, name: &str, (out, inp): (usize, usize)) -> Result<Self> {
        Ok(RowParallelLinear {
            linear: Linear::load(l, name, (out, inp), Split::Cols, false)?,
        })
    }

    /// As [`RowParallelLinear::load`], with the whole `{name}.bias [out]` on every rank: it is
    /// added once, after the sum.
    pub fn load_biased(l: &mut Loader, name: &str, (out, inp): (usize, usize)) -> Result<Self> {
        let mut linear =
            Linear::load_tensor(l, &format!("{name}.weight"), (out, inp), Split::Cols)?;
        linear.bias = Some(l.upload(&format!("{name}.bias"), &[out], Split::Replicated)?);
        Ok(RowParallelLinear { linear })
    }

    /// `y = act(Σ_ranks x · Wᵀ + b)` `[T, out]` (bf16, the sum in place in `y`).
    ///
    /// # Safety
    /// As [`Linear::forward`].
    pub unsafe fn forward_bias_act(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        y: DevPtr,
        rows: usize,
        act: i32,
    ) -> Result<()> {
        self.linear.forward(ctx.gpu, x, y, rows, OutType::Bf16)?;
        ctx.comm
            .all_reduce_sum_bf16(ctx.gpu, y, rows * self.linear.out)?;
        ctx.gpu
            .bias_act(y, self.linear.bias_ptr()?, (rows, self.linear.out), act)
            .map_err(gpu_err)
    }

    /// `res += Σ_ranks x · Wᵀ + b` (bf16), the sum in the scratch `tmp` (`rows × out`).
    ///
    /// # Safety
    /// As [`Linear::forward`]; `tmp` and `res` hold `rows × out` values.
    pub unsafe fn forward_residual(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        (tmp, res): (DevPtr, DevPtr),
        rows: usize,
    ) -> Result<()> {
        self.linear.forward(ctx.gpu, x, tmp, rows, OutType::Bf16)?;
        ctx.comm
            .all_reduce_sum_bf16(ctx.gpu, tmp, rows * self.linear.out)?;
        ctx.gpu
            .bias_residual(res, tmp, self.linear.bias_ptr()?, (rows, self.linear.out))
            .map_err(gpu_err)
    }

    /// The local weight.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// `[T, in / world] -> [T, out]`, all-reduced in place in `y`; `label` names the product on
    /// the timeline.
    ///
    /// # Safety
    /// As [`Linear::forward`].
    pub unsafe fn forward(
        &self,
        ctx: &Ctx,
        x: DevPtr,
        y: DevPtr,
        rows: usize,
        label: &'static str,
    ) -> Result<()> {
        self.linear.forward(ctx.gpu, x, y, rows, OutType::Bf16)?;
        ctx.mark(label)?;
        ctx.comm
            .all_reduce_sum_bf16(ctx.gpu, y, rows * self.linear.out)?;
        ctx.mark("all-reduce")
    }
}
