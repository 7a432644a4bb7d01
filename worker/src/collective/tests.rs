//! Unit tests: wire format, element helpers, error cases, world size 1, and in-process groups
//! (threads) for protocol mismatches. Multi-process tests live in `tests/collective.rs`.

use std::io::Cursor;
use std::thread;

use super::wire::{self, Header, Op, ReadError};
use super::*;
use candle_core::Device;

fn cpu() -> Device {
    Device::Cpu
}

fn cfg(path: &Path, rank: usize, world_size: usize) -> SocketConfig {
    let timeout = Duration::from_secs(5);
    SocketConfig {
        rendezvous: path.to_path_buf(),
        rank,
        world_size,
        timeout,
    }
}

#[test]
fn tensor_frame_round_trip() {
    let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 7.0, -0.5]], &cpu()).unwrap();
    let mut buf = Vec::new();
    wire::put_tensor_frame(&mut buf, Op::AllReduce, 42, 3, &t).unwrap();
    wire::put_frame(&mut buf, &Header::new(Op::Hello, 0, 0, 5, 8, &[]), b"");
    assert_eq!(buf.len(), 32 + 2 * 8 + 6 * 4 + 32);
    let (mut r, mut payload) = (Cursor::new(&buf), Vec::new());
    let h = wire::read_frame(&mut r, &mut payload).unwrap();
    assert_eq!(h, Header::new(Op::AllReduce, h.dtype, 42, 3, 0, &[2, 3]));
    assert_eq!(wire::code_dtype(h.dtype), Some(DType::F32));
    assert_eq!(&payload[..8], &[0, 0, 0xc0, 0x3f, 0, 0, 0, 0xc0]); // 1.5f32, -2.0f32 LE
    let back = wire::to_tensor(DType::F32, &h.shape, &payload, &cpu(), Op::AllReduce).unwrap();
    let expected = vec![vec![1.5f32, -2.0, 3.25], vec![0.0, 7.0, -0.5]];
    assert_eq!(back.to_vec2::<f32>().unwrap(), expected);
    let hello = wire::read_frame(&mut r, &mut payload).unwrap();
    assert_eq!(hello, Header::new(Op::Hello, 0, 0, 5, 8, &[]));
    assert!(payload.is_empty());
}

#[test]
fn u32_bytes_are_little_endian_and_layout_is_row_major() {
    let t = Tensor::new(&[[1u32, 0x0102_0304], [5, 6]], &cpu())
        .unwrap()
        .t()
        .unwrap();
    let mut bytes = Vec::new();
    wire::append_bytes(&t, &mut bytes, Op::AllGather).unwrap();
    let expected = [1, 0, 0, 0, 5, 0, 0, 0, 4, 3, 2, 1, 6, 0, 0, 0];
    assert_eq!(bytes, expected); // the transpose [[1, 5], [0x01020304, 6]]
    let back = wire::to_tensor(DType::U32, &[2, 2], &bytes, &cpu(), Op::AllGather).unwrap();
    assert_eq!(
        back.to_vec2::<u32>().unwrap(),
        vec![vec![1, 5], vec![0x0102_0304, 6]]
    );
}

#[test]
fn malformed_frames_are_rejected() {
    let t = Tensor::new(&[1u32, 2, 3], &cpu()).unwrap();
    let mut good = Vec::new();
    wire::put_tensor_frame(&mut good, Op::AllGather, 1, 0, &t).unwrap();
    let read = |bytes: &[u8]| wire::read_frame(&mut Cursor::new(bytes), &mut Vec::new());
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    assert!(matches!(read(&bad_magic), Err(ReadError::Bad(m)) if m.contains("magic")));
    let mut bad_op = good.clone();
    bad_op[4] = 99;
    assert!(matches!(read(&bad_op), Err(ReadError::Bad(m)) if m.contains("op 99")));
    let mut bad_dtype = good.clone();
    bad_dtype[5] = 200;
    assert!(matches!(read(&bad_dtype), Err(ReadError::Bad(m)) if m.contains("dtype")));
    let mut bad_len = good.clone();
    bad_len[24] = 8; // payload_len 8 for 3 u32s
    assert!(matches!(read(&bad_len), Err(ReadError::Bad(m)) if m.contains("shape")));
    let truncated = &good[..good.len() - 1];
    let eof = matches!(read(truncated), Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof);
    assert!(eof);
}

