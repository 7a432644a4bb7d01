//! Prefix-cache hit rate of prefix-aware routing against round-robin on a multi-turn chat
//! workload: two replicas (`r4b coordinator`, TP = 2 each, CPU, the embedded model) in a real
//! etcd behind one `r4b gateway --etcd --routing ...`; each policy on fresh replicas (cold
//! caches). The hit rate is the replicas' own count (gRPC `Load`: prefix_hit_tokens /
//! prefix_query_tokens, summed), not the gateway's.
//!
//! A measurement, not a CI test (`#[ignore]`); `bench/prefix_hit_rate.sh` runs it. Prefix
//! routing must beat round-robin (the acceptance line), so it asserts that too.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{all_ready, Coordinator, Etcd, Gateway};
use serde_json::{json, Value};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One conversation's next turn: sends the history plus a new user message, keeps the answer.
fn turn(base: &str, history: &mut Vec<Value>, conv: usize, t: usize) -> (u64, u64) {
    history.push(json!({
        "role": "user",
        "content": format!(
            "Conversation {conv}, question {t}: please explain, in a few sentences, how the \
             weather in city number {} changes over the seasons and why.",
            conv * 31 + t
        ),
    }));
    let body = json!({
        "model": "r4b",
        "messages": history,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
        "chat_template_kwargs": {"thinking_mode": "short"},
    });
    let r = common::client()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    history.push(json!({"role": "assistant", "content": content}));
    let usage = &v["usage"];
    (
        usage["prompt_tokens"].as_u64().unwrap_or(0),
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
    )
}

struct Figures {
    hit: u64,
    query: u64,
    gateway_cached: u64,
    gateway_prompt: u64,
    requests: usize,
    secs: f64,
}

fn measure(routing: &str, convs: usize, turns: usize, clients: usize) -> Figures {
    let etcd = Etcd::start().expect("etcd");
    let cache = tempfile::tempdir().unwrap();
    let a = Coordinator::start(&etcd.url, 2, cache.path(), &[]);
    etcd.wait_registrations(Duration::from_secs(120), |r| all_ready(r, &[a.url()]))
        .expect("A registered");
    let b = Coordinator::start(&etcd.url, 2, cache.path(), &[]);
    let urls = [a.url(), b.url()];
    etcd.wait_registrations(Duration::from_secs(120), |r| all_ready(r, &urls))
        .expect("both registered");
    let gw = Gateway::start(&etcd.url, cache.path(), &["--routing", routing]);
    let counters = |c: &Coordinator| {
        let l = c.load().expect("Load");
        (l.prefix_hit_tokens, l.prefix_query_tokens)
    };
    let before = [counters(&a), counters(&b)];
    let t0 = Instant::now();
    // Each client thread holds `convs / clients` conversations and sends one turn of each in
    // turn, so conversations interleave the way independent users do.
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let base = gw.base.clone();
            std::thread::spawn(move || {
                let mine: Vec<usize> = (0..convs).filter(|i| i % clients == c).collect();
                let mut histories: Vec<Vec<Value>> = mine.iter().map(|_| Vec::new()).collect();
                let (mut prompt, mut cached, mut n) = (0, 0, 0);
                for t in 0..turns {
                    for (k, &conv) in mine.iter().enumerate() {
                        let (p, h) = turn(&base, &mut histories[k], conv, t);
                        prompt += p;
                        cached += h;
                        n += 1;
                    }
                }
                (prompt, cached, n)
            })
        })
        .collect();
    let (mut gateway_prompt, mut gateway_cached, mut requests) = (0, 0, 0);
    for t in threads {
        let (p, c, n) = t.join().unwrap();
        gateway_prompt += p;
        gateway_cached += c;
        requests += n;
    }
    let secs = t0.elapsed().as_secs_f64();
    let after = [counters(&a), counters(&b)];
    let hit = (0..2).map(|i| after[i].0 - before[i].0).sum();
    let query = (0..2).map(|i| after[i].1 - before[i].1).sum();
    Figures {
        hit,
        query,
        gateway_cached,
        gateway_prompt,
        requests,
        secs,
    }
}

#[test]
#[ignore = "a measurement: bench/prefix_hit_rate.sh"]
fn prefix_hit_rate_prefix_vs_round_robin() {
    if !cfg!(feature = "etcd") || !std::path::Path::new(common::cluster::ETCD).exists() {
        println!(
            "SKIPPED: needs --features etcd and {}",
            common::cluster::ETCD
        );
        return;
    }
    let convs = env_usize("CONVS", 16);
    let turns = env_usize("TURNS", 6);
    let clients = env_usize("CLIENTS", 4);
    let mut rates = Vec::new();
    for routing in ["round-robin", "least-loaded", "prefix"] {
        let f = measure(routing, convs, turns, clients);
        let rate = f.hit as f64 / f.query.max(1) as f64;
        println!(
            "RESULT routing={routing} conversations={convs} turns={turns} clients={clients} \
             requests={} hit_rate={:.1}% (replicas: {} of {} prompt tokens from the prefix cache; \
             gateway usage: {} of {} cached) wall={:.1}s",
            f.requests,
            rate * 100.0,
            f.hit,
            f.query,
            f.gateway_cached,
            f.gateway_prompt,
            f.secs
        );
        rates.push(rate);
    }
    assert!(
        rates[2] > rates[0],
        "prefix routing {:.3} did not beat round-robin {:.3}",
        rates[2],
        rates[0]
    );
}
