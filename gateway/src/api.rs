//! OpenAI request and response types.
//!
//! Request bodies are deserialised in parts from one JSON value: the endpoint's own fields
//! ([`ChatBody`], [`CompletionBody`]) and the shared generation fields ([`CommonParams`]).
//! Unknown fields are ignored, as OpenAI does. Numbers that have bounds are read as wide types
//! (`i64`, `f64`) so that out-of-range values reach validation and get a message naming the bound
//! instead of a type error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with the usage.
    pub include_usage: Option<bool>,
    /// vLLM: every chunk carries the usage so far (prompt, completion so far, total).
    pub continuous_usage_stats: Option<bool>,
}

/// Generation fields shared by chat and completions (OpenAI plus vLLM extensions).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Sampling temperature, [0, 2].
    pub temperature: Option<f64>,
    /// Nucleus mass, (0, 1].
    pub top_p: Option<f64>,
    /// Top-k; -1 or 0 = off.
    pub top_k: Option<i64>,
    /// Min-p, [0, 1].
    pub min_p: Option<f64>,
    /// Sampling seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<StopField>,
    /// Extra stop token ids (vLLM).
    pub stop_token_ids: Option<Vec<i64>>,
    /// Most tokens to generate (deprecated name in chat).
    pub max_tokens: Option<i64>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<i64>,
    /// Presence penalty, [-2, 2].
    pub presence_penalty: Option<f64>,
    /// Frequency penalty, [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// Repetition penalty, > 0 (vLLM).
    pub repetition_penalty: Option<f64>,
    /// Choices to generate.
    pub n: Option<i64>,
    /// Stream SSE chunks.
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Do not stop on EOS before this many tokens (vLLM).
    pub min_tokens: Option<i64>,
    /// Never stop on EOS (vLLM).
    pub ignore_eos: Option<bool>,
    /// Thinking budget in tokens.
    pub max_thinking_tokens: Option<i64>,
    /// Thinking budget (vLLM's name).
    pub thinking_token_budget: Option<i64>,
}

/// Chat-only fields of `/v1/chat/completions`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ChatBody {
    /// Model name.
    pub model: Option<String>,
    /// The conversation (content parts are parsed by the prompt builder).
    pub messages: Option<Vec<ChatMessage>>,
    /// Return log-probabilities.
    pub logprobs: Option<bool>,
    /// Alternatives per position, 0..=20.
    pub top_logprobs: Option<i64>,
    /// Variables for the chat template (`thinking_mode`, ...).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Append the assistant turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Functions the model may call (checked by `tools::ToolRequest::parse`).
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or a named function.
    pub tool_choice: Option<Value>,
    /// Allow several calls in one answer (default true).
    pub parallel_tool_calls: Option<Value>,
    /// vLLM: the log-probability of every prompt token with this many alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM: name tokens `token_id:N` in logprobs instead of their text.
    pub return_tokens_as_token_ids: Option<bool>,
}

/// One message as sent.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` (`developer` is read as `system`).
    pub role: String,
    /// A string, a list of parts, or null.
    #[serde(default)]
    pub content: Value,
    /// An assistant message's calls (`[{id, type, function: {name, arguments}}]`).
    #[serde(default)]
    pub tool_calls: Value,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Value,
}

/// Fields of `/v1/completions`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CompletionBody {
    /// Model name.
    pub model: Option<String>,
    /// A string, a list of token ids, or a list with one string.
    pub prompt: Option<Value>,
    /// Return this many alternatives per position (with the chosen token's log-probability).
    pub logprobs: Option<i64>,
    /// Put the prompt text before each completion (and its tokens' logprobs with `logprobs`).
    pub echo: Option<bool>,
    /// vLLM: the log-probability of every prompt token with this many alternatives.
    pub prompt_logprobs: Option<i64>,
    /// vLLM: name tokens `token_id:N` in logprobs instead of their text (so alternatives whose
    /// text is the same keep distinct keys).
    pub return_tokens_as_token_ids: Option<bool>,
}

/// Fields of `/tokenize` (vLLM): a chat body (`messages`) or a completion body (`prompt`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TokenizeBody {
    /// Model name.
    pub model: Option<String>,
    /// The conversation (chat body), rendered like `/v1/chat/completions` renders it.
    pub messages: Option<Vec<ChatMessage>>,
    /// Functions to render with the conversation (chat body).
    pub tools: Option<Value>,
    /// The prompt text (completion body).
    pub prompt: Option<String>,
    /// Append the assistant turn opener (chat; default true).
    pub add_generation_prompt: Option<bool>,
    /// Variables for the chat template (`thinking_mode`, ...).
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Run the tokenizer's post-processor (default false for chat, true for a prompt).
    pub add_special_tokens: Option<bool>,
    /// Also return each token's vocabulary string.
    pub return_token_strs: Option<bool>,
}

/// Fields of `/detokenize` (vLLM).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DetokenizeBody {
    /// Model name.
    pub model: Option<String>,
    /// Token ids to decode.
    pub tokens: Option<Vec<i64>>,
}

