//! One sequence's state: tokens, KV progress, leases, stopping rules and the thinking budget.

use super::blocks::BlockLease;
use super::hash::{extend_hashes, BlockHash};
use super::types::{Finish, ImageSpan, SeqId, SeqRequest, Stopping, SubmitError};

/// Think-block tracking for the thinking budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ThinkState {
    /// Inside an open think block.
    open: bool,
    /// Tokens generated inside think blocks so far (all blocks together).
    used: usize,
}

impl ThinkState {
    /// The state before any output.
    pub(super) fn new(stopping: &Stopping) -> Self {
        Self {
            open: stopping.think_open_in_prompt,
            used: 0,
        }
    }

    /// Follows one sampled token. Returns true when the budget is spent with a block still open:
    /// the caller must append `think_close_ids` now.
    pub(super) fn observe(&mut self, token: u32, s: &Stopping) -> bool {
        if !self.open && s.think_open_id == Some(token) {
            self.open = true;
        } else if self.open && s.think_close_id == Some(token) {
            self.open = false;
        } else if self.open {
            self.used += 1;
        }
        self.open && s.max_thinking_tokens.is_some_and(|b| self.used >= b)
    }

    /// The scheduler closed the block by appending the close ids.
    pub(super) fn force_closed(&mut self) {
        self.open = false;
    }
}

/// Checks a request's fields that do not depend on the configuration's limits.
pub(super) fn validate_request(req: &SeqRequest, max_model_len: usize) -> Result<(), SubmitError> {
    let len = req.prompt_ids.len();
    if len == 0 {
        return Err(SubmitError::Empty);
    }
    if len >= max_model_len {
        return Err(SubmitError::TooLong {
            len,
            max: max_model_len - 1,
        });
    }
    let mut end = 0;
    for (index, s) in req.images.iter().enumerate() {
        if s.len == 0 || s.start < end || s.start + s.len > len {
            return Err(SubmitError::BadImageSpan { index });
        }
        end = s.start + s.len;
    }
    let st = &req.stopping;
    if st.max_thinking_tokens.is_some() && st.think_close_ids.is_empty() {
        return Err(SubmitError::BadStopping(
            "max_thinking_tokens needs think_close_ids",
        ));
    }
    Ok(())
}

/// A sequence waiting or running.
#[derive(Debug)]
pub(super) struct Sequence {
    /// The id.
    pub(super) id: SeqId,
    /// Prompt then output (sampled and forced), in order.
    pub(super) tokens: Vec<u32>,
    /// Original prompt length.
    pub(super) prompt_len: usize,
    /// Prompt images, sorted and non-overlapping.
    pub(super) images: Vec<ImageSpan>,
    stopping: Stopping,
    think: ThinkState,
    /// Tokens whose KV is computed (committed when their step is done).
    pub(super) num_computed: usize,
    /// `tokens.len()` at the latest admission: below it the sequence is prefilling.
    pub(super) admitted_len: usize,
    /// KV blocks, in position order (empty while waiting).
    pub(super) blocks: Vec<BlockLease>,
    /// Chained hashes of the leading full blocks computed so far (survive preemption).
    pub(super) hashes: Vec<BlockHash>,
    /// Leading blocks already offered to the prefix cache.
    pub(super) registered: usize,
    /// Admitted and not preempted since.
    pub(super) running: bool,
    /// The next planned chunk is the first since (re)admission.
    pub(super) fresh: bool,
    /// The workers may hold this sequence's state (a first chunk went out, no release since).
    pub(super) worker_state: bool,
    /// Images `..images_ready` need no encoding in this admission: inside the prefix hit, or
    /// sent to the workers for encoding already.
    pub(super) images_ready: usize,
    /// `<image>` rows of the images inside the prefix hit (never sent to the workers in this
    /// admission): subtracted from row offsets.
    pub(super) image_row_base: usize,
    /// Prefix-hit tokens of the first admission, until reported with the first event.
    pub(super) unreported_hit: Option<usize>,
    /// Admissions so far.
    pub(super) admissions: u32,
    /// Never admitted on a prefix-cache hit (prompt log-probabilities need every position).
    pub(super) score_prompt: bool,
}

