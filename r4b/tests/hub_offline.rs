//! `r4b serve OWNER/NAME` with `HF_HUB_OFFLINE=1` serves a checkpoint from the Hugging Face cache
//! layout (`$HF_HOME/hub/models--OWNER--NAME/{refs/main, snapshots/REV/...}`) without network.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client;

#[test]
fn a_hub_id_is_served_from_the_cache_when_offline() {
    let home = tempfile::tempdir().unwrap();
    // Fill a snapshot with the embedded model's files, written by `r4b serve`'s own writers.
    let staging = tempfile::tempdir().unwrap();
    r4b_worker::embedded::write_model_files(staging.path()).unwrap();
    r4b_gateway::embedded::write_tokenizer_files(staging.path()).unwrap();
    let repo = home.path().join("hub").join("models--acme--tiny-r4b");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(rev);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), rev).unwrap();
    for f in std::fs::read_dir(staging.path()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args([
            "serve",
            "acme/tiny-r4b",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--kv-cache-space",
            "0.1",
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("R4B_CACHE", home.path().join("r4b"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/models");
    let deadline = Instant::now() + Duration::from_secs(60);
    let models = loop {
        if let Ok(r) = client().get(&url).send() {
            if r.status() == 200 {
                break r.text().unwrap();
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("r4b serve exited: {st}");
        }
        assert!(Instant::now() < deadline, "not serving within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(models.contains("acme/tiny-r4b"), "{models}");

    // A hub id that is not cached fails clearly instead of trying the network.
    let out = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args(["serve", "acme/missing", "--port", "0"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HF_HUB_OFFLINE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
