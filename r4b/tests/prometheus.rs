//! A real Prometheus server (Debian `prometheus`), started here on a loopback port and stopped by
//! its PID, scrapes a running `r4b serve` every second during a short workload; then every PromQL
//! query of the Grafana dashboard (`deploy/grafana/r4b-serve.json`) returns data through
//! Prometheus's HTTP API.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dashboard_queries() -> Vec<(String, String)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/r4b-serve.json"
    );
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard"))
        .expect("dashboard JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("").to_string(),
                    expr.to_string(),
                ));
            }
        }
    }
    out
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: prometheus is not installed (Debian package `prometheus`; .ci/run installs it)");
        return;
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    let s = Server::start(&[]);
    let target = s.base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: r4b\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("config");
    let port = free_port();
    let api = format!("http://127.0.0.1:{port}/api/v1/query");
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    let http = client();
    let query = |expr: &str| -> Option<Value> {
        let r = http.get(&api).query(&[("query", expr)]).send().ok()?;
        r.json::<Value>().ok()
    };
    let started = Instant::now();
    while query("up").is_none_or(|v| v["data"]["result"].as_array().is_none_or(Vec::is_empty)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "prometheus did not scrape"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // A workload that spans several scrapes, so that every rate() has two samples that differ.
    let until = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while Instant::now() < until {
        s.greedy_chat(&format!("Request {i}: tell me something."), 8);
        i += 1;
    }
    std::thread::sleep(Duration::from_secs(3));
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let v = query(expr).unwrap_or_else(|| panic!("query failed: {expr}"));
        assert_eq!(v["status"], "success", "{expr}: {v}");
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        // Each sample is [time, "value"]; a value must be a finite number (a quantile of no
        // observations would be NaN).
        let values: Vec<f64> = result
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect();
        println!("{} series {values:?}  {title}: {expr}", result.len());
        if result.is_empty()
            || values.len() != result.len()
            || values.iter().any(|x| !x.is_finite())
        {
            empty.push(expr.clone());
        }
    }
    assert!(empty.is_empty(), "queries without finite data: {empty:#?}");
}
