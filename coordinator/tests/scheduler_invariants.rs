//! Seeded randomized invariant test of the scheduler, its block manager and prefix cache.
//!
//! Tiny state spaces (vocabulary of a few tokens, 8-30 blocks of 2-4 tokens) make prefix sharing,
//! eviction and preemption frequent. The test keeps its own model of every sequence (prompt,
//! output) and simulates the workers' paged KV cache: each planned chunk is "run" by writing its
//! tokens' identities into the simulated blocks, and before every chunk the positions it attends
//! to must hold exactly this sequence's tokens. That checks prefix-cache hits, block reuse and
//! preemption end to end, without looking at how the scheduler decides.

use std::collections::{HashMap, HashSet};

use r4b_coordinator::scheduler::{
    Finish, ImageSpan, PlannedChunk, Scheduler, SchedulerConfig, SeqEvent, SeqId, SeqRequest,
    StepPlan, Stopping,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EOS: u32 = 2;
const OPEN: u32 = 3;
const CLOSE: u32 = 4;
const IMG: u32 = 9;

/// What a KV slot holds: a text token, or row `index` of the image with digest byte `d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Text(u32),
    Img(u8, usize),
}

/// One image of a prompt: `(start, len, digest byte, encode cost)`.
type Img = (usize, usize, u8, usize);

/// The test's own record of one sequence.
#[derive(Clone, Debug)]
struct Model {
    prompt: Vec<u32>,
    images: Vec<Img>,
    /// Images the workers hold since the latest first chunk (indexes `held.start..held.end`;
    /// images before `held.start` lie inside the prefix hit and were never sent).
    held: std::ops::Range<usize>,
    out: Vec<u32>,
    stopping: Stopping,
    /// Tokens at the latest (re)admission: chunks starting below are prefills.
    admitted_len: usize,
    /// Inside a think block (the test's own tracking of the thinking budget).
    think_open: bool,
    /// Output tokens inside think blocks so far.
    think_used: usize,
}

impl Model {
    fn tokens(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend(&self.out);
        t
    }

    fn key(&self, pos: usize) -> Key {
        match self.image_at(pos) {
            Some(i) => {
                let (start, _, d, _) = self.images[i];
                Key::Img(d, pos - start)
            }
            None => Key::Text(self.tokens()[pos]),
        }
    }

    /// The image whose rows include position `pos`.
    fn image_at(&self, pos: usize) -> Option<usize> {
        self.images
            .iter()
            .position(|&(start, len, _, _)| pos >= start && pos < start + len)
    }
}

struct Harness {
    rng: StdRng,
    cfg: SchedulerConfig,
    s: Scheduler,
    models: HashMap<SeqId, Model>,
    /// Simulated KV: `kv[block][slot]`.
    kv: Vec<Vec<Option<Key>>>,
    next_id: u64,
    finished_ids: Vec<SeqId>,
    steps: usize,
}

