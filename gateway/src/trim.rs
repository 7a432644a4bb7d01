//! Giving memory back after a spike.
//!
//! glibc's malloc keeps freed memory inside its heaps: after a gateway parsed a 10 MB body it
//! stayed 36 MiB larger while idle (bench/RESULTS.md). Requests that allocate a lot (large
//! bodies, images) mark the process; a background task then calls `malloc_trim(0)` at most once
//! per period, which returns every free page to the system. glibc was kept over jemalloc and
//! mimalloc, which return memory by themselves but made the image path slower (views +2-5 ms,
//! the worker's host-side encode 1.6x on the CPU reference, +5 ms TTFT on the H200).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Requests at least this large (bytes) ask for a trim once they are done.
pub const LARGE_REQUEST_BYTES: usize = 1 << 20;

static PENDING: AtomicBool = AtomicBool::new(false);

/// Asks for a trim (cheap: one atomic store).
pub fn after_large_request() {
    PENDING.store(true, Ordering::Relaxed);
}

/// Runs forever: every `period`, trims the heap if a large request asked for it since.
pub async fn run(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if PENDING.swap(false, Ordering::Relaxed) {
            // Off the async runtime: a trim walks the heap.
            let _ = tokio::task::spawn_blocking(trim_now).await;
        }
    }
}

/// Returns free heap memory to the system now (glibc only; elsewhere a no-op).
pub fn trim_now() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
