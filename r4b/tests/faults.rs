//! Faults and abuse against the real binaries (issue 12): one request can only fail itself, a
//! dead or frozen worker is replaced while the replica keeps its queue, SIGTERM drains, and
//! image bombs, huge bodies and slow clients cost the others nothing.
//!
//! The overload soak at the end runs `R4B_SOAK_SECS` seconds (5 by default, as in CI).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs;
use common::*;
use serde_json::{json, Value};

/// The tests here measure latencies and kill processes: they run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A long greedy stream: `max_tokens` tokens, EOS ignored.
fn long_body(max_tokens: u32) -> Value {
    greedy_body("Tell me a long story.", max_tokens)
}

fn health(s: &Server) -> Value {
    serde_json::from_str(&s.get_text("/health")).unwrap_or(Value::Null)
}

/// Worker process ids of the (only) replica, in rank order.
fn worker_pids(s: &Server) -> Vec<u32> {
    health(s)["replicas"][0]["worker_pids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_u64())
                .map(|p| p as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn replica_state(s: &Server) -> String {
    health(s)["replicas"][0]["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Times the replica's worker group failed (and was restarted) so far.
fn restarts(s: &Server) -> u64 {
    health(s)["replicas"][0]["restarts"].as_u64().unwrap_or(0)
}

/// Polls until `f` holds or `timeout` passes; returns how long it took.
fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Runs `streams` client threads that send long streamed requests back to back until `stop`;
/// every outcome is recorded.
struct Load {
    stop: Arc<Mutex<bool>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(base: &str, streams: usize, max_tokens: u32) -> Load {
        let stop = Arc::new(Mutex::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..streams)
            .map(|_| {
                let (base, stop, outcomes) = (base.to_string(), stop.clone(), outcomes.clone());
                std::thread::spawn(move || {
                    while !*stop.lock().unwrap() {
                        let o = stream_chat(&base, &long_body(max_tokens));
                        outcomes.lock().unwrap().push(o);
                    }
                })
            })
            .collect();
        Load {
            stop,
            outcomes,
            threads,
        }
    }

    /// Stops sending; waits for every thread (a hung request fails the test here).
    fn finish(self, timeout: Duration) -> Vec<Outcome> {
        *self.stop.lock().unwrap() = true;
        let deadline = Instant::now() + timeout;
        for t in self.threads {
            while !t.is_finished() {
                assert!(Instant::now() < deadline, "a request hung");
                std::thread::sleep(Duration::from_millis(20));
            }
            t.join().unwrap();
        }
        Arc::try_unwrap(self.outcomes)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// A request the replica must keep serving after every fault.
fn assert_serves(s: &Server) {
    let body = s.greedy_chat("still there?", 4);
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
}

#[test]
fn each_bad_payload_fails_alone_over_http() {
    let _serial = serial();
    let s = Server::start(&["--tensor-parallel-size", "2"]);
    let base = s.base.clone();
    let beside = std::thread::spawn(move || stream_chat(&base, &long_body(150)));
    let payloads = [
        ("/v1/completions", json!({"prompt": [512], "max_tokens": 2})),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 70000], "max_tokens": 2}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e300}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "top_p": 1e-300}),
        ),
    ];
    for (path, body) in payloads {
        let (status, resp) = s.post(path, &body);
        assert_eq!(status, 400, "{body} → {resp}");
        assert!(resp["error"]["message"].is_string(), "{resp}");
    }
    let o = beside.join().unwrap();
    assert!(o.complete(), "the request beside the bad ones: {o:?}");
    assert_eq!(o.finish.as_deref(), Some("length"));
    assert_serves(&s);
}

#[test]
fn every_sampling_parameter_at_the_extremes_is_refused_or_served() {
    let _serial = serial();
    let s = Server::start(&[]);
    let fields = [
        "temperature",
        "top_p",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "top_k",
        "seed",
    ];
    let numbers = [
        "1e300",
        "-1e300",
        "1e-300",
        "-1e-300",
        "3.4028235e38",
        "-3.4028235e38",
        "3.5e38",
        "1.1754944e-38",
        "1e-46",
        "0",
        "-0.0",
        "1",
        "2",
        "1e20",
        "-1",
    ];
    for field in fields {
        // Numbers JSON can hold, and the non-numbers (NaN, inf) a client may still send.
        let raw_values = numbers
            .iter()
            .chain(&["NaN", "Infinity", "-Infinity", "inf"]);
        for raw in raw_values {
            let body = format!(
                r#"{{"messages":[{{"role":"user","content":"hi"}}],"max_tokens":2,"{field}":{raw}}}"#
            );
            let r = client()
                .post(format!("{}/v1/chat/completions", s.base))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().unwrap();
            assert!(
                status == 200 || status == 400,
                "{field}={raw}: {status} {text}"
            );
            if status == 400 {
                assert!(text.contains("\"error\""), "{field}={raw}: {text}");
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert!(v["choices"][0]["finish_reason"].is_string(), "{text}");
            }
        }
    }
    assert_serves(&s);
}

#[test]
fn a_killed_rank_is_replaced_and_the_queue_survives() {
    let _serial = serial();
    let s = Server::start(&["--tensor-parallel-size", "2"]);
    let server_pid = s.pid();
    let old = worker_pids(&s);
    assert_eq!(old.len(), 2, "{}", health(&s));
    let load = Load::start(&s.base, 6, 48);
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = Instant::now();
    procs::signal(old[1], "KILL");
    // Noticed within 2 s.
    let noticed = wait_for(Duration::from_secs(5), || restarts(&s) >= 1);
    let noticed = noticed.expect("the replica never noticed the dead rank");
    // Requests sent during the outage wait for the new group and succeed.
    let outage_base = s.base.clone();
    let during = std::thread::spawn(move || stream_chat(&outage_base, &long_body(8)));
    let back = wait_for(Duration::from_secs(30), || {
        replica_state(&s) == "serving" && worker_pids(&s).len() == 2
    });
    let back = back.expect("the replica did not come back within 30 s");
    std::thread::sleep(Duration::from_millis(1000));
    let outcomes = load.finish(Duration::from_secs(60));
    let during = during.join().unwrap();
    println!(
        "noticed after {:.0} ms, serving again after {:.0} ms",
        noticed.as_secs_f64() * 1e3,
        (noticed + back).as_secs_f64() * 1e3
    );
    assert!(
        noticed <= Duration::from_secs(2),
        "noticed after {noticed:?}"
    );
    assert!(
        during.complete(),
        "a request sent during the outage: {during:?}"
    );
    // Every request that was running at the kill ended within 5 s, complete or with a clear
    // error; everything else completed.
    let mut interrupted = 0;
    let mut running = 0;
    for o in &outcomes {
        let running_at_kill = o.sent < killed_at && o.ended > killed_at;
        running += usize::from(running_at_kill);
        if running_at_kill {
            let took = o.ended.saturating_duration_since(killed_at);
            assert!(
                took <= Duration::from_secs(5) || o.complete(),
                "ended {took:?} after the kill: {o:?}"
            );
            assert!(o.complete() || o.clear_error(), "{o:?}");
            interrupted += usize::from(!o.complete());
        } else {
            assert!(o.complete(), "{o:?}");
        }
    }
    println!(
        "{} requests, {running} running at the kill, {interrupted} of them interrupted (the \
         others had no token yet and were retried, or finished)",
        outcomes.len()
    );
    assert!(running >= 1, "no request was running at the kill");
    let new = worker_pids(&s);
    assert!(new.iter().all(|p| !old.contains(p)), "{old:?} -> {new:?}");
    assert!(
        !procs::alive(old[0]),
        "the surviving old rank was not killed"
    );
    assert_eq!(procs::zombies(server_pid), Vec::<u32>::new(), "zombies");
    assert_serves(&s);
}

#[test]
fn a_frozen_rank_is_caught_by_the_step_deadline() {
    let _serial = serial();
    let s = Server::start(&["--tensor-parallel-size", "2", "--step-timeout", "2"]);
    let server_pid = s.pid();
    let old = worker_pids(&s);
    let load = Load::start(&s.base, 4, 48);
    std::thread::sleep(Duration::from_millis(1500));
    let stopped_at = Instant::now();
    procs::signal(old[1], "STOP");
    let noticed = wait_for(Duration::from_secs(10), || restarts(&s) >= 1)
        .expect("the frozen rank was never noticed");
    let back = wait_for(Duration::from_secs(30), || {
        replica_state(&s) == "serving" && worker_pids(&s).len() == 2
    })
    .expect("the replica did not come back within 30 s");
    let outcomes = load.finish(Duration::from_secs(60));
    println!(
        "noticed after {:.0} ms (deadline 2 s + per-token allowance), serving after {:.0} ms",
        noticed.as_secs_f64() * 1e3,
        (noticed + back).as_secs_f64() * 1e3
    );
    // The deadline of a small step is 2 s plus its token allowance (20 ms per token here).
    assert!(
        noticed <= Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    for o in &outcomes {
        if o.sent < stopped_at && o.ended > stopped_at {
            let took = o.ended.saturating_duration_since(stopped_at);
            assert!(
                took <= Duration::from_secs(10) || o.complete(),
                "{took:?}: {o:?}"
            );
            assert!(o.complete() || o.clear_error(), "{o:?}");
        } else {
            assert!(o.complete(), "{o:?}");
        }
    }
    assert!(!procs::alive(old[1]), "the frozen rank is still there");
    assert_eq!(procs::zombies(server_pid), Vec::<u32>::new(), "zombies");
    assert_serves(&s);
}

#[test]
fn too_many_worker_failures_end_the_process_with_an_error() {
    let _serial = serial();
    let mut s = Server::start(&["--max-worker-restarts", "1"]);
    let first = worker_pids(&s);
    procs::signal(first[0], "KILL");
    wait_for(Duration::from_secs(30), || {
        replica_state(&s) == "serving" && worker_pids(&s).first().is_some_and(|p| *p != first[0])
    })
    .expect("the first failure was not recovered");
    let second = worker_pids(&s);
    procs::signal(second[0], "KILL");
    // Two failures within the window exceed --max-worker-restarts 1: the process gives up.
    let status = s
        .wait_exit(Duration::from_secs(20))
        .expect("the server did not exit");
    assert_ne!(status.code(), Some(0), "{status}");
    assert!(!procs::alive(second[0]));
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    let _serial = serial();
    let mut s = Server::start(&["--tensor-parallel-size", "2"]);
    let base = s.base.clone();
    let running: Vec<_> = (0..4)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || stream_chat(&base, &long_body(600)))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    procs::signal(s.pid(), "TERM");
    std::thread::sleep(Duration::from_millis(200));
    // New requests are refused while the running ones finish.
    let (status, body) = s.post("/v1/chat/completions", &greedy_body("late", 4));
    assert_eq!(status, 503, "{body}");
    let ready = client().get(format!("{base}/ready")).send().unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    for t in running {
        let o = t.join().unwrap();
        assert!(o.complete(), "an in-flight request during the drain: {o:?}");
    }
    let status = s.wait_exit(Duration::from_secs(30)).expect("did not exit");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn requests_left_at_the_shutdown_timeout_end_with_an_error_and_done() {
    let _serial = serial();
    let mut s = Server::start(&["--shutdown-timeout", "1"]);
    let base = s.base.clone();
    let long = std::thread::spawn(move || stream_chat(&base, &long_body(16_000)));
    std::thread::sleep(Duration::from_millis(800));
    let t0 = Instant::now();
    procs::signal(s.pid(), "TERM");
    let o = long.join().unwrap();
    assert!(o.clear_error() && o.status == 200 && o.done, "{o:?}");
    assert!(o.ended.duration_since(t0) < Duration::from_secs(5), "{o:?}");
    let status = s.wait_exit(Duration::from_secs(20)).expect("did not exit");
    assert_eq!(status.code(), Some(0), "{status}");
}

/// A valid PNG of 7999x7999 black pixels (about 190 KB): a decompression bomb.
fn bomb_png_uri() -> String {
    use base64::Engine;
    use std::io::Write;
    let (w, h) = (7999u32, 7999u32);
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::High);
        let mut writer = enc.write_header().unwrap();
        let mut rows = writer.stream_writer().unwrap();
        let row = vec![0u8; w as usize * 3];
        for _ in 0..h {
            rows.write_all(&row).unwrap();
        }
        rows.finish().unwrap();
    }
    println!("bomb PNG: {} bytes", png.len());
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// Median of the time to the first streamed output of `n` short requests, one at a time.
fn median_ttft(base: &str, n: usize) -> Duration {
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let o = stream_chat(base, &greedy_body("hello", 2));
            assert!(o.complete(), "{o:?}");
            o.first.unwrap_or(o.ended) - o.sent
        })
        .collect();
    t.sort();
    t[n / 2]
}

