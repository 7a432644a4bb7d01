//! One step: building a plan (`schedule`) and committing its results (`on_step_done`).

use std::collections::HashMap;

use std::ops::Range;

use super::policy::{
    blocks_for, extra_blocks, grant_prefill, image_rows_before, max_prefix_blocks, PrefillGrant,
    TokenBudget,
};
use super::types::{PlannedChunk, SeqEvent, SeqId, StepPlan};
use super::{Scheduler, Sequence};

/// One sequence's part of a plan under construction.
#[derive(Debug)]
struct Item {
    id: SeqId,
    len: usize,
    /// Images encoded before the chunk.
    encode: Range<usize>,
    /// Budget taken (tokens plus encode costs, cut to what was left).
    spent: usize,
}

/// A plan under construction, in batch order.
#[derive(Debug)]
struct PlanBuilder {
    budget: TokenBudget,
    items: Vec<Item>,
    /// Some sequence was preempted while building: admit nobody this step.
    preempted: bool,
    /// A prefill chunk or an image encode is planned (a large image may exceed the budget
    /// only while none is).
    prefill_planned: bool,
}

impl PlanBuilder {
    fn push_prefill(&mut self, id: SeqId, g: PrefillGrant) {
        let spent = g.cost.min(self.budget.left());
        self.budget.spend(spent);
        self.items.push(Item {
            id,
            len: g.len,
            encode: g.encode,
            spent,
        });
    }

    /// Takes a preempted sequence's chunk out of the plan and returns its budget.
    fn remove(&mut self, id: SeqId) {
        if let Some(i) = self.items.iter().position(|it| it.id == id) {
            let it = self.items.remove(i);
            self.budget.refund(it.spent);
        }
    }
}

/// Which running sequences a pass serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Sequences past their prompt: one sampled token (plus forced tokens) each.
    Decode,
    /// Sequences still computing the prompt of their latest admission.
    Prefill,
}

impl Scheduler {
    /// Plans the next step (see the module docs for the policy), or `None` when there is nothing
    /// to run and nothing to release, or while the previous plan awaits
    /// [`on_step_done`](Self::on_step_done).
    ///
    /// A plan may have no chunks and only `release` ids; it still needs its `on_step_done`.
    pub fn schedule(&mut self) -> Option<StepPlan> {
        if self.outstanding {
            return None;
        }
        let mut b = PlanBuilder {
            budget: TokenBudget::new(self.cfg.max_batched_tokens),
            items: Vec::new(),
            preempted: false,
            prefill_planned: false,
        };
        self.schedule_running(&mut b, Pass::Decode);
        self.schedule_running(&mut b, Pass::Prefill);
        if !b.preempted {
            self.admit_waiting(&mut b);
        }
        let plan = self.build_plan(&b);
        if plan.chunks.is_empty() && plan.release.is_empty() {
            return None;
        }
        self.outstanding = true;
        Some(plan)
    }

    /// Commits a finished step: every chunk's tokens are now in the KV cache, `sampled` holds one
    /// token per chunk with `sample = true` (by sequence id). Returns one event per sampled
    /// sequence still held, in plan order.
    ///
    /// Chunks of sequences aborted or preempted meanwhile are ignored, as are tokens for chunks
    /// that did not sample. A sampling chunk without a token is run again: its last position is
    /// recomputed and sampled in the next step. After a failed step the runtime aborts the plan's
    /// sequences and still calls this (with no tokens) to end the step.
    pub fn on_step_done(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) -> Vec<SeqEvent> {
        self.outstanding = false;
        let mut by_seq = HashMap::with_capacity(sampled.len());
        for &(id, token) in sampled {
            by_seq.entry(id).or_insert(token);
        }
        plan.chunks
            .iter()
            .filter_map(|chunk| self.commit_chunk(chunk, &by_seq))
            .collect()
    }

