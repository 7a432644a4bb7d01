//! Collective operations across the ranks of one tensor-parallel group.
//!
//! Design:
//! - [`Collective`] is what the CPU parallel layers call, on host tensors. [`SingleRank`] is TP=1
//!   (identity, no communication); [`SocketCollective`] connects separate OS processes on one
//!   machine over Unix domain sockets (CI, tests, CPU serving). The GPU engine's collectives work
//!   in place on device buffers and must stay capturable in CUDA graphs, so they are a second
//!   trait, `DeviceCollective` (`device.rs`, feature `cuda`: `Solo` and NCCL).
//! - Star topology through rank 0: every other rank holds one connection to rank 0 (the hub), and
//!   each operation is one round trip: every spoke sends its tensor, the hub combines and sends the
//!   result back. With a handful of ranks on one host the hub is not a bandwidth bottleneck, and a
//!   star keeps the protocol and the failure handling small (one place sees every rank).
//! - Deterministic sums: the hub adds in rank order `((t0 + t1) + t2) + ...` and sends the very same
//!   bytes to every rank, so all ranks hold bit-identical activations whatever the arrival order;
//!   replicated state never drifts between ranks and runs are reproducible.
//! - Every frame carries an op tag and a per-group sequence number: a rank that runs a different
//!   operation (or dtype, shape, root) than the hub gets a [`CollectiveError::Protocol`] error
//!   instead of silently mixing data.
//! - Failures never hang: every socket read and write has the configured timeout, a closed
//!   connection is [`CollectiveError::PeerGone`], and the hub forwards a failure to all spokes
//!   (abort frame) so they fail promptly with the same cause. Any error leaves a multi-rank group
//!   unusable (later calls return [`CollectiveError::Poisoned`]): the ranks may be out of step, so
//!   the group has to be rebuilt.

#[cfg(feature = "cuda")]
mod device;
mod wire;

#[cfg(feature = "cuda")]
pub use device::{DeviceCollective, Group, IpcCollective, NcclCollective, Solo};