#[test]
fn image_bombs_and_huge_bodies_are_refused_fast() {
    let _serial = serial();
    let s = Server::start(&[]);
    let pid = s.pid();
    let uri = bomb_png_uri();
    let parts: Vec<Value> = (0..8)
        .map(|_| json!({"type": "image_url", "image_url": {"url": uri}}))
        .collect();
    let bomb = json!({"messages": [{"role": "user", "content": parts}], "max_tokens": 4});
    // First-token latency is sampled the same way idle and beside the bombs: one request,
    // an RSS reading, a 30 ms pause.
    let sample = |peak: &mut f64| {
        let t = median_ttft(&s.base, 1);
        *peak = peak.max(procs::rss_mib(pid));
        std::thread::sleep(Duration::from_millis(30));
        t
    };
    let mut idle: Vec<Duration> = (0..15).map(|_| sample(&mut 0.0)).collect();
    idle.sort();
    let idle_ttft = idle[idle.len() / 2];
    let rss_before = procs::rss_mib(pid);
    // Twenty bomb requests from a second client, ten a second, while this one measures
    // first-token latency.
    let (base, body) = (s.base.clone(), serde_json::to_vec(&bomb).unwrap());
    let bomber = std::thread::spawn(move || {
        let http = client();
        (0..20)
            .map(|_| {
                let t = Instant::now();
                let r = http
                    .post(format!("{base}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .unwrap();
                let status = r.status().as_u16();
                let text = r.text().unwrap();
                let took = t.elapsed();
                std::thread::sleep(Duration::from_millis(100).saturating_sub(took));
                (status, took, text)
            })
            .collect::<Vec<_>>()
    });
    let mut peak = rss_before;
    let mut samples = Vec::new();
    while !bomber.is_finished() || samples.len() < 15 {
        samples.push(sample(&mut peak));
    }
    samples.sort();
    let busy_ttft = samples[samples.len() / 2];
    let took = bomber.join().unwrap();
    peak = peak.max(procs::rss_mib(pid));
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_bombs = procs::rss_mib(pid);
    // A 10 MB text body: refused from its length, without tokenizing it.
    let big = "a".repeat(10 << 20);
    let t = Instant::now();
    let (status, resp) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": big}]}),
    );
    let big_took = t.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = procs::rss_mib(pid);
    let slowest = took.iter().map(|t| t.1).max().unwrap_or_default();
    println!(
        "{} bombs, slowest answer {:.1} ms; TTFT idle {:.1} ms, beside the bombs {:.1} ms; \
         RSS {rss_before:.0} MiB before, {peak:.0} peak, {rss_after_bombs:.0} after the bombs, \
         {rss_after:.0} after a 10 MB body answered in {:.0} ms",
        took.len(),
        slowest.as_secs_f64() * 1e3,
        idle_ttft.as_secs_f64() * 1e3,
        busy_ttft.as_secs_f64() * 1e3,
        big_took.as_secs_f64() * 1e3
    );
    for (status, _, text) in &took {
        assert_eq!(*status, 400, "{text}");
        assert!(text.contains("exceeds the limit"), "{text}");
    }
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");
    assert!(
        peak - rss_before < 100.0,
        "RSS grew by {} MiB",
        peak - rss_before
    );
    assert!(
        busy_ttft <= idle_ttft * 2,
        "TTFT {busy_ttft:?} beside the bombs, {idle_ttft:?} idle"
    );
    assert_eq!(status, 400, "{resp}");
    assert_eq!(resp["error"]["code"], "context_length_exceeded", "{resp}");
    assert!(big_took < Duration::from_secs(2), "{big_took:?}");
    assert!(
        (rss_after - rss_before).abs() < 50.0,
        "{rss_before} -> {rss_after} MiB"
    );
    assert_serves(&s);
}

#[test]
fn slow_headers_and_idle_connections_are_closed() {
    let _serial = serial();
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let s = Server::start(&["--http-header-timeout", "2"]);
    let addr = s.base.trim_start_matches("http://").to_string();
    // Ten clients that send their headers one byte every 300 ms.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(&addr).unwrap();
                c.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let t0 = Instant::now();
                c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\n")
                    .unwrap();
                let mut buf = [0u8; 512];
                while t0.elapsed() < Duration::from_secs(15) {
                    if c.write_all(b"X").is_err() {
                        return t0.elapsed();
                    }
                    match c.read(&mut buf) {
                        Ok(0) => return t0.elapsed(),
                        Ok(_) => {} // a 408 may come before the close
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return t0.elapsed(),
                    }
                }
                t0.elapsed()
            })
        })
        .collect();
    // An idle keep-alive connection after one request.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let t0 = Instant::now();
    let closed = loop {
        match idle.read(&mut buf) {
            Ok(0) | Err(_) => break t0.elapsed(),
            Ok(_) => {}
        }
    };
    for t in slow {
        let took = t.join().unwrap();
        assert!(
            took < Duration::from_secs(4),
            "a slow client held on for {took:?}"
        );
    }
    println!("idle keep-alive connection closed after {closed:?}");
    assert!(closed < Duration::from_secs(4), "{closed:?}");
    assert_serves(&s);
}