    /// Gives chunks to the running sequences of one pass, oldest admission first.
    fn schedule_running(&mut self, b: &mut PlanBuilder, pass: Pass) {
        let mut i = 0;
        while i < self.running.len() && b.budget.left() > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let want = seq.uncomputed();
            if want == 0 || (pass == Pass::Prefill) != seq.is_prefilling() {
                i += 1;
                continue;
            }
            let grant = match pass {
                Pass::Decode => PrefillGrant {
                    encode: 0..0,
                    len: b.budget.grant(want),
                    cost: b.budget.grant(want),
                },
                Pass::Prefill => grant_prefill(
                    &seq.images,
                    seq.images_ready,
                    (seq.num_computed, seq.tokens.len()),
                    b.budget.left(),
                    !b.prefill_planned,
                ),
            };
            if grant.len == 0 {
                // Waits for an image the budget cannot encode this step.
                i += 1;
                continue;
            }
            let kv_len = seq.num_computed + grant.len;
            if self.reserve_blocks(id, kv_len, b) {
                b.prefill_planned |= pass == Pass::Prefill;
                b.push_prefill(id, grant);
                i += 1;
            } else {
                // `id` preempted itself: it was the last running sequence, the loop ends.
                debug_assert_eq!(i, self.running.len());
            }
        }
    }

    /// Grows `id`'s block table to hold `kv_len` tokens, evicting cached blocks and then
    /// preempting the most recently admitted sequences as needed. Returns false if `id` itself
    /// had to be preempted.
    fn reserve_blocks(&mut self, id: SeqId, kv_len: usize, b: &mut PlanBuilder) -> bool {
        let target = blocks_for(kv_len, self.cfg.block_size);
        loop {
            let Some(seq) = self.seqs.get_mut(&id) else {
                return false;
            };
            if seq.blocks.len() >= target {
                return true;
            }
            if let Some(lease) = self.blocks.allocate() {
                seq.blocks.push(lease);
                continue;
            }
            match self.preempt_last(b) {
                Some(victim) if victim != id => {}
                _ => return false,
            }
        }
    }

    /// Preempts the most recently admitted running sequence (recompute later). Returns its id.
    fn preempt_last(&mut self, b: &mut PlanBuilder) -> Option<SeqId> {
        let id = self.running.pop()?;
        let seq = self.seqs.get_mut(&id)?;
        self.blocks.release_all(&mut seq.blocks);
        seq.preempt();
        if std::mem::take(&mut seq.worker_state) {
            self.release.push(id);
        }
        self.waiting.push_front(id);
        b.remove(id);
        b.preempted = true;
        self.preemptions += 1;
        Some(id)
    }

    /// Admits waiting sequences in FIFO order while the batch cap, the budget and blocks allow.
    fn admit_waiting(&mut self, b: &mut PlanBuilder) {
        while self.running.len() < self.cfg.max_num_seqs && b.budget.left() > 0 {
            let Some(&id) = self.waiting.front() else {
                return;
            };
            if !self.try_admit(id, b) {
                return;
            }
        }
    }

    /// Admits the head of the queue if blocks for its prefix hit and first chunk are available.
    fn try_admit(&mut self, id: SeqId, b: &mut PlanBuilder) -> bool {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        let len = seq.tokens.len();
        // 1. Longest run of cached leading blocks (never the whole prompt).
        let mut hits = 0;
        let mut idle_hits = 0;
        if self.cfg.enable_prefix_caching && !seq.score_prompt {
            for h in seq.hashes_upto(max_prefix_blocks(len, bs), bs) {
                let Some(block) = self.blocks.lookup(h) else {
                    break;
                };
                hits += 1;
                idle_hits += usize::from(self.blocks.is_idle_cached(block));
            }
        }
        // 2. First chunk under the budget (images encoded as it reaches them, the ones inside
        //    the hit excepted), and the fresh blocks it needs.
        let held = |s: &&super::ImageSpan| s.start + s.len <= hits * bs;
        let ready = seq.images.iter().take_while(held).count();
        let grant = grant_prefill(
            &seq.images,
            ready,
            (hits * bs, len),
            b.budget.left(),
            !b.prefill_planned,
        );
        let chunk = grant.len;
        if chunk == 0 {
            return false;
        }
        let fresh = extra_blocks(hits * bs + chunk, hits, bs);
        if self.blocks.num_available() < fresh + idle_hits {
            return false;
        }
        // 3. Take the blocks (cannot fail after the check; undone if it does).
        for i in 0..hits {
            match self.blocks.share(&seq.hashes[i]) {
                Some(lease) => seq.blocks.push(lease),
                None => break,
            }
        }
        let target = blocks_for(hits * bs + chunk, bs);
        while seq.blocks.len() < target {
            match self.blocks.allocate() {
                Some(lease) => seq.blocks.push(lease),
                None => {
                    self.blocks.release_all(&mut seq.blocks);
                    return false;
                }
            }
        }
        if seq.blocks.len() != target {
            // A hit vanished between lookup and share: give everything back.
            self.blocks.release_all(&mut seq.blocks);
            return false;
        }
        // 4. Running.
        seq.admit(hits, bs);
        self.prefix_query_tokens += len as u64;
        self.prefix_hit_tokens += (hits * bs) as u64;
        self.waiting.pop_front();
        self.running.push(id);
        b.prefill_planned = true;
        b.push_prefill(id, grant);
        true
    }

    /// Turns the builder's items into chunks and drains the release list.
    fn build_plan(&mut self, b: &PlanBuilder) -> StepPlan {
        let release = std::mem::take(&mut self.release);
        let chunks = b
            .items
            .iter()
            .filter_map(|it| {
                let seq = self.seqs.get_mut(&it.id)?;
                Some(plan_chunk(seq, it.len, it.encode.clone()))
            })
            .collect();
        StepPlan { chunks, release }
    }

    /// Commits one chunk of a finished step; returns the event of a sampling chunk.
    fn commit_chunk(
        &mut self,
        chunk: &PlannedChunk,
        sampled: &HashMap<SeqId, u32>,
    ) -> Option<SeqEvent> {
        let id = chunk.seq_id;
        let seq = self.seqs.get_mut(&id)?;
        if !seq.running || seq.num_computed != chunk.start_pos {
            return None;
        }
        let end = chunk.start_pos + chunk.tokens.len();
        let token = chunk.sample.then(|| sampled.get(&id).copied()).flatten();
        seq.num_computed = if chunk.sample && token.is_none() {
            end - 1
        } else {
            end
        };
        if self.cfg.enable_prefix_caching {
            register_full_blocks(seq, &mut self.blocks, self.cfg.block_size);
        }
        let (tokens, finish) = seq.append_sampled(token?, self.cfg.max_model_len);
        let cached_tokens = seq.unreported_hit.take();
        if finish.is_some() {
            self.finish(id);
        }
        Some(SeqEvent {
            seq_id: id,
            tokens,
            finish,
            cached_tokens,
        })
    }

    /// Forgets a finished running sequence; its blocks go back (cached where registered).
    fn finish(&mut self, id: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&id) {
            self.running.retain(|&r| r != id);
            self.blocks.release_all(&mut seq.blocks);
            if seq.worker_state {
                self.release.push(id);
            }
        }
    }
}

