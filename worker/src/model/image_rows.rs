//! Where an image's `<image>` rows live between its encoding and the last prefill chunk that
//! reads them.
//!
//! Each engine keeps the rows where it computed them: the CPU reference as a host tensor
//! ([`ImageRows::Host`]), the GPU engine in device memory it owns ([`ImageRows::Device`], freed
//! when dropped; no copy to the host and back). The worker keeps a sequence's images until the
//! sequence is released, and a step's chunk names the rows it needs as ranges of them
//! ([`ChunkImageRows::select`]): a chunk may start in the middle of an image, or span two.

use candle_core::Tensor;

use crate::{Error, Result};

/// One image's `<image>` rows `[n, hidden]`, where its engine keeps them.
#[derive(Debug)]
pub enum ImageRows {
    /// A host tensor (the CPU reference engine).
    Host(Tensor),
    /// bf16 rows in GPU memory owned by the GPU engine (counted against its image budget until
    /// dropped).
    #[cfg(feature = "cuda")]
    Device(crate::gpu::DeviceImage),
}

impl ImageRows {
    /// Number of rows.
    pub fn rows(&self) -> Result<usize> {
        match self {
            ImageRows::Host(t) => Ok(t.dim(0)?),
            #[cfg(feature = "cuda")]
            ImageRows::Device(d) => Ok(d.rows()),
        }
    }
}

impl From<Tensor> for ImageRows {
    fn from(t: Tensor) -> Self {
        ImageRows::Host(t)
    }
}

/// Rows `start..start + len` of one image.
#[derive(Clone, Copy, Debug)]
pub struct ImageRange<'a> {
    pub image: &'a ImageRows,
    pub start: usize,
    pub len: usize,
}

/// The rows of one chunk's `<image>` tokens, in order: `[count, hidden]`.
#[derive(Clone, Debug)]
pub enum ChunkImageRows<'a> {
    /// Host rows (the CPU engine's greedy driver, tests).
    Host(Tensor),
    /// Ranges of the sequence's images laid end to end (what the worker's service hands a
    /// step; the rows stay where their engine keeps them).
    Ranges(Vec<ImageRange<'a>>),
}

impl From<Tensor> for ChunkImageRows<'_> {
    fn from(t: Tensor) -> Self {
        ChunkImageRows::Host(t)
    }
}

impl<'a> ChunkImageRows<'a> {
    /// Every row of `image`.
    pub fn whole(image: &'a ImageRows) -> Result<Self> {
        Ok(ChunkImageRows::Ranges(vec![ImageRange {
            image,
            start: 0,
            len: image.rows()?,
        }]))
    }

    /// Rows `off..off + n` of `images` laid end to end (one range per image it touches).
    pub fn select(images: &'a [ImageRows], off: usize, n: usize) -> Result<Self> {
        let mut ranges = Vec::new();
        let (mut start, end) = (off, off + n);
        let mut base = 0;
        for image in images {
            let len = image.rows()?;
            if start < base + len && start < end {
                let take = (base + len).min(end) - start;
                ranges.push(ImageRange {
                    image,
                    start: start - base,
                    len: take,
                });
                start += take;
            }
            base += len;
        }
        if start < end {
            return Err(Error::Step(format!(
                "chunk needs image rows {off}..{end} of {base}"
            )));
        }
        Ok(ChunkImageRows::Ranges(ranges))
    }

    /// Number of rows.
    pub fn rows(&self) -> Result<usize> {
        match self {
            ChunkImageRows::Host(t) => Ok(t.dim(0)?),
            ChunkImageRows::Ranges(r) => Ok(r.iter().map(|r| r.len).sum()),
        }
    }

    /// The rows as one host tensor `[count, hidden]` (the CPU engine's view): a narrow of one
    /// image's tensor when the chunk lies inside it, else the pieces concatenated. Rows an
    /// engine keeps on the GPU are refused.
    pub fn to_host(&self) -> Result<Tensor> {
        let ranges = match self {
            ChunkImageRows::Host(t) => return Ok(t.clone()),
            ChunkImageRows::Ranges(r) => r,
        };
        let mut pieces = Vec::with_capacity(ranges.len());
        for r in ranges {
            match r.image {
                ImageRows::Host(t) => pieces.push(t.narrow(0, r.start, r.len)?),
                #[cfg(feature = "cuda")]
                ImageRows::Device(_) => {
                    return Err(Error::Step(
                        "image rows on the GPU handed to the CPU engine".into(),
                    ))
                }
            }
        }
        Ok(match pieces.len() {
            1 => pieces.remove(0),
            _ => Tensor::cat(&pieces, 0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn image(rows: usize, first: f32) -> ImageRows {
        let v: Vec<f32> = (0..rows * 2).map(|i| first + i as f32).collect();
        ImageRows::Host(Tensor::from_vec(v, (rows, 2), &Device::Cpu).expect("tensor"))
    }

    #[test]
    fn a_chunk_may_start_inside_an_image_and_span_the_next() {
        let images = [image(3, 0.0), image(4, 100.0)];
        let c = ChunkImageRows::select(&images, 2, 3).expect("select");
        let ChunkImageRows::Ranges(r) = &c else {
            panic!("ranges")
        };
        let spans: Vec<(usize, usize)> = r.iter().map(|r| (r.start, r.len)).collect();
        assert_eq!(spans, [(2, 1), (0, 2)]);
        assert_eq!(c.rows().expect("rows"), 3);
        let host = c
            .to_host()
            .expect("host")
            .to_dtype(DType::F32)
            .expect("f32");
        assert_eq!(
            host.to_vec2::<f32>().expect("vec"),
            [[4.0, 5.0], [100.0, 101.0], [102.0, 103.0]]
        );
        // Inside one image: that image's rows.
        let c = ChunkImageRows::select(&images, 4, 2).expect("select");
        let host = c.to_host().expect("host").to_vec2::<f32>().expect("vec");
        assert_eq!(host, [[102.0, 103.0], [104.0, 105.0]]);
    }

    #[test]
    fn rows_past_the_images_are_an_error() {
        let images = [image(3, 0.0)];
        assert!(ChunkImageRows::select(&images, 2, 2).is_err());
        assert!(ChunkImageRows::select(&images, 0, 3).is_ok());
    }
}
