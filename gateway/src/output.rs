//! [`OutputPipeline`]: generated token ids → reasoning text, content text and log-probabilities.
//!
//! Per token: count it, record its log-probabilities, drop EOS ids from the text, route it by id
//! (reasoning splitter), detokenize it in its channel (never splitting a UTF-8 character), trim
//! the leading whitespace of a new section, and pass content text through the stop-string
//! matcher. Once a stop string matches, later tokens are ignored.
//!
//! Tokens the coordinator appended itself (`Token.forced`: the thinking budget's closing
//! `"\n</think>\n\n"`) are not model text: they count toward `completion_tokens` and drive the
//! reasoning splitter (a forced `</think>` still switches to content), but their text is never
//! emitted and they get no log-probabilities entry.

use std::sync::Arc;

use r4b_proto::v1 as pb;

use crate::metrics::Thinking;
use crate::model_files::StopIds;
use crate::reasoning::{Channel, ReasoningSplitter, Routed, SectionTrim};
use crate::stop::StopMatcher;
use crate::tokens::{Detokenizer, TextTokenizer, TokenizeError};
use crate::validate::ValidatedRequest;

/// Log-probabilities of one generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Alternatives, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Output produced by some tokens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// New reasoning text.
    pub reasoning: String,
    /// New content text.
    pub content: String,
    /// Log-probabilities of the tokens (when asked for).
    pub logprobs: Vec<TokenLogprob>,
    /// Generated tokens this output covers (`continuous_usage_stats`).
    pub tokens: u32,
}

impl Delta {
    /// No text and no log-probabilities.
    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.logprobs.is_empty()
    }

    /// Appends `other`.
    pub fn append(&mut self, other: Delta) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.logprobs.extend(other.logprobs);
        self.tokens += other.tokens;
    }
}

/// Turns one choice's token stream into text.
#[derive(Debug)]
pub struct OutputPipeline {
    splitter: Option<ReasoningSplitter>,
    reasoning: Detokenizer,
    content: Detokenizer,
    reasoning_trim: SectionTrim,
    content_trim: SectionTrim,
    stop: StopMatcher,
    logprobs: bool,
    eos: Vec<u32>,
    generated: u32,
    thinking: Thinking,
    reasoning_tokens: u32,
}

impl OutputPipeline {
    /// The pipeline for one choice of `req`.
    pub fn new(tok: Arc<TextTokenizer>, req: &ValidatedRequest, ids: &StopIds) -> Self {
        let splitter = match (req.split_reasoning, ids.think_open, ids.think_close) {
            (true, Some(open), Some(close)) => Some(ReasoningSplitter::new(
                open,
                close,
                req.think_open_in_prompt,
            )),
            _ => None,
        };
        let mut reasoning_trim = SectionTrim::default();
        let open_in_prompt = splitter
            .as_ref()
            .is_some_and(|s| s.channel() == Channel::Reasoning);
        if open_in_prompt {
            reasoning_trim.start();
        }
        let thinking = Thinking {
            auto: req.thinking_auto && splitter.is_some(),
            thought: open_in_prompt,
            ..Thinking::default()
        };
        let mut eos = if req.params.ignore_eos {
            Vec::new()
        } else {
            ids.eos.clone()
        };
        if !req.params.ignore_eos {
            eos.extend(&req.params.stop_token_ids);
        }
        OutputPipeline {
            splitter,
            reasoning: Detokenizer::new(tok.clone()),
            content: Detokenizer::new(tok),
            reasoning_trim,
            content_trim: SectionTrim::default(),
            stop: StopMatcher::new(req.params.stop_strings.clone()),
            logprobs: req.params.sampling.logprobs,
            eos,
            generated: 0,
            thinking,
            reasoning_tokens: 0,
        }
    }

    /// What the choice did with its think block so far (`None` without a reasoning split).
    pub fn thinking(&self) -> Option<Thinking> {
        self.splitter.as_ref().map(|_| self.thinking)
    }

    /// Generated tokens routed to the reasoning channel so far (markers excluded, the thinking
    /// budget's forced tokens included).
    pub fn reasoning_tokens(&self) -> u32 {
        self.reasoning_tokens
    }

    /// Tokens generated so far (up to the stop-string match, if any).
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Whether a stop string matched.
    pub fn stop_matched(&self) -> bool {
        self.stop.matched()
    }

