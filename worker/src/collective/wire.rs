//! Wire format of [`SocketCollective`](super::SocketCollective) messages and the byte-level tensor
//! helpers (encode, decode, rank-order sum).
//!
//! A frame is a 32-byte little-endian header, `ndim` u64 dims, then `payload_len` bytes:
//! `magic u32 | op u8 | dtype u8 | ndim u16 | seq u64 | aux u32 | aux2 u32 | payload_len u64`.
//! `dtype` 0 means "no tensor" (hello, abort); otherwise the payload must be exactly
//! `prod(dims) * dtype size` bytes of little-endian elements in row-major order.

use std::io::{self, Read};

use candle_core::{DType, Device, Tensor, WithDType};
use half::{bf16, f16};

use super::CollectiveError;
use DType::*;

/// "R4B" plus protocol version 1.
pub(super) const MAGIC: u32 = u32::from_le_bytes([b'R', b'4', b'B', 1]);
const FIXED: usize = 32;
const MAX_NDIM: usize = 16;
const MAX_PAYLOAD: u64 = 1 << 36;

/// The kind of a frame; doubles as the op tag checked on every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Hello = 1,
    AllReduce = 2,
    AllGather = 3,
    Broadcast = 4,
    Abort = 5,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        [
            Op::Hello,
            Op::AllReduce,
            Op::AllGather,
            Op::Broadcast,
            Op::Abort,
        ]
        .into_iter()
        .find(|op| *op as u8 == v)
    }

    /// The name used in error messages.
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Hello => "connect",
            Op::AllReduce => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Abort => "abort",
        }
    }
}

/// A decoded frame header (the payload is read into a caller-owned buffer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    pub op: Op,
    pub dtype: u8,
    pub seq: u64,
    pub aux: u32,
    pub aux2: u32,
    pub shape: Vec<usize>,
}

impl Header {
    /// A header; `aux`/`aux2` carry the rank, root, gather part or abort kind, depending on `op`.
    pub(super) fn new(op: Op, dtype: u8, seq: u64, aux: u32, aux2: u32, shape: &[usize]) -> Self {
        Header {
            op,
            dtype,
            seq,
            aux,
            aux2,
            shape: shape.to_vec(),
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(super) enum ReadError {
    Io(io::Error),
    Bad(String),
}

fn bad(message: String) -> ReadError {
    ReadError::Bad(message)
}

/// Appends a frame whose payload is `payload`.
pub(super) fn put_frame(out: &mut Vec<u8>, h: &Header, payload: &[u8]) {
    put_header(out, h, payload.len());
    out.extend_from_slice(payload);
}

fn put_header(out: &mut Vec<u8>, h: &Header, payload_len: usize) {
    out.reserve(FIXED + 8 * h.shape.len() + payload_len);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(h.op as u8);
    out.push(h.dtype);
    out.extend_from_slice(&(h.shape.len() as u16).to_le_bytes());
    out.extend_from_slice(&h.seq.to_le_bytes());
    out.extend_from_slice(&h.aux.to_le_bytes());
    out.extend_from_slice(&h.aux2.to_le_bytes());
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    for d in &h.shape {
        out.extend_from_slice(&(*d as u64).to_le_bytes());
    }
}

/// Appends a frame carrying `t` (shape, dtype, little-endian bytes).
pub(super) fn put_tensor_frame(
    out: &mut Vec<u8>,
    op: Op,
    seq: u64,
    aux: u32,
    t: &Tensor,
) -> Result<(), CollectiveError> {
    let dtype = check_tensor(t, op)?;
    let h = Header::new(op, dtype, seq, aux, 0, t.dims());
    put_header(out, &h, t.elem_count() * t.dtype().size_in_bytes());
    append_bytes(t, out, op)
}

/// Reads one frame; its payload replaces the contents of `payload`.
pub(super) fn read_frame<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Header, ReadError> {
    let mut fixed = [0u8; FIXED];
    r.read_exact(&mut fixed).map_err(ReadError::Io)?;
    let u32_at =
        |i: usize| u32::from_le_bytes([fixed[i], fixed[i + 1], fixed[i + 2], fixed[i + 3]]);
    let u64_at = |b: &[u8], i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    if u32_at(0) != MAGIC {
        return Err(bad(format!("bad magic {:#010x}", u32_at(0))));
    }
    let op = Op::from_u8(fixed[4]).ok_or_else(|| bad(format!("unknown op {}", fixed[4])))?;
    let dtype = fixed[5];
    let ndim = u16::from_le_bytes([fixed[6], fixed[7]]) as usize;
    let payload_len = u64_at(&fixed, 24);
    if ndim > MAX_NDIM || payload_len > MAX_PAYLOAD {
        return Err(bad(format!(
            "implausible frame: {ndim} dims, {payload_len} bytes"
        )));
    }
    let mut dims = [0u8; 8 * MAX_NDIM];
    r.read_exact(&mut dims[..8 * ndim]).map_err(ReadError::Io)?;
    let shape: Vec<usize> = (0..ndim).map(|i| u64_at(&dims, 8 * i) as usize).collect();
    if dtype != 0 {
        let size = code_dtype(dtype)
            .ok_or_else(|| bad(format!("unknown dtype code {dtype}")))?
            .size_in_bytes();
        let expected = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64));
        if expected != Some(payload_len) {
            return Err(bad(format!(
                "shape {shape:?} does not match {payload_len} payload bytes"
            )));
        }
    }
    payload.clear();
    payload.resize(payload_len as usize, 0);
    r.read_exact(payload).map_err(ReadError::Io)?;
    let (seq, aux, aux2) = (u64_at(&fixed, 8), u32_at(16), u32_at(20));
    Ok(Header {
        shape,
        ..Header::new(op, dtype, seq, aux, aux2, &[])
    })
}

/// An element type the collectives move and sum (integers wrap on overflow).
trait Elem: WithDType {
    const SIZE: usize;
    fn get(b: &[u8]) -> Self;
    fn put(self, b: &mut [u8]);
    fn sum(self, o: Self) -> Self;
}

macro_rules! elem {
    ($t:ty, $n:expr, $sum:expr) => {
        impl Elem for $t {
            const SIZE: usize = $n;
            fn get(b: &[u8]) -> Self {
                let mut a = [0u8; $n];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            fn put(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_le_bytes())
            }
            fn sum(self, o: Self) -> Self {
                $sum(self, o)
            }
        }
    };
}
elem!(u8, 1, u8::wrapping_add);
elem!(u32, 4, u32::wrapping_add);
elem!(i16, 2, i16::wrapping_add);
elem!(i32, 4, i32::wrapping_add);
elem!(i64, 8, i64::wrapping_add);
elem!(f16, 2, |a: f16, b: f16| a + b);
elem!(bf16, 2, |a: bf16, b: bf16| a + b);
elem!(f32, 4, |a: f32, b: f32| a + b);
elem!(f64, 8, |a: f64, b: f64| a + b);

/// Calls `$f::<T>($args)` with `T` the element type of `$dtype` (unsupported dtype: error).
macro_rules! with_elem {
    ($dtype:expr, $op:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::U8 => $f::<u8>($($arg),*),
            DType::U32 => $f::<u32>($($arg),*),
            DType::I16 => $f::<i16>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            dtype => Err(CollectiveError::UnsupportedDtype { dtype, op: $op.name() }),
        }
    };
}