#[test]
fn add_into_sums_and_wraps() {
    let (mut acc, mut other) = (Vec::new(), Vec::new());
    let a = Tensor::new(&[1.5f32, -2.0], &cpu()).unwrap();
    let b = Tensor::new(&[0.25f32, 2.0], &cpu()).unwrap();
    wire::append_bytes(&a, &mut acc, Op::AllReduce).unwrap();
    wire::append_bytes(&b, &mut other, Op::AllReduce).unwrap();
    wire::add_into(DType::F32, &mut acc, &other, Op::AllReduce).unwrap();
    let sum = wire::to_tensor(DType::F32, &[2], &acc, &cpu(), Op::AllReduce).unwrap();
    assert_eq!(sum.to_vec1::<f32>().unwrap(), vec![1.75, 0.0]);
    let mut acc = u32::MAX.to_le_bytes().to_vec();
    wire::add_into(DType::U32, &mut acc, &2u32.to_le_bytes(), Op::AllReduce).unwrap();
    assert_eq!(acc, 1u32.to_le_bytes());
}

#[test]
fn io_errors_map_to_typed_errors() {
    let kind = |k: io::ErrorKind| io_error(io::Error::from(k), Op::AllGather, 3);
    let gone = kind(io::ErrorKind::UnexpectedEof);
    assert!(matches!(
        gone,
        CollectiveError::PeerGone {
            rank: 3,
            op: "all_gather"
        }
    ));
    assert_eq!(
        gone.to_string(),
        "all_gather: rank 3 is gone (connection closed)"
    );
    assert!(matches!(
        kind(io::ErrorKind::BrokenPipe),
        CollectiveError::PeerGone { rank: 3, .. }
    ));
    let timeout = kind(io::ErrorKind::WouldBlock);
    assert_eq!(
        timeout.to_string(),
        "all_gather: timed out waiting for rank 3"
    );
    assert!(matches!(
        kind(io::ErrorKind::PermissionDenied),
        CollectiveError::Io { rank: 3, .. }
    ));
}

#[test]
fn abort_frames_carry_the_cause() {
    let frame = abort_frame(&CollectiveError::PeerGone {
        rank: 5,
        op: "broadcast",
    });
    let mut payload = Vec::new();
    let h = wire::read_frame(&mut Cursor::new(&frame), &mut payload).unwrap();
    let e = aborted(&h, &payload, 0, Op::AllReduce);
    assert!(matches!(
        e,
        CollectiveError::PeerGone {
            rank: 5,
            op: "all_reduce_sum"
        }
    ));
    let frame = abort_frame(&protocol("shapes differ".into()));
    let h = wire::read_frame(&mut Cursor::new(&frame), &mut payload).unwrap();
    let e = aborted(&h, &payload, 0, Op::AllGather).to_string();
    assert_eq!(
        e,
        "protocol error: all_gather: rank 0 aborted: protocol error: shapes differ"
    );
}

#[test]
fn config_is_validated() {
    let p = Path::new("/nonexistent/r4b.sock");
    let zero = SocketCollective::connect(&cfg(p, 0, 0));
    assert!(matches!(zero, Err(CollectiveError::InvalidConfig { .. })));
    let rank = SocketCollective::connect(&cfg(p, 2, 2));
    assert!(matches!(
        rank,
        Err(CollectiveError::BadRank {
            rank: 2,
            world_size: 2
        })
    ));
    let no_timeout = SocketConfig {
        timeout: Duration::ZERO,
        ..cfg(p, 0, 2)
    };
    let no_timeout = SocketCollective::connect(&no_timeout);
    assert!(matches!(
        no_timeout,
        Err(CollectiveError::InvalidConfig { .. })
    ));
    let unbindable = SocketCollective::connect(&cfg(p, 0, 2));
    assert!(matches!(
        unbindable,
        Err(CollectiveError::Rendezvous { .. })
    ));
}

#[test]
fn world_one_socket_behaves_like_single_rank() {
    let dir = tempfile::tempdir().unwrap();
    let socket = SocketCollective::connect(&cfg(&dir.path().join("s"), 0, 1)).unwrap();
    let single = SingleRank;
    let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &cpu()).unwrap();
    let f8 = Tensor::zeros(2, DType::F8E4M3, &cpu()).unwrap();
    for c in [&socket as &dyn Collective, &single] {
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let sum = c.all_reduce_sum(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(sum, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        let parts = c.all_gather(&t).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].to_vec2::<f32>().unwrap(), sum);
        assert_eq!(c.broadcast(&t, 0).unwrap().to_vec2::<f32>().unwrap(), sum);
        let root = c.broadcast(&t, 1);
        assert!(matches!(
            root,
            Err(CollectiveError::BadRank {
                rank: 1,
                world_size: 1
            })
        ));
        let dtype = c.all_reduce_sum(&f8);
        assert!(
            matches!(dtype, Err(CollectiveError::UnsupportedDtype { .. })),
            "{dtype:?}"
        );
        assert!(
            c.all_gather(&t).is_ok(),
            "errors do not poison a single rank"
        );
    }
}