    /// Processes the next tokens.
    pub fn push(&mut self, tokens: &[pb::Token]) -> Result<Delta, TokenizeError> {
        let mut delta = Delta::default();
        for token in tokens {
            if self.stop.matched() {
                break;
            }
            self.generated += 1;
            delta.tokens += 1;
            if self.logprobs && !token.forced {
                delta.logprobs.push(TokenLogprob {
                    id: token.id,
                    logprob: token.logprob,
                    top: token.top.iter().map(|t| (t.id, t.logprob)).collect(),
                });
            }
            if self.eos.contains(&token.id) {
                continue;
            }
            let routed = match &mut self.splitter {
                Some(s) => s.route(token.id),
                None => Routed::Text(Channel::Content),
            };
            match routed {
                Routed::Marker { left, entered } => {
                    if entered == Channel::Reasoning {
                        self.thinking.thought = true;
                    } else if left == Channel::Reasoning && token.forced {
                        self.thinking.budget_closed = true;
                    }
                    let tail = self.detok(left).flush()?;
                    self.emit(left, tail, &mut delta);
                    match entered {
                        Channel::Reasoning => self.reasoning_trim.start(),
                        Channel::Content if left == Channel::Reasoning => self.content_trim.start(),
                        Channel::Content => {}
                    }
                }
                Routed::Text(Channel::Reasoning) if token.forced => self.reasoning_tokens += 1,
                Routed::Text(_) if token.forced => {}
                Routed::Text(channel) => {
                    if channel == Channel::Reasoning {
                        self.thinking.tokens += 1;
                        self.reasoning_tokens += 1;
                    }
                    let text = self.detok(channel).push(token.id)?;
                    self.emit(channel, text, &mut delta);
                }
            }
        }
        Ok(delta)
    }

    /// Ends the output: flushes held characters and held stop-string prefixes.
    pub fn finish(&mut self) -> Result<Delta, TokenizeError> {
        let mut delta = Delta::default();
        let reasoning = self.reasoning.flush()?;
        self.emit(Channel::Reasoning, reasoning, &mut delta);
        let content = self.content.flush()?;
        self.emit(Channel::Content, content, &mut delta);
        if !self.stop.matched() {
            delta.content.push_str(&self.stop.finish());
        }
        Ok(delta)
    }

    fn detok(&mut self, channel: Channel) -> &mut Detokenizer {
        match channel {
            Channel::Reasoning => &mut self.reasoning,
            Channel::Content => &mut self.content,
        }
    }

