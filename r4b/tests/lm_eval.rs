//! lm-eval-harness against `r4b serve` (issue 17): `local-completions` loglikelihood over a local
//! multiple-choice task (token-id prompt batches, `echo` + `logprobs` + `max_tokens: 0`, the
//! server's own tokenizer through `tokenizer_backend=remote`), and `local-chat-completions`
//! generate_until over the same documents. Packages: `tests/lm-eval-requirements.txt` (pinned,
//! installed by the test; no torch). No dataset download: the task reads a JSON file written here.
//!
//! The check: every per-choice log-likelihood lm-eval logged (`--log_samples`) equals the sum of
//! the continuation tokens' log-softmax under the f32 reference forward run in this process
//! (independent of the serving path) within 1e-4; lm-eval's accuracy equals the accuracy those
//! reference sums give, which is not the 1.0 that a server ignoring `echo` produced.

mod common;

use std::path::{Path, PathBuf};

use common::python::lm_eval_python3;
use common::reference::{log_softmax_rows, reference_model};
use common::Server;
use serde_json::{json, Value};

/// Questions and choices (lm-eval puts a space between them); the first choice is the answer.
const DOCS: &[(&str, &[&str])] = &[
    ("The sky is", &["blue", "green", "made of cheese"]),
    ("2 + 2 =", &["4", "5"]),
    ("Paris is in", &["France", "Spain", "Peru", "Mars"]),
    ("Water boils at", &["100 degrees", "10 degrees"]),
];

fn write_task(dir: &Path) {
    let data: String = DOCS
        .iter()
        .map(|(q, c)| json!({"question": q, "choices": c, "answer": 0}).to_string() + "\n")
        .collect();
    let data_path = dir.join("data.jsonl");
    std::fs::write(&data_path, data).unwrap();
    let common = format!(
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n\
         doc_to_text: \"{{{{question}}}}\"\n",
        data_path.display()
    );
    std::fs::write(
        dir.join("r4b_mc.yaml"),
        format!(
            "task: r4b_mc\n{common}output_type: multiple_choice\ndoc_to_choice: \"{{{{choices}}}}\"\n\
             doc_to_target: \"{{{{answer}}}}\"\nmetric_list:\n  - metric: acc\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("r4b_gen.yaml"),
        format!(
            "task: r4b_gen\n{common}output_type: generate_until\n\
             doc_to_target: \"{{{{choices[answer]}}}}\"\ngeneration_kwargs:\n  until: [\"\\n\\n\"]\n\
             \x20 max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
        ),
    )
    .unwrap();
}

/// Runs `python3 -S -m lm_eval` with `args`; panics with its output unless it succeeds.
fn lm_eval(dir: &Path, args: &[&str]) {
    let out = lm_eval_python3()
        .args(["-m", "lm_eval"])
        .args(args)
        .args(["--include_path"])
        .arg(dir)
        .args(["--log_samples", "--output_path"])
        .arg(dir.join("out"))
        .env("HF_DATASETS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf"))
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "lm_eval {args:?} failed:\n{text}");
}

/// The file under `dir/out` whose name starts with `prefix`.
fn output(dir: &Path, prefix: &str) -> PathBuf {
    fn walk(d: &Path, prefix: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(d).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = walk(&p, prefix) {
                    return Some(f);
                }
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            {
                return Some(p);
            }
        }
        None
    }
    walk(&dir.join("out"), prefix).unwrap_or_else(|| panic!("no {prefix}* under {dir:?}/out"))
}

fn samples(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The server's tokenizer, as lm-eval's remote backend calls it.
fn tokenize(s: &Server, text: &str) -> Vec<u32> {
    let (status, body) = s.post(
        "/tokenize",
        &json!({"model": "r4b", "prompt": text, "add_special_tokens": false}),
    );
    assert_eq!(status, 200, "{body}");
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) => s.parse().unwrap(),
        other => other.as_f64().unwrap(),
    }
}

#[test]
fn lm_eval_loglikelihood_matches_the_reference_and_generate_until_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_task(dir.path());
    let s = Server::start(&[]);
    let model = reference_model(&dir.path().join("model"));

    // 1. loglikelihood: batches of 3 token-id prompts per request.
    let completions = format!(
        "model=r4b,base_url={}/v1/completions,tokenizer_backend=remote,num_concurrent=1,\
         max_retries=1",
        s.base
    );
    lm_eval(
        dir.path(),
        &[
            "--model",
            "local-completions",
            "--model_args",
            &completions,
            "--tasks",
            "r4b_mc",
            "--batch_size",
            "3",
        ],
    );
    let docs = samples(&output(dir.path(), "samples_r4b_mc"));
    assert_eq!(docs.len(), DOCS.len());
    let mut correct = 0;
    let mut checked = 0;
    for doc in &docs {
        let args = doc["arguments"].as_object().unwrap();
        let mut best = (f64::MIN, usize::MAX);
        for (i, resp) in doc["resps"].as_array().unwrap().iter().enumerate() {
            let a = &args[&format!("gen_args_{i}")];
            let (ctx, cont) = (a["arg_0"].as_str().unwrap(), a["arg_1"].as_str().unwrap());
            // lm-eval's pair encoding: the whole text, split after the context's tokens.
            let whole = tokenize(&s, &format!("{ctx}{cont}"));
            let n_ctx = tokenize(&s, ctx).len();
            let rows = log_softmax_rows(&model, &whole);
            let want: f64 = (n_ctx..whole.len())
                .map(|t| rows[t - 1][whole[t] as usize])
                .sum();
            let got = number(&resp[0][0]);
            assert!(
                (got - want).abs() < 1e-4,
                "doc {} choice {i} ({ctx:?} + {cont:?}): lm-eval {got}, reference {want}",
                doc["doc_id"]
            );
            checked += 1;
            if want > best.0 {
                best = (want, i);
            }
        }
        correct += usize::from(best.1 == 0);
    }
    println!("{checked} choices match the reference");
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(output(dir.path(), "results_")).unwrap())
            .unwrap();
    let acc = results["results"]["r4b_mc"]["acc,none"].as_f64().unwrap();
    let want_acc = correct as f64 / DOCS.len() as f64;
    assert!(
        (acc - want_acc).abs() < 1e-9,
        "acc {acc}, reference {want_acc}"
    );
    assert!(
        acc < 1.0,
        "a random model scored 1.0: prompt logprobs unused?"
    );

    // 2. generate_until through chat: one greedy answer per document, each the one the server
    // gives the same request sent directly.
    let chat = format!(
        "model=r4b,base_url={}/v1/chat/completions,num_concurrent=1,max_retries=1",
        s.base
    );
    lm_eval(
        dir.path(),
        &[
            "--model",
            "local-chat-completions",
            "--model_args",
            &chat,
            "--tasks",
            "r4b_gen",
            "--apply_chat_template",
        ],
    );
    let gen = samples(&output(dir.path(), "samples_r4b_gen"));
    assert_eq!(gen.len(), DOCS.len());
    for doc in &gen {
        let q = doc["doc"]["question"].as_str().unwrap();
        let got = doc["resps"][0][0].as_str().unwrap();
        let (status, body) = s.post(
            "/v1/chat/completions",
            &json!({"model": "r4b", "messages": [{"role": "user", "content": q}],
                    "max_tokens": 6, "temperature": 0, "stop": ["\n\n"], "seed": 1234}),
        );
        assert_eq!(status, 200, "{body}");
        let want = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        assert_eq!(got, want, "generate_until answer for {q:?}");
    }
}