/// Percentile `p` (0..=100) of sorted durations.
fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

/// `clients` threads sending `body` back to back for `secs` seconds; a 429 makes a client wait
/// for its `Retry-After` first, as the OpenAI SDKs do.
fn closed_loop(base: &str, body: &Value, clients: usize, secs: f64) -> Vec<Outcome> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (base, body) = (base.to_string(), body.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while Instant::now() < until {
                    let o = stream_chat(&base, &body);
                    if o.status == 429 {
                        let wait = o.retry_after.unwrap_or(Duration::from_secs(1));
                        let left = until.saturating_duration_since(Instant::now());
                        std::thread::sleep(wait.min(left));
                    }
                    seen.push(o);
                }
                seen
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

/// Sorted latencies of the admitted (200) requests.
fn admitted(outcomes: &[Outcome]) -> Vec<Duration> {
    let mut l: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .map(|o| o.ended - o.sent)
        .collect();
    l.sort();
    l
}

#[test]
fn ten_times_overload_gets_429s_and_admitted_latency_stays_bounded() {
    let _serial = serial();
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("R4B_SOAK_SECS", 5) as f64;
    let (seqs, queue) = (env("R4B_SOAK_SEQS", 2), env("R4B_SOAK_QUEUE", 1));
    let s = Server::start(&[
        "--max-num-seqs",
        &seqs.to_string(),
        "--max-queue",
        &queue.to_string(),
    ]);
    let pid = s.pid();
    let body = greedy_body("How are you?", 16);
    let capacity = (seqs + queue) as usize;
    let unloaded = admitted(&closed_loop(&s.base, &body, 1, 2.0));
    let at_capacity = admitted(&closed_loop(&s.base, &body, capacity, secs / 2.0));
    let rss_before = procs::rss_mib(pid);
    let outcomes = closed_loop(&s.base, &body, 10 * capacity, secs);
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = procs::rss_mib(pid);
    let loaded = admitted(&outcomes);
    let refused = outcomes.iter().filter(|o| o.status == 429).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{} clients for {secs} s against {seqs} running + {queue} queued: {} requests, {} \
         admitted, {refused} refused (429). Latency p50 / p99, ms: unloaded {:.1} / {:.1}, at \
         capacity ({capacity} clients) {:.1} / {:.1}, admitted under 10x overload {:.1} / {:.1}. \
         RSS {rss_before:.0} -> {rss_after:.0} MiB",
        10 * capacity,
        outcomes.len(),
        loaded.len(),
        ms(pct(&unloaded, 50)),
        ms(pct(&unloaded, 99)),
        ms(pct(&at_capacity, 50)),
        ms(pct(&at_capacity, 99)),
        ms(pct(&loaded, 50)),
        ms(pct(&loaded, 99)),
    );
    for o in &outcomes {
        assert!(
            o.complete() || (o.status == 429 && o.retry_after.is_some()),
            "only 429s (with Retry-After) beyond capacity: {o:?}"
        );
    }
    assert!(refused > 0, "10x overload produced no 429");
    // The excess load, all refused, costs the admitted requests at most 2x their latency at
    // capacity. (Against one request alone, the f32 CPU reference's cost grows with the batch;
    // bench/RESULTS.md has both ratios.)
    // p99 of a few hundred requests on a shared 2-core machine is one scheduling hiccup away from
    // doubling; a violation is measured again (at capacity, then overloaded), twice at most,
    // and the bound must hold in one of the three measurements.
    let mut ratios = vec![(pct(&loaded, 99), pct(&at_capacity, 99))];
    while ratios.last().is_some_and(|(l, c)| *l > *c * 2) && ratios.len() < 3 {
        let c = admitted(&closed_loop(&s.base, &body, capacity, secs / 2.0));
        let l = admitted(&closed_loop(&s.base, &body, 10 * capacity, secs));
        println!(
            "again: p99 at capacity {:.1} ms, admitted under overload {:.1} ms",
            ms(pct(&c, 99)),
            ms(pct(&l, 99))
        );
        ratios.push((pct(&l, 99), pct(&c, 99)));
    }
    assert!(
        ratios.iter().any(|(l, c)| *l <= *c * 2),
        "admitted p99 vs p99 at capacity, in each measurement: {ratios:?}"
    );
    assert!(
        (rss_after - rss_before).abs() < 50.0,
        "{rss_before} -> {rss_after} MiB"
    );
    assert_serves(&s);
}