    fn emit(&mut self, channel: Channel, text: String, delta: &mut Delta) {
        if text.is_empty() {
            return;
        }
        match channel {
            Channel::Reasoning => delta.reasoning.push_str(&self.reasoning_trim.apply(text)),
            Channel::Content => {
                let text = self.content_trim.apply(text);
                let out = self.stop.push(&text);
                delta.content.push_str(&out.emit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::CommonParams;
    use crate::config::GatewayConfig;
    use crate::embedded::{self, IM_END_ID, THINK_CLOSE_ID, THINK_OPEN_ID};
    use crate::model_files::SamplingDefaults;
    use crate::validate::validate_params;

    fn request(body: serde_json::Value, open_in_prompt: bool, split: bool) -> ValidatedRequest {
        let raw: CommonParams = serde_json::from_value(body).expect("typed");
        let params = validate_params(
            &raw,
            Some(1),
            &SamplingDefaults::default(),
            &GatewayConfig::default(),
        )
        .expect("valid");
        ValidatedRequest {
            id: "x".into(),
            prompt_ids: vec![],
            images: vec![],
            params,
            max_new_tokens: 100,
            think_open_in_prompt: open_in_prompt,
            split_reasoning: split,
            thinking_auto: !open_in_prompt,
        }
    }

    fn pipeline(body: serde_json::Value, open_in_prompt: bool, split: bool) -> OutputPipeline {
        let tok = Arc::new(TextTokenizer::new(
            embedded::build_tokenizer().expect("tok"),
        ));
        let ids = StopIds {
            eos: vec![IM_END_ID, 256],
            think_open: Some(THINK_OPEN_ID),
            think_close: Some(THINK_CLOSE_ID),
            think_close_ids: vec![],
        };
        OutputPipeline::new(tok, &request(body, open_in_prompt, split), &ids)
    }

    fn text(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    fn tokens(ids: &[u32]) -> Vec<pb::Token> {
        ids.iter()
            .map(|&id| pb::Token {
                id,
                logprob: -0.5,
                top: vec![],
                forced: false,
            })
            .collect()
    }

    /// Feeds ids one token per message and returns the joined output.
    fn run(p: &mut OutputPipeline, ids: &[u32]) -> Delta {
        let mut all = Delta::default();
        for t in tokens(ids) {
            all.append(p.push(std::slice::from_ref(&t)).expect("push"));
            if p.stop_matched() {
                break;
            }
        }
        all.append(p.finish().expect("finish"));
        all
    }

    #[test]
    fn model_opened_think_block_is_split() {
        let mut ids = vec![THINK_OPEN_ID];
        ids.extend(text("\nLet me think.\n"));
        ids.push(THINK_CLOSE_ID);
        ids.extend(text("\n\nThe answer is 4."));
        ids.push(IM_END_ID);
        let out = run(&mut pipeline(serde_json::json!({}), false, true), &ids);
        assert_eq!(out.reasoning, "Let me think.\n");
        assert_eq!(out.content, "The answer is 4.");
    }

    #[test]
    fn prompt_opened_think_block_is_split() {
        let mut ids = text("Reasoning…");
        ids.push(THINK_CLOSE_ID);
        ids.extend(text("\n\nÉté"));
        let out = run(&mut pipeline(serde_json::json!({}), true, true), &ids);
        assert_eq!(out.reasoning, "Reasoning…");
        assert_eq!(out.content, "Été");
    }

    #[test]
    fn empty_think_block_gives_no_reasoning() {
        let mut ids = vec![THINK_OPEN_ID];
        ids.extend(text("\n\n"));
        ids.push(THINK_CLOSE_ID);
        ids.extend(text("\n\nHi"));
        let out = run(&mut pipeline(serde_json::json!({}), false, true), &ids);
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("", "Hi"));
    }

    #[test]
    fn without_split_markers_stay_in_text() {
        let mut ids = vec![THINK_OPEN_ID];
        ids.extend(text("a"));
        ids.push(THINK_CLOSE_ID);
        ids.extend(text("b"));
        let out = run(&mut pipeline(serde_json::json!({}), false, false), &ids);
        assert_eq!(
            (out.reasoning.as_str(), out.content.as_str()),
            ("", "<think>a</think>b")
        );
    }

    #[test]
    fn stop_string_cuts_content_and_stops_counting() {
        let mut p = pipeline(serde_json::json!({"stop": ["END"]}), false, true);
        let out = run(&mut p, &text("one two END three"));
        assert_eq!(out.content, "one two ");
        assert!(p.stop_matched());
        assert_eq!(p.generated(), 11); // "one two END" is 11 byte tokens; the rest is not generated text
    }

    #[test]
    fn stop_strings_do_not_apply_to_reasoning() {
        let mut ids = vec![THINK_OPEN_ID];
        ids.extend(text("STOP here"));
        ids.push(THINK_CLOSE_ID);
        ids.extend(text("ok STOP no"));
        let mut p = pipeline(serde_json::json!({"stop": "STOP"}), false, true);
        let out = run(&mut p, &ids);
        assert_eq!(
            (out.reasoning.as_str(), out.content.as_str()),
            ("STOP here", "ok ")
        );
    }

    #[test]
    fn logprobs_cover_every_generated_token() {
        let mut p = pipeline(serde_json::json!({}), false, true);
        let mut toks = tokens(&text("ab"));
        toks[0].top = vec![pb::TopLogprob {
            id: 99,
            logprob: -0.1,
        }];
        toks.push(pb::Token {
            id: IM_END_ID,
            logprob: -0.01,
            top: vec![],
            forced: false,
        });
        let d = p.push(&toks).expect("push");
        assert_eq!(d.content, "ab");
        assert_eq!(d.logprobs.len(), 3);
        assert_eq!(
            d.logprobs[0],
            TokenLogprob {
                id: b'a' as u32,
                logprob: -0.5,
                top: vec![(99, -0.1)]
            }
        );
        assert_eq!(p.generated(), 3);
    }

    /// The thinking budget's closing `"\n</think>\n\n"` as the coordinator appends it.
    fn forced_close() -> Vec<pb::Token> {
        [b'\n' as u32, THINK_CLOSE_ID, b'\n' as u32, b'\n' as u32]
            .iter()
            .map(|&id| pb::Token {
                id,
                logprob: 0.0,
                top: vec![],
                forced: true,
            })
            .collect()
    }

    #[test]
    fn forced_close_is_not_model_text() {
        let mut p = pipeline(serde_json::json!({}), true, true);
        let mut toks = tokens(&text("abcde"));
        toks.extend(forced_close());
        toks.extend(tokens(&text("Yes.")));
        toks.extend(tokens(&[IM_END_ID]));
        let mut out = Delta::default();
        for t in &toks {
            out.append(p.push(std::slice::from_ref(t)).expect("push"));
        }
        out.append(p.finish().expect("finish"));
        assert_eq!(out.reasoning, "abcde");
        assert_eq!(out.content, "Yes.");
        assert_eq!(p.generated(), 5 + 4 + 4 + 1, "forced tokens still count");
        let ids: Vec<u32> = out.logprobs.iter().map(|l| l.id).collect();
        let mut want = text("abcdeYes.");
        want.push(IM_END_ID);
        assert_eq!(ids, want, "no logprobs for forced tokens");
    }

    #[test]
    fn thinking_stats_of_a_budget_close_and_of_an_auto_choice() {
        // The prompt opened the block (long): 5 reasoning tokens, then the budget closed it.
        let mut p = pipeline(serde_json::json!({}), true, true);
        let mut toks = tokens(&text("abcde"));
        toks.extend(forced_close());
        toks.extend(tokens(&text("Yes.")));
        p.push(&toks).expect("push");
        let t = p.thinking().expect("split");
        assert_eq!(
            (t.auto, t.thought, t.tokens, t.budget_closed),
            (false, true, 5, true)
        );
        // Auto: the model opens and closes the block itself.
        let mut p = pipeline(serde_json::json!({}), false, true);
        let mut toks = tokens(&[THINK_OPEN_ID]);
        toks.extend(tokens(&text("hm")));
        toks.extend(tokens(&[THINK_CLOSE_ID]));
        toks.extend(tokens(&text("ok")));
        p.push(&toks).expect("push");
        let t = p.thinking().expect("split");
        assert_eq!(
            (t.auto, t.thought, t.tokens, t.budget_closed),
            (true, true, 2, false)
        );
        // Auto, no think block.
        let mut p = pipeline(serde_json::json!({}), false, true);
        p.push(&tokens(&text("ok"))).expect("push");
        assert_eq!(
            p.thinking().map(|t| (t.auto, t.thought)),
            Some((true, false))
        );
        // No reasoning split (completions): no thinking stats.
        assert!(pipeline(serde_json::json!({}), false, false)
            .thinking()
            .is_none());
    }

    #[test]
    fn forced_close_in_one_message_with_sampled_tokens() {
        let mut p = pipeline(serde_json::json!({"stop": "\n"}), true, true);
        let mut toks = tokens(&text("r1"));
        toks.extend(forced_close());
        toks.extend(tokens(&text("c")));
        let mut out = p.push(&toks).expect("push");
        out.append(p.finish().expect("finish"));
        // The forced "\n\n" never reaches the stop matcher either.
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("r1", "c"));
        assert!(!p.stop_matched());
        assert_eq!(p.generated(), 7);
    }

    #[test]
    fn forced_close_without_split_is_dropped_from_raw_text() {
        let mut p = pipeline(serde_json::json!({}), true, false);
        let mut toks = tokens(&text("r"));
        toks.extend(forced_close());
        toks.extend(tokens(&text("c")));
        let mut out = p.push(&toks).expect("push");
        out.append(p.finish().expect("finish"));
        assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("", "rc"));
        assert_eq!(p.generated(), 6);
    }

    #[test]
    fn multibyte_characters_split_over_messages() {
        let mut p = pipeline(serde_json::json!({}), false, true);
        let ids = text("→€");
        let pieces: Vec<String> = tokens(&ids)
            .iter()
            .map(|t| p.push(std::slice::from_ref(t)).expect("push").content)
            .collect();
        assert_eq!(pieces, vec!["", "", "→", "", "", "€"]);
    }
}