const CODES: [DType; 9] = [U8, U32, I16, I32, I64, F16, BF16, F32, F64];

/// The wire code (1..) of a supported dtype.
fn dtype_code(dtype: DType, op: Op) -> Result<u8, CollectiveError> {
    match CODES.iter().position(|d| *d == dtype) {
        Some(i) => Ok(i as u8 + 1),
        None => Err(CollectiveError::UnsupportedDtype {
            dtype,
            op: op.name(),
        }),
    }
}

/// Checks that `t` can be sent (supported dtype, at most 16 dims); returns its dtype's wire code.
pub(super) fn check_tensor(t: &Tensor, op: Op) -> Result<u8, CollectiveError> {
    if t.rank() > MAX_NDIM {
        let m = format!(
            "{}: {} dims, at most {MAX_NDIM} are supported",
            op.name(),
            t.rank()
        );
        return Err(CollectiveError::Protocol(m));
    }
    dtype_code(t.dtype(), op)
}

/// The dtype of a wire code.
pub(super) fn code_dtype(code: u8) -> Option<DType> {
    CODES.get((code as usize).checked_sub(1)?).copied()
}

/// Appends the row-major little-endian bytes of `t` (any layout) to `out`.
pub(super) fn append_bytes(t: &Tensor, out: &mut Vec<u8>, op: Op) -> Result<(), CollectiveError> {
    fn go<T: Elem>(t: &Tensor, out: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let values = t.flatten_all()?.to_vec1::<T>()?;
        let start = out.len();
        out.resize(start + values.len() * T::SIZE, 0);
        for (chunk, v) in out[start..].chunks_exact_mut(T::SIZE).zip(values) {
            v.put(chunk);
        }
        Ok(())
    }
    with_elem!(t.dtype(), op, go(t, out))
}

/// Builds a tensor of `dtype` and `shape` from little-endian bytes.
pub(super) fn to_tensor(
    dtype: DType,
    shape: &[usize],
    bytes: &[u8],
    device: &Device,
    op: Op,
) -> Result<Tensor, CollectiveError> {
    fn go<T: Elem>(
        shape: &[usize],
        bytes: &[u8],
        device: &Device,
    ) -> Result<Tensor, CollectiveError> {
        if cfg!(target_endian = "little") {
            // The wire bytes are already in memory order: one copy, no per-element work.
            return Ok(Tensor::from_raw_buffer(bytes, T::DTYPE, shape, device)?);
        }
        let values: Vec<T> = bytes.chunks_exact(T::SIZE).map(T::get).collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }
    with_elem!(dtype, op, go(shape, bytes, device))
}

/// `acc[i] = acc[i] + other[i]` element-wise (both little-endian bytes of `dtype`).
pub(super) fn add_into(
    dtype: DType,
    acc: &mut [u8],
    other: &[u8],
    op: Op,
) -> Result<(), CollectiveError> {
    fn go<T: Elem>(acc: &mut [u8], other: &[u8]) -> Result<(), CollectiveError> {
        for (a, b) in acc
            .chunks_exact_mut(T::SIZE)
            .zip(other.chunks_exact(T::SIZE))
        {
            T::get(a).sum(T::get(b)).put(a);
        }
        Ok(())
    }
    with_elem!(dtype, op, go(acc, other))
}