use std::io::{self, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use wire::{Header, Op, ReadError};

/// Collective operations across the ranks of one tensor-parallel group.
pub trait Collective: Send + Sync + std::fmt::Debug {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;
    /// The number of ranks in the group.
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks; every rank gets the identical result (bit for bit):
    /// the sum is taken in rank order ((t0 + t1) + t2) + ... on one place and sent back.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Every rank's tensor in rank order; shapes may differ between ranks (dtype must match).
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, CollectiveError>;
    /// The root's tensor, on every rank (non-root ranks' input is ignored except for dtype).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError>;
}

/// Errors of collective operations; each names the operation and the rank concerned.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The configuration cannot form a group (world size 0, zero timeout, ...).
    #[error("invalid collective config: {reason}")]
    InvalidConfig { reason: String },
    /// A rank (own rank or broadcast root) is not below the world size.
    #[error("rank {rank} is out of range for world size {world_size}")]
    BadRank { rank: usize, world_size: usize },
    /// The rendezvous socket could not be prepared, bound or connected.
    #[error("rendezvous socket {path}: {source}")]
    Rendezvous { path: PathBuf, source: io::Error },
    /// A peer closed its connection (its process exited or gave up).
    #[error("{op}: rank {rank} is gone (connection closed)")]
    PeerGone { rank: usize, op: &'static str },
    /// A peer sent nothing (or accepted nothing) within the timeout.
    #[error("{op}: timed out waiting for rank {rank}")]
    Timeout { rank: usize, op: &'static str },
    /// Ranks disagree on the operation, sequence, dtype, shape or root, or a frame is malformed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The tensor's dtype cannot be sent.
    #[error("{op}: dtype {dtype:?} is not supported")]
    UnsupportedDtype { dtype: DType, op: &'static str },
    /// Another I/O error on the connection to a rank.
    #[error("{op}: I/O error with rank {rank}: {source}")]
    Io {
        op: &'static str,
        rank: usize,
        source: io::Error,
    },
    /// A tensor operation (copy, reshape) failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// A device collective (NCCL) failed.
    #[error("{op} on the GPU: {reason}")]
    Device { op: &'static str, reason: String },
    /// An earlier error left this group unusable.
    #[error("collective group is unusable after an earlier error: {reason}")]
    Poisoned { reason: String },
}

type Res<T> = Result<T, CollectiveError>;

/// World size 1: every operation is the identity (no communication).
#[derive(Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Res<Tensor> {
        identity(t, Op::AllReduce)
    }
    fn all_gather(&self, t: &Tensor) -> Res<Vec<Tensor>> {
        Ok(vec![identity(t, Op::AllGather)?])
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Res<Tensor> {
        check_rank(root, 1)?;
        identity(t, Op::Broadcast)
    }
}

/// The single-rank result: the input itself, after the same dtype check a group does.
fn identity(t: &Tensor, op: Op) -> Res<Tensor> {
    wire::check_tensor(t, op)?;
    Ok(t.clone())
}

fn check_rank(rank: usize, world_size: usize) -> Res<()> {
    match rank < world_size {
        true => Ok(()),
        false => Err(CollectiveError::BadRank { rank, world_size }),
    }
}

/// Where and how the ranks of a group meet.
#[derive(Clone, Debug)]
pub struct SocketConfig {
    /// Unix socket path that rank 0 binds (a stale socket there is removed) and the others connect
    /// to; rank 0 removes it again once the group is formed.
    pub rendezvous: PathBuf,
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// The number of ranks (processes) in the group.
    pub world_size: usize,
    /// Bound on forming the group in [`SocketCollective::connect`], and on every blocking socket
    /// read or write of an operation (so it must exceed the skew between ranks reaching an op).
    pub timeout: Duration,
}

/// CPU collective over Unix domain sockets between processes (rank 0 is the hub).
pub struct SocketCollective {
    rank: usize,
    world_size: usize,
    state: Mutex<State>,
}

impl std::fmt::Debug for SocketCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketCollective")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

/// One connection to another rank; reads are buffered, each message is written with one call.
struct Link {
    rank: usize,
    stream: BufReader<UnixStream>,
}

enum Role {
    Alone,
    Hub(Vec<Link>),
    Spoke(Link),
    Failed(String),
}

struct State {
    rank: usize,
    world: usize,
    seq: u64,
    role: Role,
    /// Encoded outgoing message(s), reused between calls.
    out: Vec<u8>,
    /// Received payloads (hub: one per rank; index 0 holds the accumulator), reused between calls.
    bufs: Vec<Vec<u8>>,
}

fn io_error(e: io::Error, op: Op, rank: usize) -> CollectiveError {
    use io::ErrorKind::*;
    let op = op.name();
    match e.kind() {
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted | NotConnected => {
            CollectiveError::PeerGone { rank, op }
        }
        WouldBlock | TimedOut => CollectiveError::Timeout { rank, op },
        _ => CollectiveError::Io {
            op,
            rank,
            source: e,
        },
    }
}

fn header(op: Op, dtype: u8, seq: u64, aux: usize, shape: &[usize]) -> Header {
    Header::new(op, dtype, seq, aux as u32, 0, shape)
}

fn protocol(message: String) -> CollectiveError {
    CollectiveError::Protocol(message)
}

/// An abort frame carrying `e`: kind 1 = peer gone, 2 = timeout (with the culprit rank), else text.
fn abort_frame(e: &CollectiveError) -> Vec<u8> {
    let (aux, aux2) = match e {
        CollectiveError::PeerGone { rank, .. } => (1, *rank as u32),
        CollectiveError::Timeout { rank, .. } => (2, *rank as u32),
        _ => (0, 0),
    };
    let mut out = Vec::new();
    let h = Header::new(Op::Abort, 0, 0, aux, aux2, &[]);
    wire::put_frame(&mut out, &h, e.to_string().as_bytes());
    out
}

/// The error an abort frame from rank `from` reports.
fn aborted(h: &Header, text: &[u8], from: usize, op: Op) -> CollectiveError {
    let (rank, op) = (h.aux2 as usize, op.name());
    match h.aux {
        1 => CollectiveError::PeerGone { rank, op },
        2 => CollectiveError::Timeout { rank, op },
        _ => protocol(format!(
            "{op}: rank {from} aborted: {}",
            String::from_utf8_lossy(text)
        )),
    }
}

impl Link {
    fn new(stream: UnixStream, rank: usize) -> Link {
        let stream = BufReader::with_capacity(1 << 16, stream);
        Link { rank, stream }
    }

    fn set_timeouts(&self, read: Duration, write: Duration) -> Res<()> {
        let s = self.stream.get_ref();
        let r = s
            .set_read_timeout(Some(read))
            .and_then(|()| s.set_write_timeout(Some(write)));
        r.map_err(|e| io_error(e, Op::Hello, self.rank))
    }

    fn send(&mut self, bytes: &[u8], op: Op) -> Res<()> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .map_err(|e| io_error(e, op, self.rank))
    }

    /// Sends without blocking and ignores failure (used only right before dropping the link).
    fn send_abort(&mut self, frame: &[u8]) {
        let s = self.stream.get_mut();
        let _ = s.set_nonblocking(true);
        let _ = s.write_all(frame);
    }

    /// Spoke side: if the hub hung up, report the abort it may have sent before closing.
    fn send_to_hub(&mut self, bytes: &[u8], op: Op, scratch: &mut Vec<u8>) -> Res<()> {
        match self.send(bytes, op) {
            Err(gone @ CollectiveError::PeerGone { .. }) => {
                match wire::read_frame(&mut self.stream, scratch) {
                    Ok(h) if h.op == Op::Abort => Err(aborted(&h, scratch, self.rank, op)),
                    _ => Err(gone),
                }
            }
            r => r,
        }
    }

    /// Receives the next frame, which must be `op` number `seq` (an abort becomes its error).
    fn recv(&mut self, payload: &mut Vec<u8>, op: Op, seq: u64) -> Res<Header> {
        let h = match wire::read_frame(&mut self.stream, payload) {
            Ok(h) => h,
            Err(ReadError::Io(e)) => return Err(io_error(e, op, self.rank)),
            Err(ReadError::Bad(m)) => {
                return Err(protocol(format!(
                    "{}: bad frame from rank {}: {m}",
                    op.name(),
                    self.rank
                )))
            }
        };
        if h.op == Op::Abort {
            return Err(aborted(&h, payload, self.rank, op));
        }
        if h.op != op || h.seq != seq {
            return Err(protocol(format!(
                "{}: rank {} sent {} #{}, this rank is in {} #{seq}",
                op.name(),
                self.rank,
                h.op.name(),
                h.seq,
                op.name()
            )));
        }
        Ok(h)
    }
}

/// Checks a received frame's dtype (and, with `shape`, its shape) against this rank's tensor.
fn check_frame(h: &Header, dtype: u8, shape: Option<&[usize]>, from: usize, op: Op) -> Res<()> {
    let shape_ok = shape.is_none_or(|s| s == h.shape.as_slice());
    if h.dtype == dtype && shape_ok {
        return Ok(());
    }
    Err(protocol(format!(
        "{}: rank {from} sent dtype {:?} shape {:?}, this rank has dtype {:?} shape {:?}",
        op.name(),
        wire::code_dtype(h.dtype),
        h.shape,
        wire::code_dtype(dtype),
        shape.unwrap_or(&[]),
    )))
}

impl SocketCollective {
    /// Forms the group: rank 0 binds `cfg.rendezvous` and waits for the other ranks, which retry
    /// connecting until `cfg.timeout`; returns once all `world_size` ranks are connected. World size
    /// 1 communicates with no one and behaves exactly like [`SingleRank`].
    pub fn connect(cfg: &SocketConfig) -> Result<Self, CollectiveError> {
        if cfg.world_size == 0 || cfg.world_size > u16::MAX as usize {
            return Err(invalid(format!(
                "world size {} is not in 1..=65535",
                cfg.world_size
            )));
        }
        check_rank(cfg.rank, cfg.world_size)?;
        if cfg.timeout.is_zero() {
            return Err(invalid("timeout is zero".into()));
        }
        let deadline = Instant::now() + cfg.timeout;
        let role = match (cfg.world_size, cfg.rank) {
            (1, _) => Role::Alone,
            (_, 0) => Role::Hub(connect_hub(cfg, deadline)?),
            _ => Role::Spoke(connect_spoke(cfg, deadline)?),
        };
        let (rank, world) = (cfg.rank, cfg.world_size);
        let bufs = vec![Vec::new(); world.max(2)];
        let state = Mutex::new(State {
            rank,
            world,
            seq: 0,
            role,
            out: Vec::new(),
            bufs,
        });
        Ok(SocketCollective {
            rank,
            world_size: world,
            state,
        })
    }

    /// Runs one operation under the lock; any error poisons a multi-rank group.
    fn run<T>(&self, f: impl FnOnce(&mut State) -> Res<T>) -> Res<T> {
        let poisoned = |reason| CollectiveError::Poisoned { reason };
        let mut guard = self
            .state
            .lock()
            .map_err(|_| poisoned("a thread panicked during a collective".into()))?;
        let st = &mut *guard;
        if let Role::Failed(reason) = &st.role {
            return Err(poisoned(reason.clone()));
        }
        st.seq = st.seq.wrapping_add(1);
        let result = f(st);
        if let Err(e) = &result {
            st.fail(e);
        }
        result
    }
}

fn invalid(reason: String) -> CollectiveError {
    CollectiveError::InvalidConfig { reason }
}

fn rendezvous(path: &Path) -> impl Fn(io::Error) -> CollectiveError + '_ {
    move |source| CollectiveError::Rendezvous {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether forming the group should try again: no listener yet (spoke), no connection yet (hub).
fn retry(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        NotFound | ConnectionRefused | WouldBlock | Interrupted
    )
}

/// Sleeps a little before the next try, or fails with a timeout waiting for `rank`.
fn wait_until(deadline: Instant, rank: usize) -> Res<()> {
    if Instant::now() >= deadline {
        return Err(CollectiveError::Timeout {
            rank,
            op: Op::Hello.name(),
        });
    }
    std::thread::sleep(Duration::from_millis(2));
    Ok(())
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn hello(rank: usize, world_size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Header::new(Op::Hello, 0, 0, rank as u32, world_size as u32, &[]);
    wire::put_frame(&mut out, &h, &[]);
    out
}

fn connect_hub(cfg: &SocketConfig, deadline: Instant) -> Res<Vec<Link>> {
    let path = &cfg.rendezvous;
    let rdv = rendezvous(path);
    // A stale socket of an earlier run is removed; anything else there makes `bind` fail.
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(path).map_err(&rdv)?;
    }
    let listener = UnixListener::bind(path).map_err(&rdv)?;
    let mut slots: Vec<Option<Link>> = (0..cfg.world_size).map(|_| None).collect();
    let result = listener
        .set_nonblocking(true)
        .map_err(&rdv)
        .and_then(|()| accept_all(&listener, cfg, deadline, &mut slots));
    drop(listener);
    let _ = std::fs::remove_file(path);
    let mut links: Vec<Link> = slots.into_iter().flatten().collect();
    if let Err(e) = result {
        let frame = abort_frame(&e);
        links.iter_mut().for_each(|l| l.send_abort(&frame));
        return Err(e);
    }
    let ready = hello(0, cfg.world_size);
    for link in &mut links {
        link.set_timeouts(cfg.timeout, cfg.timeout)?;
        link.send(&ready, Op::Hello)?;
    }
    Ok(links)
}

fn accept_all(
    listener: &UnixListener,
    cfg: &SocketConfig,
    deadline: Instant,
    slots: &mut [Option<Link>],
) -> Res<()> {
    let rdv = rendezvous(&cfg.rendezvous);
    let mut payload = Vec::new();
    let first_missing = |slots: &[Option<Link>]| slots.iter().skip(1).position(Option::is_none);
    while let Some(missing) = first_missing(slots).map(|i| i + 1) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if retry(&e) => {
                wait_until(deadline, missing)?;
                continue;
            }
            Err(e) => return Err(rdv(e)),
        };
        stream.set_nonblocking(false).map_err(&rdv)?;
        let mut link = Link::new(stream, missing);
        link.set_timeouts(remaining(deadline), cfg.timeout)?;
        let h = wire::read_frame(&mut link.stream, &mut payload).map_err(|e| {
            protocol(format!(
                "connect: no valid hello from a connecting rank: {e:?}"
            ))
        })?;
        let rank = h.aux as usize;
        let problem = if h.op != Op::Hello || h.aux2 as usize != cfg.world_size {
            Some(format!(
                "a rank sent {} with world size {}, rank 0 has world size {}",
                h.op.name(),
                h.aux2,
                cfg.world_size
            ))
        } else if rank == 0 || rank >= cfg.world_size || slots[rank].is_some() {
            Some(format!(
                "a connecting rank claims rank {rank} (world size {}, or taken)",
                cfg.world_size
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            let e = protocol(format!("connect: {problem}"));
            link.send_abort(&abort_frame(&e));
            return Err(e);
        }
        link.rank = rank;
        slots[rank] = Some(link);
    }
    Ok(())
}

fn connect_spoke(cfg: &SocketConfig, deadline: Instant) -> Res<Link> {
    let stream = loop {
        match UnixStream::connect(&cfg.rendezvous) {
            Ok(stream) => break stream,
            Err(e) if retry(&e) => wait_until(deadline, 0)?,
            Err(e) => return Err(rendezvous(&cfg.rendezvous)(e)),
        }
    };
    let mut link = Link::new(stream, 0);
    link.set_timeouts(remaining(deadline), cfg.timeout)?;
    link.send(&hello(cfg.rank, cfg.world_size), Op::Hello)?;
    let h = link.recv(&mut Vec::new(), Op::Hello, 0)?;
    if h.aux2 as usize != cfg.world_size {
        return Err(protocol(format!(
            "connect: rank 0 has world size {}, rank {} has {}",
            h.aux2, cfg.rank, cfg.world_size
        )));
    }
    link.set_timeouts(cfg.timeout, cfg.timeout)?;
    Ok(link)
}

impl State {
    /// Marks the group failed and tells the other side(s), so that they fail promptly too.
    fn fail(&mut self, e: &CollectiveError) {
        match std::mem::replace(&mut self.role, Role::Failed(e.to_string())) {
            Role::Alone => self.role = Role::Alone,
            Role::Hub(mut links) => {
                let frame = abort_frame(e);
                links.iter_mut().for_each(|l| l.send_abort(&frame));
            }
            Role::Spoke(mut link) => {
                use CollectiveError::*;
                if !matches!(e, PeerGone { .. } | Timeout { .. } | Io { .. }) {
                    link.send_abort(&abort_frame(e));
                }
            }
            Role::Failed(_) => {}
        }
    }

    fn all_reduce(&mut self, t: &Tensor) -> Res<Tensor> {
        let (op, seq, dims) = (Op::AllReduce, self.seq, t.dims());
        let code = wire::check_tensor(t, op)?;
        let (acc, rest) = self.bufs.split_at_mut(1);
        let (acc, scratch) = (&mut acc[0], &mut rest[0]);
        match &mut self.role {
            Role::Hub(links) => {
                acc.clear();
                wire::append_bytes(t, acc, op)?;
                for link in links.iter_mut() {
                    let h = link.recv(scratch, op, seq)?;
                    check_frame(&h, code, Some(dims), link.rank, op)?;
                    wire::add_into(t.dtype(), acc, scratch, op)?;
                }
                self.out.clear();
                wire::put_frame(&mut self.out, &header(op, code, seq, 0, dims), acc);
                for link in links.iter_mut() {
                    link.send(&self.out, op)?;
                }
            }
            Role::Spoke(link) => {
                self.out.clear();
                wire::put_tensor_frame(&mut self.out, op, seq, 0, t)?;
                link.send_to_hub(&self.out, op, scratch)?;
                let h = link.recv(acc, op, seq)?;
                check_frame(&h, code, Some(dims), 0, op)?;
            }
            Role::Alone | Role::Failed(_) => return identity(t, op),
        }
        wire::to_tensor(t.dtype(), dims, acc, t.device(), op)
    }

    fn all_gather(&mut self, t: &Tensor) -> Res<Vec<Tensor>> {
        let (op, seq) = (Op::AllGather, self.seq);
        let code = wire::check_tensor(t, op)?;
        let (dtype, device) = (t.dtype(), t.device());
        match &mut self.role {
            Role::Hub(links) => {
                let mut shapes = vec![t.dims().to_vec()];
                self.bufs[0].clear();
                wire::append_bytes(t, &mut self.bufs[0], op)?;
                for link in links.iter_mut() {
                    let h = link.recv(&mut self.bufs[link.rank], op, seq)?;
                    check_frame(&h, code, None, link.rank, op)?;
                    shapes.push(h.shape);
                }
                self.out.clear();
                for (r, (shape, bytes)) in shapes.iter().zip(&self.bufs).enumerate() {
                    wire::put_frame(&mut self.out, &header(op, code, seq, r, shape), bytes);
                }
                for link in links.iter_mut() {
                    link.send(&self.out, op)?;
                }
                let parts = shapes.iter().zip(&self.bufs);
                parts
                    .map(|(shape, bytes)| wire::to_tensor(dtype, shape, bytes, device, op))
                    .collect()
            }
            Role::Spoke(link) => {
                self.out.clear();
                wire::put_tensor_frame(&mut self.out, op, seq, 0, t)?;
                let buf = &mut self.bufs[0];
                link.send_to_hub(&self.out, op, buf)?;
                let mut parts = Vec::with_capacity(self.world);
                for r in 0..self.world {
                    let h = link.recv(buf, op, seq)?;
                    check_frame(&h, code, None, 0, op)?;
                    if h.aux as usize != r {
                        let m = format!(
                            "all_gather: rank 0 sent part {} where part {r} was due",
                            h.aux
                        );
                        return Err(protocol(m));
                    }
                    parts.push(wire::to_tensor(dtype, &h.shape, buf, device, op)?);
                }
                Ok(parts)
            }
            Role::Alone | Role::Failed(_) => Ok(vec![identity(t, op)?]),
        }
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> Res<Tensor> {
        let (op, seq) = (Op::Broadcast, self.seq);
        let code = wire::check_tensor(t, op)?;
        match &mut self.role {
            Role::Hub(links) => {
                let mut shape = t.dims().to_vec();
                for link in links.iter_mut() {
                    let h = link.recv(&mut self.bufs[link.rank], op, seq)?;
                    check_frame(&h, code, None, link.rank, op)?;
                    if h.aux as usize != root {
                        let m = format!(
                            "broadcast: rank {} has root {}, rank 0 has root {root}",
                            link.rank, h.aux
                        );
                        return Err(protocol(m));
                    }
                    if link.rank == root {
                        shape = h.shape;
                    }
                }
                if root == 0 {
                    self.bufs[0].clear();
                    wire::append_bytes(t, &mut self.bufs[0], op)?;
                }
                self.out.clear();
                wire::put_frame(
                    &mut self.out,
                    &header(op, code, seq, root, &shape),
                    &self.bufs[root],
                );
                for link in links.iter_mut() {
                    link.send(&self.out, op)?;
                }
                match root {
                    0 => Ok(t.clone()),
                    _ => wire::to_tensor(t.dtype(), &shape, &self.bufs[root], t.device(), op),
                }
            }
            Role::Spoke(link) => {
                self.out.clear();
                match self.rank == root {
                    true => wire::put_tensor_frame(&mut self.out, op, seq, root as u32, t)?,
                    false => {
                        wire::put_frame(&mut self.out, &header(op, code, seq, root, &[0]), &[])
                    }
                }
                let buf = &mut self.bufs[0];
                link.send_to_hub(&self.out, op, buf)?;
                let h = link.recv(buf, op, seq)?;
                check_frame(&h, code, None, 0, op)?;
                wire::to_tensor(t.dtype(), &h.shape, buf, t.device(), op)
            }
            Role::Alone | Role::Failed(_) => identity(t, op),
        }
    }
}

impl Collective for SocketCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Res<Tensor> {
        self.run(|st| st.all_reduce(t))
    }
    fn all_gather(&self, t: &Tensor) -> Res<Vec<Tensor>> {
        self.run(|st| st.all_gather(t))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Res<Tensor> {
        let world_size = self.world_size;
        self.run(|st| check_rank(root, world_size).and_then(|()| st.broadcast(t, root)))
    }
}

#[cfg(test)]
mod tests;