/// Runs `f(rank, collective)` on `world` threads of one process (quick protocol checks).
fn threads<T: Send + 'static>(world: usize, f: fn(usize, SocketCollective) -> T) -> Vec<T> {
    let dir = tempfile::tempdir().unwrap();
    threads_at(&dir.path().join("rdv.sock"), world, f)
}

fn threads_at<T: Send + 'static>(
    path: &Path,
    world: usize,
    f: fn(usize, SocketCollective) -> T,
) -> Vec<T> {
    let handles: Vec<_> = (0..world)
        .map(|r| {
            let cfg = cfg(path, r, world);
            thread::spawn(move || f(r, SocketCollective::connect(&cfg).unwrap()))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn threads_sum_in_rank_order() {
    let out = threads(3, |r, c| {
        let t = Tensor::new(&[r as f32 + 0.5, 10.0 * r as f32], &cpu()).unwrap();
        c.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap()
    });
    assert_eq!(out, vec![vec![4.5, 30.0]; 3]);
}

#[test]
fn mismatched_shapes_dtypes_and_roots_are_protocol_errors() {
    let shapes = threads(3, |r, c| {
        let t = Tensor::zeros(if r == 2 { 4 } else { 3 }, DType::F32, &cpu()).unwrap();
        let first = c.all_reduce_sum(&t).map(|_| ());
        (first, c.all_reduce_sum(&t).map(|_| ()))
    });
    for (r, (first, second)) in shapes.into_iter().enumerate() {
        assert!(
            matches!(first, Err(CollectiveError::Protocol(_))),
            "rank {r}: {first:?}"
        );
        assert!(
            matches!(second, Err(CollectiveError::Poisoned { .. })),
            "rank {r}"
        );
    }
    let dtypes = threads(2, |r, c| {
        let dtype = if r == 0 { DType::F32 } else { DType::U32 };
        c.all_gather(&Tensor::zeros(2, dtype, &cpu()).unwrap())
            .map(|_| ())
    });
    assert!(
        dtypes
            .iter()
            .all(|e| matches!(e, Err(CollectiveError::Protocol(_)))),
        "{dtypes:?}"
    );
    let roots = threads(2, |r, c| {
        c.broadcast(&Tensor::zeros(2, DType::F32, &cpu()).unwrap(), r)
            .map(|_| ())
    });
    assert!(
        roots
            .iter()
            .all(|e| matches!(e, Err(CollectiveError::Protocol(_)))),
        "{roots:?}"
    );
}

#[test]
fn world_size_mismatch_fails_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rdv.sock");
    let hub = thread::spawn({
        let cfg = cfg(&path, 0, 2);
        move || SocketCollective::connect(&cfg).map(|_| ())
    });
    let spoke = SocketCollective::connect(&cfg(&path, 1, 3));
    let hub = hub.join().unwrap();
    assert!(matches!(hub, Err(CollectiveError::Protocol(_))), "{hub:?}");
    assert!(
        matches!(spoke, Err(CollectiveError::Protocol(_))),
        "{spoke:?}"
    );
}

#[test]
fn too_many_dims_is_an_error() {
    let t = Tensor::zeros(vec![1usize; 17], DType::F32, &cpu()).unwrap();
    let e = SingleRank.all_reduce_sum(&t);
    assert!(matches!(e, Err(CollectiveError::Protocol(m)) if m.contains("17 dims")));
}

#[test]
fn stale_socket_is_replaced_but_other_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rdv.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves a stale socket file behind
    let out = threads_at(&path, 2, |r, c| {
        c.all_gather(&Tensor::new(&[r as u32], &cpu()).unwrap())
            .unwrap()
            .len()
    });
    assert_eq!(out, vec![2, 2]);
    assert!(
        !path.exists(),
        "rank 0 removes the rendezvous socket once the group is formed"
    );
    std::fs::write(&path, b"not a socket").unwrap();
    let hub = SocketCollective::connect(&SocketConfig {
        timeout: Duration::from_millis(50),
        ..cfg(&path, 0, 2)
    });
    assert!(
        matches!(hub, Err(CollectiveError::Rendezvous { .. })),
        "{hub:?}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}
