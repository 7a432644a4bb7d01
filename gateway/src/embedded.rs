//! Tokenizer files of the embedded default model.
//!
//! A byte-level BPE with no merges: token `b` (0..=255) is byte `b`, written in the GPT-2
//! byte-level alphabet ([`crate::tokens::byte_level_chars`]), so any UTF-8 text round-trips. Added
//! tokens have fixed ids that the embedded tiny model's 512-row vocabulary is built around (the
//! four tool tokens, 263–266, as Qwen3's 151657/151658/151665/151666); ids from 267 up are never
//! produced and decode to nothing. The chat template is R-4B's reconstructed template
//! (r4b-model.md §3.2) with the three thinking modes, also accepting plain string content, plus
//! Qwen3's tool convention.

use std::path::Path;

use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::tokens::{byte_level_chars, TokenizeError};

/// `<|endoftext|>` (pad; second EOS).
pub const ENDOFTEXT_ID: u32 = 256;
/// `<|im_start|>`.
pub const IM_START_ID: u32 = 257;
/// `<|im_end|>` (EOS).
pub const IM_END_ID: u32 = 258;
/// `<think>` (not special, like Qwen3).
pub const THINK_OPEN_ID: u32 = 259;
/// `</think>` (not special, like Qwen3).
pub const THINK_CLOSE_ID: u32 = 260;
/// `<image>`.
pub const IMAGE_ID: u32 = 261;
/// `<video>`.
pub const VIDEO_ID: u32 = 262;
/// `<tool_call>` (not special, like Qwen3).
pub const TOOL_CALL_OPEN_ID: u32 = 263;
/// `</tool_call>` (not special, like Qwen3).
pub const TOOL_CALL_CLOSE_ID: u32 = 264;
/// `<tool_response>` (not special, like Qwen3).
pub const TOOL_RESPONSE_OPEN_ID: u32 = 265;
/// `</tool_response>` (not special, like Qwen3).
pub const TOOL_RESPONSE_CLOSE_ID: u32 = 266;
/// Rows of the embedded model's embedding matrix.
pub const VOCAB_ROWS: u32 = 512;

/// Added tokens in id order: content and whether special.
const ADDED: [(&str, bool); 11] = [
    ("<|endoftext|>", true),
    ("<|im_start|>", true),
    ("<|im_end|>", true),
    ("<think>", false),
    ("</think>", false),
    ("<image>", true),
    ("<video>", true),
    ("<tool_call>", false),
    ("</tool_call>", false),
    ("<tool_response>", false),
    ("</tool_response>", false),
];