impl Sequence {
    /// A waiting sequence for a validated request.
    pub(super) fn new(req: SeqRequest) -> Self {
        let think = ThinkState::new(&req.stopping);
        Self {
            id: req.id,
            prompt_len: req.prompt_ids.len(),
            tokens: req.prompt_ids,
            images: req.images,
            stopping: req.stopping,
            think,
            num_computed: 0,
            admitted_len: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            registered: 0,
            running: false,
            fresh: true,
            worker_state: false,
            images_ready: 0,
            image_row_base: 0,
            unreported_hit: None,
            admissions: 0,
            score_prompt: req.score_prompt,
        }
    }

    /// Known tokens without KV yet.
    pub(super) fn uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Still computing the prompt of its latest admission (else decoding).
    pub(super) fn is_prefilling(&self) -> bool {
        self.num_computed < self.admitted_len
    }

    /// Output tokens so far (sampled and forced).
    pub(super) fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The chained hashes of the first `blocks` full blocks (all their tokens must be known).
    pub(super) fn hashes_upto(&mut self, blocks: usize, block_size: usize) -> &[BlockHash] {
        extend_hashes(
            &mut self.hashes,
            &self.tokens,
            &self.images,
            blocks,
            block_size,
        );
        &self.hashes[..blocks]
    }

    /// Marks the sequence admitted; its first `hit_blocks` blocks (already in `blocks`, followed
    /// by the fresh blocks of its first chunk) came from the prefix cache.
    pub(super) fn admit(&mut self, hit_blocks: usize, block_size: usize) {
        debug_assert!(self.blocks.len() >= hit_blocks);
        let hit_tokens = hit_blocks * block_size;
        self.num_computed = hit_tokens;
        let inside = |s: &&ImageSpan| s.start + s.len <= hit_tokens;
        self.images_ready = self.images.iter().take_while(inside).count();
        self.image_row_base = self.images.iter().take_while(inside).map(|s| s.len).sum();
        self.registered = hit_blocks;
        self.admitted_len = self.tokens.len();
        self.running = true;
        self.fresh = true;
        if self.admissions == 0 {
            self.unreported_hit = Some(hit_tokens);
        }
        self.admissions += 1;
    }

    /// Back to waiting for a recompute: the caller has taken the blocks. Tokens, output count and
    /// think state are kept, so the re-prefill covers prompt + output and the limits still hold.
    pub(super) fn preempt(&mut self) {
        debug_assert!(self.blocks.is_empty());
        self.num_computed = 0;
        self.registered = 0;
        self.admitted_len = 0;
        self.running = false;
        self.fresh = true;
    }

    /// The block table as it travels to the workers.
    pub(super) fn block_table(&self) -> Vec<u32> {
        self.blocks.iter().map(|l| l.id().get()).collect()
    }

    /// Appends a sampled token and applies the stopping rules and the thinking budget.
    ///
    /// Returns the new tokens with their `forced` flag and the finish reason, if any:
    /// 1. `Stop` if the token is a stop id, `ignore_eos` is off and at least `min_new_tokens`
    ///    tokens were generated before it;
    /// 2. else `Length` at `max_new_tokens` outputs or `max_model_len` tokens;
    /// 3. else, when the thinking budget is spent inside an open block, `think_close_ids` are
    ///    appended as forced tokens (cut to the remaining length) and step 2 is checked again.
    pub(super) fn append_sampled(
        &mut self,
        token: u32,
        max_model_len: usize,
    ) -> (Vec<(u32, bool)>, Option<Finish>) {
        if self.stopping.max_new_tokens == 0 {
            // Scoring only: the prefill is done, the sampled token is not part of the output.
            return (Vec::new(), Some(Finish::Length));
        }
        let before = self.generated();
        self.tokens.push(token);
        let mut out = vec![(token, false)];
        let st = &self.stopping;
        if !st.ignore_eos && before >= st.min_new_tokens && st.stop_token_ids.contains(&token) {
            return (out, Some(Finish::Stop));
        }
        if let Some(f) = self.length_finish(max_model_len) {
            return (out, Some(f));
        }
        if self.think.observe(token, &self.stopping) {
            let room = self.room(max_model_len);
            let forced =
                &self.stopping.think_close_ids[..room.min(self.stopping.think_close_ids.len())];
            self.tokens.extend_from_slice(forced);
            out.extend(forced.iter().map(|&t| (t, true)));
            self.think.force_closed();
        }
        (out, self.length_finish(max_model_len))
    }