impl Harness {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let block_size = rng.random_range(2..=4);
        let num_blocks = rng.random_range(8..=30);
        let max_model_len = (num_blocks * block_size).min(rng.random_range(10..=28));
        let mut cfg = SchedulerConfig::new(num_blocks, block_size, max_model_len);
        cfg.max_batched_tokens = rng.random_range(3..=16);
        cfg.max_num_seqs = rng.random_range(1..=8);
        cfg.max_queue = rng.random_range(2..=8);
        cfg.enable_prefix_caching = rng.random_bool(0.85);
        let s = Scheduler::new(cfg.clone()).expect("valid config");
        Self {
            rng,
            kv: vec![vec![None; block_size]; num_blocks],
            cfg,
            s,
            models: HashMap::new(),
            next_id: 0,
            finished_ids: Vec::new(),
            steps: 0,
        }
    }

    fn random_request(&mut self) -> (SeqRequest, Model) {
        let r = &mut self.rng;
        let max_prompt = (self.cfg.max_model_len - 1).min(14);
        let len = r.random_range(1..=max_prompt);
        let mut prompt: Vec<u32> = (0..len).map(|_| r.random_range(0..2)).collect();
        // Up to two images, in order, each with an encode cost that may exceed the budget.
        let mut images: Vec<Img> = Vec::new();
        let mut from = 0;
        while from < len && images.len() < 2 && r.random_bool(0.35) {
            let start = r.random_range(from..len);
            let ilen = r.random_range(1..=(len - start).min(4));
            let d = r.random_range(1..=2u8);
            prompt[start..start + ilen].fill(IMG);
            images.push((start, ilen, d, r.random_range(1..=20)));
            from = start + ilen;
        }
        let think = r.random_bool(0.3);
        let stopping = Stopping {
            max_new_tokens: r.random_range(1..=8),
            stop_token_ids: vec![EOS],
            min_new_tokens: r.random_range(0..=2),
            ignore_eos: r.random_bool(0.1),
            max_thinking_tokens: think.then(|| r.random_range(0..=3)),
            think_open_id: Some(OPEN),
            think_close_id: Some(CLOSE),
            think_close_ids: if r.random_bool(0.5) {
                vec![CLOSE]
            } else {
                vec![0, CLOSE, 1]
            },
            think_open_in_prompt: think && r.random_bool(0.5),
        };
        // Sometimes reuse the id of a sequence that is gone.
        let id = if !self.finished_ids.is_empty() && r.random_bool(0.2) {
            let i = r.random_range(0..self.finished_ids.len());
            self.finished_ids.swap_remove(i)
        } else {
            self.next_id += 1;
            SeqId(self.next_id)
        };
        let req = SeqRequest {
            id,
            prompt_ids: prompt.clone(),
            images: images
                .iter()
                .map(|&(start, len, d, encode_cost)| ImageSpan {
                    start,
                    len,
                    digest: [d; 32],
                    encode_cost,
                })
                .collect(),
            stopping: stopping.clone(),
            score_prompt: false,
        };
        let model = Model {
            prompt,
            images,
            held: 0..0,
            out: Vec::new(),
            think_open: stopping.think_open_in_prompt,
            stopping,
            admitted_len: 0,
            think_used: 0,
        };
        (req, model)
    }

    fn submit(&mut self) {
        let (req, model) = self.random_request();
        let id = req.id;
        match self.s.submit(req) {
            Ok(()) => {
                self.models.insert(id, model);
            }
            Err(r4b_coordinator::scheduler::SubmitError::Full(back)) => {
                assert_eq!(back.id, id);
                assert!(self.s.stats().waiting >= self.cfg.max_queue);
                self.finished_ids.push(id);
            }
            Err(e) => panic!("valid request refused: {e}"),
        }
    }

    fn abort_random(&mut self) {
        let ids: Vec<SeqId> = self.models.keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        assert!(self.s.abort(id));
        self.models.remove(&id);
        self.finished_ids.push(id);
    }

    /// One scheduler step with checks. Returns false when there was nothing to plan.
    fn step(&mut self, allow_chaos: bool) -> bool {
        let Some(plan) = self.s.schedule() else {
            // With nothing running every block is available, so the head of the queue fits.
            assert!(
                self.models.is_empty(),
                "work left but no plan: {:?}",
                self.s.stats()
            );
            return false;
        };
        self.steps += 1;
        self.check_plan(&plan);
        let mut aborted = HashSet::new();
        if allow_chaos && self.rng.random_bool(0.05) && !plan.chunks.is_empty() {
            let id = plan.chunks[self.rng.random_range(0..plan.chunks.len())].seq_id;
            assert!(self.s.abort(id));
            self.models.remove(&id);
            self.finished_ids.push(id);
            aborted.insert(id);
        }
        // The workers run the step: every chunk's tokens land in its blocks.
        for c in &plan.chunks {
            for (i, _) in c.tokens.iter().enumerate() {
                let pos = c.start_pos + i;
                let key = self.chunk_key(c, i, &aborted);
                let b = c.block_table[pos / self.cfg.block_size] as usize;
                self.kv[b][pos % self.cfg.block_size] = key;
            }
        }
        let mut sampled = Vec::new();
        for c in plan.chunks.iter().filter(|c| c.sample) {
            if allow_chaos && self.rng.random_bool(0.03) {
                continue; // rank 0 lost this one: it must be re-run.
            }
            let t = match self.rng.random_range(0..10) {
                0..=3 => 0,
                4..=6 => 1,
                7 => EOS,
                8 => OPEN,
                _ => CLOSE,
            };
            sampled.push((c.seq_id, t));
        }
        let events = self.s.on_step_done(&plan, &sampled);
        self.check_events(&sampled, &aborted, &events);
        true
    }

    /// The identity of token `i` of chunk `c` (aborted chunks still write: use a marker).
    fn chunk_key(&self, c: &PlannedChunk, i: usize, aborted: &HashSet<SeqId>) -> Option<Key> {
        if aborted.contains(&c.seq_id) {
            return Some(Key::Text(u32::MAX));
        }
        Some(self.models[&c.seq_id].key(c.start_pos + i))
    }

    fn check_plan(&mut self, plan: &StepPlan) {
        let bs = self.cfg.block_size;
        let budget = self.cfg.max_batched_tokens;
        let total: usize = plan.chunks.iter().map(|c| c.tokens.len()).sum();
        assert!(total <= budget, "budget exceeded: {total}");
        // Image encodes count against the budget too; only one image may go over it, alone
        // with one of its rows, as the step's first prefill work.
        let costs: usize = plan
            .chunks
            .iter()
            .flat_map(|c| c.encode_images.clone().map(move |i| (c.seq_id, i)))
            .map(|(id, i)| self.models[&id].images[i].3)
            .sum();
        if total + costs > budget {
            let encoding: Vec<&PlannedChunk> = plan
                .chunks
                .iter()
                .filter(|c| !c.encode_images.is_empty())
                .collect();
            assert_eq!(
                encoding.len(),
                1,
                "over budget with several encodes: {plan:?}"
            );
            let c = encoding[0];
            assert_eq!(c.encode_images.len(), 1, "{plan:?}");
            assert_eq!(
                c.tokens.len(),
                1,
                "an image over budget runs one row: {plan:?}"
            );
            let first_prefill = plan.chunks.iter().find(|x| {
                let m = &self.models[&x.seq_id];
                x.first_chunk || x.start_pos < m.admitted_len
            });
            assert_eq!(first_prefill.map(|x| x.seq_id), Some(c.seq_id), "{plan:?}");
        }
        assert!(plan.chunks.len() <= self.cfg.max_num_seqs);
        let mut seen = HashSet::new();
        // Batch order: decodes, then prefill continuations, then admissions.
        let mut phase = 0;
        for c in &plan.chunks {
            assert!(seen.insert(c.seq_id), "{} planned twice", c.seq_id);
            assert!(!c.tokens.is_empty());
            let end = c.start_pos + c.tokens.len();
            assert_eq!(
                c.block_table.len(),
                end.div_ceil(bs),
                "table must cover exactly the chunk"
            );
            if plan.release.contains(&c.seq_id) {
                assert!(
                    c.first_chunk,
                    "a released id only comes back as a new admission"
                );
            }
            let m = self
                .models
                .get_mut(&c.seq_id)
                .expect("planned sequence is known");
            let tokens = m.tokens();
            if c.first_chunk {
                m.admitted_len = tokens.len();
                assert_eq!(c.history, tokens[..c.start_pos]);
                assert_eq!(c.start_pos % bs, 0, "a prefix hit is whole blocks");
                assert!(c.start_pos < tokens.len(), "never a full-prompt hit");
                // The workers start from nothing; images inside the hit are never sent.
                let skipped = m
                    .images
                    .iter()
                    .take_while(|&&(start, len, _, _)| start + len <= c.start_pos)
                    .count();
                m.held = skipped..skipped;
            } else {
                assert!(c.history.is_empty());
            }
            // Images arrive in order, each once, and before any of their rows is run.
            if !c.encode_images.is_empty() {
                assert_eq!(c.encode_images.start, m.held.end, "{}: {plan:?}", c.seq_id);
                m.held.end = c.encode_images.end;
            }
            for p in c.start_pos..end.min(m.prompt.len()) {
                if let Some(i) = m.image_at(p) {
                    assert!(
                        m.held.contains(&i),
                        "{}: row at {p} of image {i} runs before it was encoded",
                        c.seq_id
                    );
                }
            }
            let this_phase = if c.first_chunk {
                2
            } else if c.start_pos >= m.admitted_len {
                0
            } else {
                1
            };
            assert!(this_phase >= phase, "batch order violated in {plan:?}");
            phase = this_phase;
            assert_eq!(c.tokens, tokens[c.start_pos..end]);
            assert_eq!(c.sample, end == tokens.len());
            assert_eq!(c.prompt_len, m.prompt.len());
            // Row offsets count only the rows of the images the workers hold.
            let rows = (0..c.start_pos)
                .filter(|&p| m.image_at(p).is_some_and(|i| m.held.contains(&i)))
                .count();
            assert_eq!(c.image_row_offset, rows);
            // Everything the chunk attends to must be this sequence's own tokens.
            for p in 0..c.start_pos {
                let b = c.block_table[p / bs] as usize;
                assert_eq!(
                    self.kv[b][p % bs],
                    Some(m.key(p)),
                    "{}: KV at position {p} (block {b}) is not its token",
                    c.seq_id
                );
            }
        }
    }

    fn check_events(
        &mut self,
        sampled: &[(SeqId, u32)],
        aborted: &HashSet<SeqId>,
        events: &[SeqEvent],
    ) {
        let expected: Vec<SeqId> = sampled
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| !aborted.contains(id))
            .collect();
        let got: Vec<SeqId> = events.iter().map(|e| e.seq_id).collect();
        assert_eq!(got, expected, "one event per sampled chunk, in plan order");
        for e in events {
            let token = sampled.iter().find(|(id, _)| *id == e.seq_id).unwrap().1;
            assert_eq!(e.tokens[0], (token, false));
            let m = self.models.get_mut(&e.seq_id).unwrap();
            let before = m.out.len();
            let st = m.stopping.clone();
            m.out.push(token);
            let forced: Vec<u32> = e.tokens[1..]
                .iter()
                .map(|&(t, f)| {
                    assert!(f, "only the first token is sampled");
                    t
                })
                .collect();
            let stop_ok = !st.ignore_eos && before >= st.min_new_tokens && token == EOS;
            let room = (st.max_new_tokens - m.out.len())
                .min(self.cfg.max_model_len - m.prompt.len() - m.out.len());
            // Thinking budget oracle: count tokens inside an open block.
            if !m.think_open && token == OPEN {
                m.think_open = true;
            } else if m.think_open && token == CLOSE {
                m.think_open = false;
            } else if m.think_open {
                m.think_used += 1;
            }
            let spent = m.think_open && st.max_thinking_tokens.is_some_and(|b| m.think_used >= b);
            if !stop_ok && room > 0 && spent {
                let n = room.min(st.think_close_ids.len());
                assert_eq!(
                    forced,
                    st.think_close_ids[..n],
                    "budget spent: close ids forced"
                );
                m.think_open = false;
            } else {
                assert!(forced.is_empty(), "{e:?}: nothing should be forced");
            }
            m.out.extend(&forced);
            let total = m.prompt.len() + m.out.len();
            assert!(m.out.len() <= st.max_new_tokens);
            assert!(total <= self.cfg.max_model_len);
            let length = m.out.len() == st.max_new_tokens || total == self.cfg.max_model_len;
            match e.finish {
                Some(Finish::Stop) => assert!(stop_ok && forced.is_empty()),
                Some(Finish::Length) => assert!(!stop_ok && length),
                None => assert!(!stop_ok && !length, "{e:?} should have finished"),
            }
            if e.finish.is_some() {
                self.models.remove(&e.seq_id);
                self.finished_ids.push(e.seq_id);
            }
        }
    }

    /// State invariants, checked after every operation.
    fn check_state(&self) {
        let bs = self.cfg.block_size;
        let snap = self.s.snapshot();
        let st = self.s.stats();
        assert_eq!(st.blocks_total, self.cfg.num_blocks);
        assert_eq!(
            st.blocks_used + st.blocks_cached + st.blocks_free,
            st.blocks_total
        );
        let used = snap.blocks.iter().filter(|b| b.ref_count > 0).count();
        let idle_cached = snap
            .blocks
            .iter()
            .filter(|b| b.ref_count == 0 && b.cached)
            .count();
        assert_eq!((st.blocks_used, st.blocks_cached), (used, idle_cached));
        assert_eq!(st.running + st.waiting, self.models.len());
        assert_eq!(snap.seqs.len(), self.models.len());
        // Who holds each block, and at which table index.
        let mut holders: HashMap<u32, Vec<(SeqId, usize)>> = HashMap::new();
        for q in &snap.seqs {
            let m = &self.models[&q.id];
            assert_eq!(q.tokens, m.tokens());
            assert_eq!(q.prompt_len, m.prompt.len());
            if !q.running {
                assert!(
                    q.block_table.is_empty() && q.kv_len == 0,
                    "waiting holds no blocks"
                );
                continue;
            }
            assert!(q.block_table.len() * bs >= q.kv_len, "table covers the KV");
            assert!(q.block_table.len() <= q.tokens.len().div_ceil(bs));
            for (i, b) in q.block_table.iter().enumerate() {
                holders.entry(*b).or_default().push((q.id, i));
            }
        }
        assert_eq!(st.running, snap.seqs.iter().filter(|q| q.running).count());
        for (b, state) in snap.blocks.iter().enumerate() {
            let h = holders.get(&(b as u32)).map_or(&[][..], |v| &v[..]);
            assert_eq!(state.ref_count as usize, h.len(), "block {b} ref count");
            if h.len() > 1 {
                assert!(
                    state.cached,
                    "block {b} shared but not a cached prefix block"
                );
                let (first, idx) = h[0];
                let keys = |id: SeqId| {
                    let m = &self.models[&id];
                    (0..(idx + 1) * bs).map(|p| m.key(p)).collect::<Vec<_>>()
                };
                for &(other, oidx) in &h[1..] {
                    assert_ne!(other, first, "a sequence holds block {b} twice");
                    assert_eq!(oidx, idx, "shared block {b} at different positions");
                    assert_eq!(
                        keys(first),
                        keys(other),
                        "shared block {b}: different prefixes"
                    );
                }
            }
        }
    }
}

