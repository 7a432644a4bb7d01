//! Splitting generated tokens into reasoning (`<think>…</think>`) and content, by token id.
//!
//! `<think>` and `</think>` are single tokens, so the split happens on ids before
//! detokenization: the markers themselves never reach any text. The split works both when the
//! prompt already opened the block (`thinking_mode = long`: everything before the first
//! `</think>` is reasoning) and when the model opens it itself (auto mode). A `</think>` without
//! an open block is dropped. The first whitespace of each section (the `\n` after `<think>`, the
//! `\n\n` after `</think>`) is trimmed by [`SectionTrim`].

/// Where a piece of output goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// `reasoning_content`.
    Reasoning,
    /// `content`.
    Content,
}

/// What one token id is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routed {
    /// `<think>` or `</think>`: switches the channel; has no text. `left` is the channel that
    /// just ended (flush its detokenizer), `entered` the one that starts.
    Marker {
        /// Channel before the marker.
        left: Channel,
        /// Channel after the marker.
        entered: Channel,
    },
    /// An ordinary token of this channel.
    Text(Channel),
}

/// Token-id state machine of the reasoning split.
#[derive(Clone, Debug)]
pub struct ReasoningSplitter {
    open_id: u32,
    close_id: u32,
    in_think: bool,
}

impl ReasoningSplitter {
    /// A splitter for `<think>` = `open_id`, `</think>` = `close_id`; `open_in_prompt` when the
    /// prompt ends inside a think block.
    pub fn new(open_id: u32, close_id: u32, open_in_prompt: bool) -> Self {
        ReasoningSplitter {
            open_id,
            close_id,
            in_think: open_in_prompt,
        }
    }

    /// The channel the next ordinary token goes to.
    pub fn channel(&self) -> Channel {
        if self.in_think {
            Channel::Reasoning
        } else {
            Channel::Content
        }
    }

    /// Routes one generated id.
    pub fn route(&mut self, id: u32) -> Routed {
        let left = self.channel();
        if id == self.open_id {
            self.in_think = true;
            Routed::Marker {
                left,
                entered: Channel::Reasoning,
            }
        } else if id == self.close_id {
            self.in_think = false;
            Routed::Marker {
                left,
                entered: Channel::Content,
            }
        } else {
            Routed::Text(left)
        }
    }
}

/// Whether a prompt ends inside a think block: its last `<think>` comes after its last
/// `</think>`.
pub fn think_open_in_prompt(prompt: &[u32], open_id: u32, close_id: u32) -> bool {
    let last_open = prompt.iter().rposition(|&t| t == open_id);
    let last_close = prompt.iter().rposition(|&t| t == close_id);
    match (last_open, last_close) {
        (Some(o), Some(c)) => o > c,
        (Some(_), None) => true,
        _ => false,
    }
}

/// Drops the whitespace at the start of a section (until the first other character).
#[derive(Clone, Debug, Default)]
pub struct SectionTrim {
    pending: bool,
}

impl SectionTrim {
    /// Starts a new section: its leading whitespace will be dropped.
    pub fn start(&mut self) {
        self.pending = true;
    }

    /// Passes `text` through, trimmed while the section has shown no other character.
    pub fn apply(&mut self, text: String) -> String {
        if !self.pending {
            return text;
        }
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return String::new();
        }
        self.pending = false;
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: u32 = 259;
    const CLOSE: u32 = 260;

    fn channels(split: &mut ReasoningSplitter, ids: &[u32]) -> Vec<Routed> {
        ids.iter().map(|&i| split.route(i)).collect()
    }

    #[test]
    fn model_opens_the_block() {
        let mut s = ReasoningSplitter::new(OPEN, CLOSE, false);
        let r = channels(&mut s, &[OPEN, 1, CLOSE, 2]);
        assert_eq!(
            r,
            vec![
                Routed::Marker {
                    left: Channel::Content,
                    entered: Channel::Reasoning
                },
                Routed::Text(Channel::Reasoning),
                Routed::Marker {
                    left: Channel::Reasoning,
                    entered: Channel::Content
                },
                Routed::Text(Channel::Content),
            ]
        );
    }

    #[test]
    fn prompt_opened_the_block() {
        let mut s = ReasoningSplitter::new(OPEN, CLOSE, true);
        assert_eq!(s.route(1), Routed::Text(Channel::Reasoning));
        assert_eq!(s.route(2), Routed::Text(Channel::Reasoning));
        assert!(matches!(
            s.route(CLOSE),
            Routed::Marker {
                entered: Channel::Content,
                ..
            }
        ));
        assert_eq!(s.route(3), Routed::Text(Channel::Content));
    }

    #[test]
    fn no_think_at_all_is_content() {
        let mut s = ReasoningSplitter::new(OPEN, CLOSE, false);
        assert_eq!(s.route(1), Routed::Text(Channel::Content));
        // A stray close is a marker (dropped), content continues.
        assert!(matches!(
            s.route(CLOSE),
            Routed::Marker {
                left: Channel::Content,
                entered: Channel::Content
            }
        ));
        assert_eq!(s.route(2), Routed::Text(Channel::Content));
    }

    #[test]
    fn prompt_block_detection() {
        assert!(think_open_in_prompt(&[5, OPEN, 10], OPEN, CLOSE));
        assert!(!think_open_in_prompt(
            &[5, OPEN, 10, CLOSE, 10],
            OPEN,
            CLOSE
        ));
        assert!(!think_open_in_prompt(&[5, 6], OPEN, CLOSE));
        assert!(think_open_in_prompt(&[OPEN, CLOSE, 1, OPEN], OPEN, CLOSE));
    }

    #[test]
    fn section_trim() {
        let mut t = SectionTrim::default();
        assert_eq!(t.apply(" a".into()), " a");
        t.start();
        assert_eq!(t.apply("\n".into()), "");
        assert_eq!(t.apply("\n b ".into()), "b ");
        assert_eq!(t.apply(" c".into()), " c");
    }
}
