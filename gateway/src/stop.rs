//! Stop strings, matched incrementally on streamed text.
//!
//! Text is emitted as soon as it cannot be the start of a stop string; a tail that could still
//! grow into one is held back. On a match the output is cut right before the stop string (which
//! is not included).

/// Result of feeding text to a [`StopMatcher`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopOutput {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string matched; generation should end.
    pub matched: bool,
}

/// Incremental matcher over a set of stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    matched: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        StopMatcher {
            stops,
            held: String::new(),
            matched: false,
        }
    }

    /// Whether a stop string has matched.
    pub fn matched(&self) -> bool {
        self.matched
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, text: &str) -> StopOutput {
        if self.matched {
            return StopOutput {
                emit: String::new(),
                matched: true,
            };
        }
        if self.stops.is_empty() {
            return StopOutput {
                emit: text.to_string(),
                matched: false,
            };
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first {
            self.matched = true;
            let emit = self.held[..pos].to_string();
            self.held.clear();
            return StopOutput {
                emit,
                matched: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| partial_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - hold;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopOutput {
            emit,
            matched: false,
        }
    }

    /// Ends the text: releases what was held (nothing after a match).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Longest `k < stop.len()` such that `text` ends with the first `k` bytes of `stop`.
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .find(|&k| stop.is_char_boundary(k) && text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool) {
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.emit);
            if o.matched {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn match_across_pieces_is_cut() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(
            m.push("abc ST"),
            StopOutput {
                emit: "abc ".into(),
                matched: false
            }
        );
        assert_eq!(
            m.push("O"),
            StopOutput {
                emit: "".into(),
                matched: false
            }
        );
        assert_eq!(
            m.push("Pxyz"),
            StopOutput {
                emit: "".into(),
                matched: true
            }
        );
        assert!(m.matched());
    }

    #[test]
    fn false_start_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(
            m.push("ST"),
            StopOutput {
                emit: "".into(),
                matched: false
            }
        );
        assert_eq!(
            m.push("ART"),
            StopOutput {
                emit: "START".into(),
                matched: false
            }
        );
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn held_tail_released_at_end() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(feed(&mut m, &["line\n"]), ("line\n".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["world".into(), "o w".into()]);
        assert_eq!(feed(&mut m, &["hell", "o world"]), ("hell".into(), true));
    }

    #[test]
    fn multibyte_stop_and_text() {
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(
            m.push("café"),
            StopOutput {
                emit: "caf".into(),
                matched: false
            }
        );
        assert_eq!(
            m.push("!"),
            StopOutput {
                emit: "".into(),
                matched: true
            }
        );
        let mut m = StopMatcher::new(vec!["日本".into()]);
        assert_eq!(
            feed(&mut m, &["今日", "は日", "曜"]),
            ("今日は日曜".into(), false)
        );
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(feed(&mut m, &["a", "b"]), ("ab".into(), false));
    }
}
