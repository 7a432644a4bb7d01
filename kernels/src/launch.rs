//! The one launch path every family's launchers share: [`Launch`] (a kernel launch through
//! `cuLaunchKernelEx`, with the programmatic-dependent-launch attribute when it is on),
//! [`KernelArg`] (the value types a kernel takes) and the grid helpers.
use std::ffi::c_void;

use cudarc::driver::{CudaFunction, LaunchConfig};

use crate::{Gpu, Result};

/// A kernel launch through `cuLaunchKernelEx`: the arguments as pointers to their values, and the
/// programmatic-dependent-launch attribute when the GPU has it on (see `PDL_WAIT` in
/// common.cuh).
pub struct Launch<'a> {
    gpu: &'a Gpu,
    func: &'a CudaFunction,
    args: Vec<*mut c_void>,
}

impl<'a> Launch<'a> {
    /// Appends one kernel argument (kept borrowed until the launch).
    pub fn arg<T: Copy>(mut self, v: &'a T) -> Self {
        self.args.push(v as *const T as *mut c_void);
        self
    }

    /// Enqueues the kernel on the GPU's stream.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// pointer among them must be valid for what the kernel does with it.
    pub unsafe fn launch(mut self, cfg: LaunchConfig) -> Result<()> {
        use cudarc::driver::sys as cu;
        self.gpu.ctx.bind_to_thread()?;
        let pdl = self.gpu.pdl_on();
        // SAFETY: plain-old-data C structs; zero is a valid starting value.
        let mut attr: cu::CUlaunchAttribute = std::mem::zeroed();
        attr.id = cu::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = cu::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.gpu.stream.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: u32::from(pdl),
        };
        cu::cuLaunchKernelEx(
            &config,
            self.func.cu_function(),
            self.args.as_mut_ptr(),
            std::ptr::null_mut(),
        )
        .result()?;
        Ok(())
    }
}

/// A value a kernel takes as a parameter: a device address (`u64`), a C `int` (`i32`), a
/// `long long` (`i64`) or a `float` (`f32`). Only these: a `usize` where the kernel reads an
/// `int` would not compile (convert with [`i`]).
pub(crate) trait KernelArg {
    /// The address of the value, as `cuLaunchKernelEx` takes it.
    fn as_arg(&self) -> *mut c_void;
}

macro_rules! kernel_arg {
    ($($t:ty),*) => {$(
        impl KernelArg for $t {
            fn as_arg(&self) -> *mut c_void {
                self as *const $t as *mut c_void
            }
        }
    )*};
}
kernel_arg!(u64, i32, i64, f32);

impl Gpu {
    /// Starts a launch of `func` on this GPU's stream (see [`Launch`]).
    pub fn launch_builder<'a>(&'a self, func: &'a CudaFunction) -> Launch<'a> {
        Launch {
            gpu: self,
            func,
            args: Vec::with_capacity(24),
        }
    }

    /// Launches `func` over `cfg` with `args`, in the kernel's parameter order: the path every
    /// launcher of this crate takes.
    ///
    /// # Safety
    /// As [`Launch::launch`].
    pub(crate) unsafe fn launch(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        let mut l = self.launch_builder(func);
        l.args.extend(args.iter().map(|a| a.as_arg()));
        l.launch(cfg)
    }

    /// One CTA of `block` threads per row: `rows` CTAs, no launch when there are none.
    pub(crate) unsafe fn launch_row_ctas(
        &self,
        func: &CudaFunction,
        rows: usize,
        block: u32,
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        self.launch(func, grid1(rows, block), args)
    }

    /// One thread per value of `rows` rows of `d`: `(⌈d / 256⌉, rows)` CTAs of 256 threads, no
    /// launch when there are no rows.
    pub(crate) unsafe fn launch_row_threads(
        &self,
        func: &CudaFunction,
        (rows, d): (usize, usize),
        args: &[&dyn KernelArg],
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        self.launch(func, grid2(d.div_ceil(256), rows, 256), args)
    }
}

/// Declares a family's kernel handles, one field per kernel named as in the module, and their
/// `load` from it.
macro_rules! kernel_set {
    ($(#[$m:meta])* struct $name:ident { $($f:ident),* $(,)? }) => {
        $(#[$m])*
        pub(crate) struct $name {
            $($f: cudarc::driver::CudaFunction,)*
        }

        impl $name {
            pub(crate) fn load(
                m: &std::sync::Arc<cudarc::driver::CudaModule>,
            ) -> $crate::Result<Self> {
                Ok($name {
                    $($f: m.load_function(stringify!($f))?,)*
                })
            }
        }
    };
}
pub(crate) use kernel_set;

/// A launch of a `(x, y, z)` grid of `block`-thread CTAs with `smem` bytes of dynamic shared
/// memory.
pub(crate) fn grid(dims: (usize, usize, usize), block: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dims.0 as u32, dims.1 as u32, dims.2 as u32),
        block_dim: (block, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// `n` CTAs of `block` threads.
pub(crate) fn grid1(n: usize, block: u32) -> LaunchConfig {
    grid((n, 1, 1), block, 0)
}

/// An `x × y` grid of `block`-thread CTAs.
pub(crate) fn grid2(x: usize, y: usize, block: u32) -> LaunchConfig {
    grid((x, y, 1), block, 0)
}

/// A count as the kernels' C `int`.
pub(crate) fn i(v: usize) -> i32 {
    v as i32
}