/// R-4B's chat template as reconstructed in r4b-model.md §3.2: role, a space, every `<image>`,
/// then `"\n" + text` per text part, `<|im_end|>` without a newline; the generation prompt
/// appends `<think>\n` for `thinking_mode='long'`, an empty think block for `'short'`, nothing
/// for `'auto'` (the default).
///
/// Tools follow Qwen3's template in R-4B's turn format: with `tools`, a first system turn (the
/// request's system text, then the functions as JSON lines inside `<tools></tools>` and the
/// instruction to answer with `<tool_call>` blocks); an assistant turn's `tool_calls` are
/// written back as those blocks; consecutive `tool` messages form one user turn of
/// `<tool_response>` blocks.
pub const CHAT_TEMPLATE: &str = r#"{%- macro text(message) -%}
  {%- if message['content'] is string -%}
    {{- message['content'] -}}
  {%- elif message['content'] -%}
    {%- for c in message['content'] if c['type'] == 'text' -%}{{- c['text'] -}}{%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
  {{- '<|im_start|>system \n' -}}
  {%- if messages[0]['role'] == 'system' -%}{{- text(messages[0]) + '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if tools and loop.first and message['role'] == 'system' -%}
  {%- elif message['role'] == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user ' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + text(message) + '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>' -}}{%- endif -%}
  {%- else -%}
    {{- '<|im_start|>' + message['role'] + ' ' -}}
    {%- if message['content'] is string -%}
      {{- '\n' + message['content'] -}}
    {%- elif message['content'] -%}
      {%- for c in message['content'] if c['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}
      {%- for c in message['content'] if c['type'] == 'text' -%}{{- '\n' + c['text'] -}}{%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'assistant' and message['tool_calls'] -%}
      {%- for call in message['tool_calls'] -%}
        {%- set f = call['function'] if call['function'] else call -%}
        {{- '\n<tool_call>\n{"name": "' + f['name'] + '", "arguments": ' -}}
        {%- if f['arguments'] is string -%}{{- f['arguments'] -}}{%- else -%}{{- f['arguments'] | tojson -}}{%- endif -%}
        {{- '}\n</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if thinking_mode == 'short' -%}
    {{- '<think>\n\n</think>\n\n' -}}
  {%- elif thinking_mode == 'long' -%}
    {{- '<think>\n' -}}
  {%- endif -%}
{%- endif -%}"#;

/// Builds the embedded tokenizer in memory.
pub fn build_tokenizer() -> Result<Tokenizer, TokenizeError> {
    let err = |e: tokenizers::Error| TokenizeError(e.to_string());
    let vocab: Vocab = byte_level_chars()
        .iter()
        .enumerate()
        .map(|(b, c)| (c.to_string(), b as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(err)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    for (expected_id, (content, special)) in (ENDOFTEXT_ID..).zip(ADDED) {
        let token = AddedToken::from(content, special).normalized(false);
        if special {
            tok.add_special_tokens([token]).map_err(err)?;
        } else {
            tok.add_tokens([token]).map_err(err)?;
        }
        if tok.token_to_id(content) != Some(expected_id) {
            return Err(TokenizeError(format!(
                "added token {content} did not get id {expected_id}"
            )));
        }
    }
    Ok(tok)
}

/// Writes `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
/// `generation_config.json` (`eos_token_id: [258, 256]`) into `dir`.
pub fn write_tokenizer_files(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tok = build_tokenizer().map_err(std::io::Error::other)?;
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(std::io::Error::other)?;

    let added: serde_json::Map<String, serde_json::Value> = (ENDOFTEXT_ID..)
        .zip(ADDED)
        .map(|(id, (content, special))| {
            let entry = json!({
                "content": content, "lstrip": false, "normalized": false,
                "rstrip": false, "single_word": false, "special": special,
            });
            (id.to_string(), entry)
        })
        .collect();
    let config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
    });
    write_json(&dir.join("tokenizer_config.json"), &config)?;
    let generation = json!({
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
    });
    write_json(&dir.join("generation_config.json"), &generation)
}

fn write_json(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{ChatTemplate, TemplateMessage, TemplatePart};
    use crate::tokens::TextTokenizer;

    fn tok() -> TextTokenizer {
        TextTokenizer::new(build_tokenizer().expect("build"))
    }

    #[test]
    fn bytes_are_ids_and_text_round_trips() {
        let t = tok();
        assert_eq!(t.encode("Hi!", false).expect("encode"), vec![72, 105, 33]);
        assert_eq!(t.encode("é", false).expect("encode"), vec![0xC3, 0xA9]);
        for text in [
            "",
            "hello world",
            "  two  spaces\n\ttab",
            "ünïcödé ✓ 日本語 🦀🦀",
            "a\u{0}b\u{7f}",
        ] {
            let ids = t.encode(text, false).expect("encode");
            assert_eq!(ids.len(), text.len(), "one token per byte: {text:?}");
            assert_eq!(t.decode(&ids, false).expect("decode"), text);
        }
    }

    #[test]
    fn added_tokens_have_fixed_ids() {
        let t = tok();
        let ids = t.encode(
            "<|im_start|>user <image>\nx<|im_end|><think></think><|endoftext|><video>",
            false,
        );
        assert_eq!(
            ids.expect("encode"),
            vec![
                257,
                b'u' as u32,
                b's' as u32,
                b'e' as u32,
                b'r' as u32,
                b' ' as u32,
                261,
                b'\n' as u32,
                b'x' as u32,
                258,
                259,
                260,
                256,
                262
            ]
        );
        assert_eq!(
            t.decode(&[259, b'a' as u32, 260, 258], true)
                .expect("decode"),
            "<think>a</think>"
        );
        assert_eq!(t.decode(&[400, 511], false).expect("decode"), "");
    }

    #[test]
    fn written_files_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tokenizer_files(dir.path()).expect("write");
        let t = TextTokenizer::from_file(&dir.path().join("tokenizer.json")).expect("load");
        assert_eq!(t.token_id("<image>"), Some(IMAGE_ID));
        let files = crate::ModelFiles::load(dir.path()).expect("model files");
        assert_eq!(files.eos_ids(), &[IM_END_ID, ENDOFTEXT_ID]);
        assert_eq!(
            files.think_close_ids(),
            &[b'\n' as u32, THINK_CLOSE_ID, b'\n' as u32, b'\n' as u32]
        );
    }

    fn render(messages: &[TemplateMessage], mode: Option<&str>) -> String {
        let tpl =
            ChatTemplate::new(CHAT_TEMPLATE, None, Some("<|im_end|>".into())).expect("compile");
        let mut kwargs = serde_json::Map::new();
        if let Some(mode) = mode {
            kwargs.insert("thinking_mode".into(), mode.into());
        }
        tpl.render(messages, true, &kwargs).expect("render")
    }

    fn user(parts: Vec<TemplatePart>) -> TemplateMessage {
        TemplateMessage {
            role: "user".into(),
            parts,
            ..Default::default()
        }
    }

    #[test]
    fn thinking_modes_render_by_hand() {
        let msgs = [user(vec![TemplatePart::Text("Hello".into())])];
        let base = "<|im_start|>user \nHello<|im_end|><|im_start|>assistant\n";
        assert_eq!(render(&msgs, None), base);
        assert_eq!(render(&msgs, Some("auto")), base);
        assert_eq!(render(&msgs, Some("long")), format!("{base}<think>\n"));
        assert_eq!(
            render(&msgs, Some("short")),
            format!("{base}<think>\n\n</think>\n\n")
        );
    }

    #[test]
    fn image_prompt_matches_spec_example() {
        let msgs = [user(vec![
            TemplatePart::Text("Describe this image.".into()),
            TemplatePart::Image,
        ])];
        assert_eq!(
            render(&msgs, Some("auto")),
            "<|im_start|>user <image>\nDescribe this image.<|im_end|><|im_start|>assistant\n"
        );
    }

    #[test]
    fn multi_turn_with_system() {
        let msgs = [
            TemplateMessage {
                role: "system".into(),
                parts: vec![TemplatePart::Text("Be brief.".into())],
                ..Default::default()
            },
            user(vec![TemplatePart::Text("Hi".into())]),
            TemplateMessage {
                role: "assistant".into(),
                parts: vec![TemplatePart::Text("Hello!".into())],
                ..Default::default()
            },
            user(vec![
                TemplatePart::Image,
                TemplatePart::Image,
                TemplatePart::Text("Compare.".into()),
            ]),
        ];
        assert_eq!(
            render(&msgs, Some("short")),
            "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user \nHi<|im_end|>\
             <|im_start|>assistant \nHello!<|im_end|><|im_start|>user <image><image>\nCompare.<|im_end|>\
             <|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    fn text_msg(role: &str, text: &str) -> TemplateMessage {
        TemplateMessage {
            role: role.into(),
            parts: vec![TemplatePart::Text(text.into())],
            ..Default::default()
        }
    }

    #[test]
    fn tool_tokens_have_fixed_ids() {
        let t = tok();
        let ids = t
            .encode(
                "<tool_call>x</tool_call><tool_response></tool_response>",
                false,
            )
            .expect("encode");
        assert_eq!(ids, vec![263, b'x' as u32, 264, 265, 266]);
        assert_eq!(
            t.decode(&[263, 264, 265, 266], true).expect("decode"),
            "<tool_call></tool_call><tool_response></tool_response>",
            "not special: kept when special tokens are skipped"
        );
        let tpl = ChatTemplate::new(CHAT_TEMPLATE, None, None).expect("compile");
        assert!(tpl.uses_tools());
    }

    /// Qwen3's tool convention in R-4B's turn format, written out by hand.
    #[test]
    fn tools_and_an_agent_loop_render_by_hand() {
        let tpl =
            ChatTemplate::new(CHAT_TEMPLATE, None, Some("<|im_end|>".into())).expect("compile");
        let tools = vec![serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})];
        let call = serde_json::json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        let messages = [
            text_msg("system", "Be brief."),
            text_msg("user", "Weather?"),
            TemplateMessage {
                role: "assistant".into(),
                tool_calls: vec![call.clone(), call],
                ..Default::default()
            },
            TemplateMessage {
                tool_call_id: Some("call_1".into()),
                ..text_msg("tool", "18C")
            },
            TemplateMessage {
                tool_call_id: Some("call_1".into()),
                ..text_msg("tool", "19C")
            },
        ];
        let kwargs = serde_json::Map::new();
        let out = tpl
            .render_with_tools(&messages, &tools, true, &kwargs)
            .expect("render");
        let want = concat!(
            "<|im_start|>system \nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}"#,
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>",
            "<|im_start|>user \nWeather?<|im_end|>",
            "<|im_start|>assistant \n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            "\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>",
            "<|im_start|>user \n<tool_response>\n18C\n</tool_response>\n<tool_response>\n19C\n</tool_response><|im_end|>",
            "<|im_start|>assistant\n",
        );
        assert_eq!(out, want);
        // Without tools the conversation renders as before (no tools block, system kept).
        let plain = tpl.render(&messages[..2], true, &kwargs).expect("render");
        assert_eq!(
            plain,
            "<|im_start|>system \nBe brief.<|im_end|><|im_start|>user \nWeather?<|im_end|><|im_start|>assistant\n"
        );
    }
}