/// Runs `ops` random operations then drains; returns (preemptions, prefix-hit tokens).
fn run(seed: u64, ops: usize) -> (u64, u64) {
    let mut h = Harness::new(seed);
    for _ in 0..ops {
        match h.rng.random_range(0..100) {
            0..=34 => h.submit(),
            35..=38 => h.abort_random(),
            _ => {
                h.step(true);
            }
        }
        h.check_state();
    }
    // Drain: no new work, no chaos; everything must finish and every block come back.
    let mut guard = 0;
    while h.step(false) {
        h.check_state();
        guard += 1;
        assert!(
            guard < 20_000,
            "seed {seed}: no progress, {:?}",
            h.s.stats()
        );
    }
    let st = h.s.stats();
    assert!(
        h.models.is_empty(),
        "seed {seed}: {} sequences left",
        h.models.len()
    );
    assert_eq!(
        (st.running, st.waiting, st.blocks_used),
        (0, 0, 0),
        "seed {seed}"
    );
    assert!(h.s.snapshot().blocks.iter().all(|b| b.ref_count == 0));
    assert_eq!(st.blocks_cached + st.blocks_free, st.blocks_total);
    assert!(h.s.is_idle());
    (st.preemptions, st.prefix_hit_tokens)
}

#[test]
fn invariants_hold_on_random_workloads() {
    let mut preempted = 0;
    let mut hit = 0;
    for seed in 0..24 {
        let (p, h) = run(seed, 3000);
        preempted += p;
        hit += h;
    }
    // The workloads must actually exercise preemption and prefix hits.
    assert!(preempted > 0, "no preemption happened");
    assert!(hit > 0, "no prefix hit happened");
}

#[test]
fn aborting_everything_returns_every_block() {
    for seed in 100..110 {
        let mut h = Harness::new(seed);
        for _ in 0..500 {
            if h.rng.random_bool(0.5) {
                h.submit();
            } else {
                h.step(true);
            }
        }
        let ids: Vec<SeqId> = h.models.keys().copied().collect();
        for id in ids {
            assert!(h.s.abort(id));
            h.models.remove(&id);
        }
        h.check_state();
        let st = h.s.stats();
        assert_eq!((st.running, st.waiting, st.blocks_used), (0, 0, 0));
        // One plan carries the releases, then the scheduler is idle.
        while h.step(false) {}
        assert!(h.s.is_idle());
    }
}