    /// Tokens that may still be appended before a length limit.
    fn room(&self, max_model_len: usize) -> usize {
        let by_new = self
            .stopping
            .max_new_tokens
            .saturating_sub(self.generated());
        let by_model = max_model_len.saturating_sub(self.tokens.len());
        by_new.min(by_model)
    }

    fn length_finish(&self, max_model_len: usize) -> Option<Finish> {
        (self.room(max_model_len) == 0).then_some(Finish::Length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 2;
    const OPEN: u32 = 10;
    const CLOSE: u32 = 11;
    const NL: u32 = 12;

    fn seq(prompt: &[u32], stopping: Stopping) -> Sequence {
        Sequence::new(SeqRequest {
            id: SeqId(1),
            prompt_ids: prompt.to_vec(),
            images: vec![],
            stopping,
            score_prompt: false,
        })
    }

    fn stop(max_new: usize) -> Stopping {
        Stopping {
            max_new_tokens: max_new,
            stop_token_ids: vec![EOS],
            ..Stopping::default()
        }
    }

    fn thinking(budget: usize, in_prompt: bool) -> Stopping {
        Stopping {
            max_thinking_tokens: Some(budget),
            think_open_id: Some(OPEN),
            think_close_id: Some(CLOSE),
            think_close_ids: vec![NL, CLOSE, NL],
            think_open_in_prompt: in_prompt,
            ..stop(100)
        }
    }

    #[test]
    fn stop_token_is_reported_and_ends() {
        let mut s = seq(&[5, 6], stop(10));
        assert_eq!(s.append_sampled(7, 100), (vec![(7, false)], None));
        assert_eq!(
            s.append_sampled(EOS, 100),
            (vec![(EOS, false)], Some(Finish::Stop))
        );
        assert_eq!(s.generated(), 2);
    }

    #[test]
    fn min_new_tokens_counts_tokens_before_the_stop() {
        let mut s = seq(
            &[5],
            Stopping {
                min_new_tokens: 2,
                ..stop(10)
            },
        );
        assert_eq!(s.append_sampled(EOS, 100).1, None, "0 generated before");
        assert_eq!(s.append_sampled(EOS, 100).1, None, "1 generated before");
        assert_eq!(s.append_sampled(EOS, 100).1, Some(Finish::Stop));
    }

    #[test]
    fn ignore_eos_and_length() {
        let mut s = seq(
            &[5],
            Stopping {
                ignore_eos: true,
                ..stop(3)
            },
        );
        assert_eq!(s.append_sampled(EOS, 100).1, None);
        assert_eq!(s.append_sampled(EOS, 100).1, None);
        assert_eq!(s.append_sampled(EOS, 100).1, Some(Finish::Length));
    }

    #[test]
    fn max_model_len_ends_with_length() {
        // Prompt 3 + 2 outputs = 5 = max_model_len.
        let mut s = seq(&[5, 5, 5], stop(10));
        assert_eq!(s.append_sampled(7, 5).1, None);
        assert_eq!(s.append_sampled(7, 5).1, Some(Finish::Length));
    }

    #[test]
    fn stop_wins_over_length_on_the_same_token() {
        let mut s = seq(&[5], stop(1));
        assert_eq!(s.append_sampled(EOS, 100).1, Some(Finish::Stop));
    }

    #[test]
    fn thinking_budget_forces_the_close_after_budget_tokens() {
        let mut s = seq(&[5, OPEN], thinking(3, true));
        assert_eq!(s.append_sampled(20, 100), (vec![(20, false)], None));
        assert_eq!(s.append_sampled(21, 100), (vec![(21, false)], None));
        let (toks, fin) = s.append_sampled(22, 100);
        assert_eq!(
            toks,
            vec![(22, false), (NL, true), (CLOSE, true), (NL, true)]
        );
        assert_eq!(fin, None);
        assert_eq!(s.generated(), 6, "forced tokens count as output");
        // Closed now: later tokens are not counted.
        assert_eq!(s.append_sampled(23, 100), (vec![(23, false)], None));
    }

    #[test]
    fn thinking_budget_opened_by_the_model_and_closed_by_it() {
        let mut s = seq(&[5], thinking(2, false));
        assert_eq!(s.append_sampled(20, 100).0.len(), 1, "outside a block");
        assert_eq!(
            s.append_sampled(OPEN, 100).0.len(),
            1,
            "open is not counted"
        );
        assert_eq!(s.append_sampled(21, 100).0.len(), 1);
        assert_eq!(
            s.append_sampled(CLOSE, 100).0.len(),
            1,
            "closed by the model"
        );
        assert_eq!(s.append_sampled(22, 100).0.len(), 1);
        // Re-opened: the budget is shared by all blocks, 1 of 2 is left.
        assert_eq!(s.append_sampled(OPEN, 100).0.len(), 1);
        assert_eq!(
            s.append_sampled(23, 100).0.len(),
            4,
            "budget spent: forced close"
        );
    }

    #[test]
    fn forced_tokens_are_cut_at_max_new_tokens() {
        let mut s = seq(
            &[OPEN],
            Stopping {
                max_new_tokens: 3,
                ..thinking(1, true)
            },
        );
        let (toks, fin) = s.append_sampled(20, 100);
        assert_eq!(toks, vec![(20, false), (NL, true), (CLOSE, true)]);
        assert_eq!(fin, Some(Finish::Length));
    }

    #[test]
    fn max_new_tokens_0_ends_at_the_prefill_with_no_token() {
        let mut s = seq(&[5, 6, 7], stop(0));
        assert_eq!(s.append_sampled(EOS, 64), (vec![], Some(Finish::Length)));
        assert_eq!((s.tokens.len(), s.generated()), (3, 0));
    }

    #[test]
    fn validation() {
        let req = |prompt: Vec<u32>, images: Vec<ImageSpan>, stopping: Stopping| SeqRequest {
            id: SeqId(1),
            prompt_ids: prompt,
            images,
            stopping,
            score_prompt: false,
        };
        let span = |start, len| ImageSpan {
            start,
            len,
            encode_cost: 1,
            digest: [0; 32],
        };
        let ok = stop(1);
        assert_eq!(
            validate_request(&req(vec![], vec![], ok.clone()), 8),
            Err(SubmitError::Empty)
        );
        assert_eq!(
            validate_request(&req(vec![1; 8], vec![], ok.clone()), 8),
            Err(SubmitError::TooLong { len: 8, max: 7 })
        );
        assert_eq!(
            validate_request(&req(vec![1; 7], vec![], ok.clone()), 8),
            Ok(())
        );
        assert_eq!(
            validate_request(
                &req(vec![1; 4], vec![span(0, 2), span(1, 2)], ok.clone()),
                8
            ),
            Err(SubmitError::BadImageSpan { index: 1 })
        );
        assert_eq!(
            validate_request(&req(vec![1; 4], vec![span(3, 2)], ok.clone()), 8),
            Err(SubmitError::BadImageSpan { index: 0 })
        );
        // max_new_tokens = 0 scores the prompt only.
        assert_eq!(validate_request(&req(vec![1], vec![], stop(0)), 8), Ok(()));
        let no_close = Stopping {
            think_close_ids: vec![],
            ..thinking(3, true)
        };
        assert!(matches!(
            validate_request(&req(vec![1], vec![], no_close), 8),
            Err(SubmitError::BadStopping(_))
        ));
    }
}