/// Response of `/tokenize`.
#[derive(Clone, Debug, Serialize)]
pub struct TokenizeResponse {
    /// Number of tokens (images expanded).
    pub count: usize,
    /// Context length.
    pub max_model_len: usize,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// Each token's vocabulary string, when `return_token_strs` is true.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
    /// r4b extension: the text that was tokenized (the rendered chat template for a chat body).
    pub prompt: String,
}

/// Response of `/detokenize`.
#[derive(Clone, Debug, Serialize)]
pub struct DetokenizeResponse {
    /// The decoded text (special tokens included).
    pub prompt: String,
}

/// Token usage.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (images expanded).
    pub prompt_tokens: u32,
    /// Generated tokens over all choices.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
    /// Prefix-cache details.
    pub prompt_tokens_details: PromptTokensDetails,
    /// Reasoning tokens (chat only: completions keep the think tags in the text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

/// `usage.completion_tokens_details`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CompletionTokensDetails {
    /// Generated tokens inside the think block (the `<think>`/`</think>` markers excluded).
    pub reasoning_tokens: u32,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: u32,
}

/// One alternative in chat logprobs.
#[derive(Clone, Debug, Serialize)]
pub struct TopLogprobEntry {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// Token bytes.
    pub bytes: Vec<u8>,
}

/// One position in chat logprobs.
#[derive(Clone, Debug, Serialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// Token bytes.
    pub bytes: Vec<u8>,
    /// Most likely alternatives.
    pub top_logprobs: Vec<TopLogprobEntry>,
}

/// `choices[].logprobs` of chat.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The assistant message of a chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct ChatResponseMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The answer.
    pub content: Option<String>,
    /// The reasoning (text inside `<think>…</think>`), null when there was none.
    pub reasoning_content: Option<String>,
    /// The calls parsed from the answer (absent when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
}

/// One call in a chat response.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// `tool_calls[].function`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// One call fragment in a streamed delta: the first has `id`, `type` and `function.name`
/// (with `arguments: ""`), later ones only argument text.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ToolCallDelta {
    /// Position of the call in the choice's calls.
    pub index: u32,
    /// `call_...`, in the first fragment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, in the first fragment.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name and argument text.
    pub function: FunctionCallDelta,
}

/// `tool_calls[].function` of a delta.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FunctionCallDelta {
    /// Function name, in the first fragment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument text.
    pub arguments: String,
}

/// One choice of a chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: u32,
    /// The message.
    pub message: ChatResponseMessage,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Usage.
    pub usage: Usage,
    /// vLLM's `prompt_logprobs` (at the top level in chat, as vLLM has it), when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprobs>>>,
}

/// One prompt position of vLLM's `prompt_logprobs`: token id (as a string key) → entry; the
/// prompt token and its `prompt_logprobs` most likely alternatives.
pub type PromptLogprobs = BTreeMap<String, PromptLogprobEntry>;

/// vLLM's `Logprob` as its API serialises it.
#[derive(Clone, Debug, Serialize)]
pub struct PromptLogprobEntry {
    /// Log-probability (`-9999.0` for `-inf`, as vLLM clamps it).
    pub logprob: f32,
    /// 1 + the number of tokens at least as likely (the token itself excluded).
    pub rank: u32,
    /// The token's text.
    pub decoded_token: String,
}

/// Delta of one streamed chat chunk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New answer text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// New reasoning text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Call fragments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice of a streamed chat chunk.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: u32,
    /// New text.
    pub delta: ChatDelta,
    /// Log-probabilities of the tokens in this chunk.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// `chat.completion.chunk`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletionChunk {
    /// Same id for every chunk of a request.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices in this chunk (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Usage, only in the final usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Legacy completions logprobs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Token texts (`token_id:N` with `return_tokens_as_token_ids`).
    pub tokens: Vec<String>,
    /// Their log-probabilities (`null` for the first echoed prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives per position, token text → log-probability (`null` for the first echoed
    /// prompt token): the `logprobs` most likely plus the position's own token when it is not
    /// among them (OpenAI's "up to logprobs+1"). Alternatives with the same text share one key,
    /// as in vLLM; ask for
    /// `return_tokens_as_token_ids` to keep them apart.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the choice text.
    pub text_offset: Vec<usize>,
}

/// One choice of a text completion (also used for streamed chunks).
#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: u32,
    /// Generated text (new text in a chunk).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null in intermediate chunks.
    pub finish_reason: Option<&'static str>,
    /// vLLM's `prompt_logprobs`: `null` for the first prompt token, then one entry per prompt
    /// token (when asked for, or with `echo` and `logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprobs>>>,
}

/// `text_completion` (whole response or one streamed chunk).
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Usage (always in a whole response; only in the usage chunk when streaming).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `/v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCard {
    /// Served model name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds when the gateway started.
    pub created: u64,
    /// Owner.
    pub owned_by: &'static str,
    /// Context length.
    pub max_model_len: usize,
}

/// `/v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<ModelCard>,
}