/// The chunk of `len` tokens of `seq` at its KV frontier, after encoding images `encode`; the
/// sequence's first-chunk flag is consumed.
fn plan_chunk(seq: &mut Sequence, len: usize, encode: Range<usize>) -> PlannedChunk {
    let start = seq.num_computed;
    let end = start + len;
    let first_chunk = std::mem::take(&mut seq.fresh);
    seq.worker_state = true;
    let encode = if encode.is_empty() {
        0..0
    } else {
        seq.images_ready = encode.end;
        encode
    };
    PlannedChunk {
        seq_id: seq.id,
        tokens: seq.tokens[start..end].to_vec(),
        start_pos: start,
        block_table: seq.block_table(),
        prompt_len: seq.prompt_len,
        sample: end == seq.tokens.len(),
        first_chunk,
        encode_images: encode,
        image_row_offset: image_rows_before(&seq.images, start) - seq.image_row_base,
        history: if first_chunk {
            seq.tokens[..start].to_vec()
        } else {
            Vec::new()
        },
    }
}

/// Offers the sequence's newly completed full blocks to the prefix cache.
fn register_full_blocks(seq: &mut Sequence, blocks: &mut super::BlockManager, block_size: usize) {
    let full = (seq.num_computed / block_size).min(seq.blocks.len());
    if full <= seq.registered {
        return;
    }
    seq.hashes_upto(full, block_size);
    for i in seq.registered..full {
        blocks.register(&seq.blocks[i], seq.hashes[i]);
    }
    seq.registered = full;
}
