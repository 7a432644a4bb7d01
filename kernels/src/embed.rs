//! Embedding family (`embed.cu`): the vocab-parallel token embedding gather, row scatter/gather
//! (image rows into the sequence, selected rows out of it), and SigLIP's patch im2col and
//! position add.
use crate::launch::{grid1, i, kernel_set, KernelArg};
use crate::{DevPtr, Gpu, Result};

kernel_set! {
    /// The embedding kernels.
    struct Kernels { embed_gather, scatter_rows, gather_rows, im2col_patches, add_pos_embed }
}

/// The two row copies, `scatter_rows` and `gather_rows`: the same launcher but for the kernel
/// and the name of the i32 index argument (`n` rows of `hidden` bf16, one CTA per row).
macro_rules! row_copy {
    ($(#[$doc:meta])* $name:ident($index:ident)) => {
        $(#[$doc])*
        pub unsafe fn $name(
            &self,
            $index: DevPtr,
            src: DevPtr,
            out: DevPtr,
            n: usize,
            hidden: usize,
        ) -> Result<()> {
            let args: [&dyn KernelArg; 4] = [&$index, &src, &out, &i(hidden)];
            self.launch_row_ctas(&self.kernels.embed.$name, n, 128, &args)
        }
    };
}

impl Gpu {
    /// `out[t] = table[ids[t] − start]` for owned ids, else zeros (i32 ids).
    pub unsafe fn embed_gather(
        &self,
        ids: DevPtr,
        table: DevPtr,
        out: DevPtr,
        tokens: usize,
        hidden: usize,
        (start, rows): (usize, usize),
    ) -> Result<()> {
        let args: [&dyn KernelArg; 6] = [&ids, &table, &out, &i(hidden), &i(start), &i(rows)];
        self.launch_row_ctas(&self.kernels.embed.embed_gather, tokens, 128, &args)
    }

    row_copy!(
        /// `out[dst[i]] = src[i]` for `n` rows (i32 `dst`).
        scatter_rows(dst)
    );
    row_copy!(
        /// `out[i] = src[idx[i]]` for `n` rows (i32 `idx`).
        gather_rows(idx)
    );

    /// f32 pixels `[V, 3, S, S]` → bf16 patch rows `[V·(S/P)², 3·P·P]`.
    pub unsafe fn im2col_patches(
        &self,
        px: DevPtr,
        out: DevPtr,
        views: usize,
        (s, p): (usize, usize),
    ) -> Result<()> {
        let n = s / p;
        if views == 0 || n == 0 {
            return Ok(());
        }
        let args: [&dyn KernelArg; 4] = [&px, &out, &i(s), &i(p)];
        let cfg = grid1(views * n * n, 256);
        self.launch(&self.kernels.embed.im2col_patches, cfg, &args)
    }

    /// `x[r] = x[r] + b + pos[r % n]`.
    pub unsafe fn add_pos_embed(
        &self,
        x: DevPtr,
        (b, pos): (DevPtr, DevPtr),
        (rows, d, n): (usize, usize, usize),
    ) -> Result<()> {
        let args: [&dyn KernelArg; 5] = [&x, &b, &pos, &i(d), &i(n)];
        self.launch_row_threads(&self.kernels.embed.add_pos_embed, (rows, d), &args)
    }
}
