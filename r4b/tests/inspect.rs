//! `r4b inspect`: on the embedded model and on a diff-form fixture written by transformers'
//! classes (`tests/fixtures/variants/`), it prints every value with its source, the bytes per
//! rank and the tokens; on what `serve` would refuse it exits non-zero naming the field. `serve`
//! itself refuses a tokenizer whose `<image>` id differs from the config before starting workers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/variants"
    ))
    .join(name)
}

fn inspect(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_r4b"))
        .arg("inspect")
        .args(args)
        .env("R4B_CACHE", cache)
        .output()
        .unwrap()
}

/// A copy of a variant fixture with the embedded tokenizer files (its `<image>` is 261, as the
/// fixtures' `image_token_index`).
fn with_tokenizer(variant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        let src = fixture(variant).join(f);
        if src.exists() {
            std::fs::copy(src, dir.path().join(f)).unwrap();
        }
    }
    r4b_gateway::embedded::write_tokenizer_files(dir.path()).unwrap();
    dir
}

/// The line of `field` in the config table.
fn line<'a>(out: &'a str, field: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(field))
        .unwrap_or_else(|| panic!("no line for {field} in:\n{out}"))
}

/// Count and bytes of the stored tensors, and bytes of those split over the ranks (decoder
/// projections, embedding, lm_head), read with the safetensors crate.
fn stored_bytes(file: &Path) -> (usize, u64, u64) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (mut all, mut split) = (0u64, 0u64);
    for (name, view) in st.tensors() {
        let n = view.data().len() as u64;
        all += n;
        if name.contains("language_model.")
            && (name.ends_with("proj.weight") || name.contains("embed_tokens"))
            || name == "lm_head.weight"
        {
            split += n;
        }
    }
    (st.len(), all, split)
}

#[test]
fn inspect_on_the_embedded_model_prints_values_sources_bytes_and_tokens() {
    let cache = tempfile::tempdir().unwrap();
    for tp in [1u64, 2] {
        let out = inspect(&["--tensor-parallel-size", &tp.to_string()], cache.path());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // worker/src/embedded.rs: hidden 128, 16 heads of 16, vocab 512, `<image>` 261.
        let l = line(&stdout, "text_config.hidden_size");
        assert!(l.contains(" 128 ") && l.ends_with("config.json"), "{l}");
        assert!(line(&stdout, "text_config.head_dim").contains(" 16 "));
        // Not in the embedded config.json: Qwen3Config's default.
        let l = line(&stdout, "text_config.use_sliding_window");
        assert!(l.contains("class default (Qwen3Config"), "{l}");
        let l = line(&stdout, "preprocessor.image_grid_pinpoints");
        assert!(
            l.contains("class default (LlavaOnevisionImageProcessor"),
            "{l}"
        );
        assert!(stdout.contains("<image>    id 261"), "{stdout}");
        assert!(
            stdout.contains("chat template: tokenizer_config.json"),
            "{stdout}"
        );
        assert!(stdout.contains("lm head: lm_head.weight"), "{stdout}");
        // Every stored tensor is read (2 vision layers, feature layer -1, untied head).
        let dir = cache.path().join("embedded-r4b-tiny-v2");
        let (count, all, split) = stored_bytes(&dir.join("model.safetensors"));
        let want = all - split + split / tp;
        assert!(
            stdout.contains(&format!("each rank reads {count} tensors, {want} bytes")),
            "tp {tp}: want {count} tensors, {want} bytes in\n{stdout}"
        );
        assert!(stdout.contains("stored but not read: 0"), "{stdout}");
    }
}

#[test]
fn inspect_on_a_diff_form_fixture_names_the_class_defaults() {
    let dir = with_tokenizer("untied");
    let cache = tempfile::tempdir().unwrap();
    let out = inspect(&[dir.path().to_str().unwrap()], cache.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // config.json leaves these out; transformers' Qwen3Config / SiglipVisionConfig fill them.
    for (field, value, class) in [
        ("text_config.head_dim", "128", "Qwen3Config"),
        ("text_config.rms_norm_eps", "1e-6", "Qwen3Config"),
        ("text_config.hidden_act", "\"silu\"", "Qwen3Config"),
        ("vision_config.layer_norm_eps", "1e-6", "SiglipVisionConfig"),
        (
            "vision_feature_select_strategy",
            "\"full\"",
            "LlavaOnevisionConfig",
        ),
    ] {
        let l = line(&stdout, field);
        assert!(
            l.contains(value) && l.contains(&format!("class default ({class}")),
            "{l}"
        );
    }
    let l = line(&stdout, "text_config.hidden_size");
    assert!(l.contains(" 16 ") && l.ends_with("config.json"), "{l}");
    assert!(line(&stdout, "preprocessor.resample").ends_with("preprocessor_config.json"));
    assert!(
        stdout.contains("Saved5"),
        "transformers 5 save names:\n{stdout}"
    );
    assert!(stdout.contains("<image>    id 261"), "{stdout}");
    assert!(stdout.contains("tensor parallel 1"), "{stdout}");
    // One KV head: TP 2 is what serve would refuse.
    let out = inspect(&[dir.path().to_str().unwrap(), "-t", "2"], cache.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("text_config.num_key_value_heads"),
        "{stderr}"
    );
}

#[test]
fn inspect_exits_non_zero_on_what_serve_refuses() {
    let cache = tempfile::tempdir().unwrap();
    let dir = with_tokenizer("strategy-default");
    let out = inspect(&[dir.path().to_str().unwrap()], cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("vision_feature_select_strategy"),
        "{stderr}"
    );

    let dir = with_tokenizer("untied");
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["image_token_index"] = 262.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let out = inspect(&[dir.path().to_str().unwrap()], cache.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`<image>`") && stderr.contains("262"),
        "{stderr}"
    );

    let out = inspect(&["-t", "3"], cache.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tensor parallel size 3"));
}

#[test]
fn serve_refuses_a_mismatched_image_token_before_starting_workers() {
    let dir = with_tokenizer("untied");
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["image_token_index"] = 262.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_r4b"))
        .args(["serve", dir.path().to_str().unwrap(), "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve did not refuse within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("`<image>`") && stderr.contains("262"),
        "{stderr}"
    );
    assert!(!stderr.contains("loaded in"), "workers started:\n{stderr}");
}
