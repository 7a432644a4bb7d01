//! Hand-computed scheduling scenarios. Every expected value below is derived in the comments
//! from the documented policy, not captured from a run.

use r4b_coordinator::scheduler::{
    ConfigError, Finish, ImageSpan, PlannedChunk, Scheduler, SchedulerConfig, SeqEvent, SeqId,
    SeqRequest, StepPlan, Stopping, SubmitError,
};

const EOS: u32 = 2;
const IMG: u32 = 99;

fn config(num_blocks: usize, block_size: usize, max_model_len: usize) -> SchedulerConfig {
    SchedulerConfig::new(num_blocks, block_size, max_model_len)
}

fn sched(cfg: SchedulerConfig) -> Scheduler {
    Scheduler::new(cfg).expect("valid config")
}

fn stopping(max_new: usize) -> Stopping {
    Stopping {
        max_new_tokens: max_new,
        stop_token_ids: vec![EOS],
        ..Stopping::default()
    }
}

fn req(id: u64, prompt: Vec<u32>, max_new: usize) -> SeqRequest {
    SeqRequest {
        id: SeqId(id),
        prompt_ids: prompt,
        images: vec![],
        stopping: stopping(max_new),
        score_prompt: false,
    }
}

/// `n` distinct text tokens starting at `from`.
fn text(from: u32, n: usize) -> Vec<u32> {
    (from..from + n as u32).collect()
}

fn chunk_of(plan: &StepPlan, id: u64) -> &PlannedChunk {
    plan.chunks
        .iter()
        .find(|c| c.seq_id == SeqId(id))
        .unwrap_or_else(|| panic!("seq {id} not in plan {plan:?}"))
}

fn ids(plan: &StepPlan) -> Vec<u64> {
    plan.chunks.iter().map(|c| c.seq_id.0).collect()
}

/// Runs one step: every sampling chunk gets `token`.
fn step(s: &mut Scheduler, token: u32) -> (StepPlan, Vec<SeqEvent>) {
    let plan = s.schedule().expect("something to run");
    let sampled: Vec<_> = plan
        .chunks
        .iter()
        .filter(|c| c.sample)
        .map(|c| (c.seq_id, token))
        .collect();
    let events = s.on_step_done(&plan, &sampled);
    (plan, events)
}

#[test]
fn config_is_checked() {
    assert!(matches!(
        Scheduler::new(config(0, 16, 16)),
        Err(ConfigError::Zero {
            field: "num_blocks"
        })
    ));
    // 4 blocks of 4 tokens hold 16 < 17 tokens.
    assert_eq!(
        Scheduler::new(config(4, 4, 17)).err(),
        Some(ConfigError::KvTooSmall {
            capacity: 16,
            max_model_len: 17
        })
    );
    assert!(Scheduler::new(config(4, 4, 16)).is_ok());
}

#[test]
fn a_5000_token_prompt_is_chunked_2048_2048_904() {
    // 1024 blocks of 16 hold 16384 tokens; budget 2048 (default).
    let mut s = sched(config(1024, 16, 8192));
    let prompt = text(1000, 5000);
    s.submit(req(1, prompt.clone(), 4)).unwrap();

    let (p1, e1) = step(&mut s, 7);
    let c = chunk_of(&p1, 1);
    assert_eq!(
        (c.start_pos, c.tokens.len(), c.sample, c.first_chunk),
        (0, 2048, false, true)
    );
    assert_eq!(c.tokens, prompt[..2048]);
    assert_eq!(c.block_table.len(), 2048 / 16);
    assert_eq!(c.prompt_len, 5000);
    assert!(e1.is_empty(), "no token after a non-final chunk");

    let (p2, e2) = step(&mut s, 7);
    let c = chunk_of(&p2, 1);
    assert_eq!(
        (c.start_pos, c.tokens.len(), c.sample, c.first_chunk),
        (2048, 2048, false, false)
    );
    assert!(c.history.is_empty());
    assert_eq!(c.block_table.len(), 4096 / 16);
    // The table only grows: the first chunk's blocks stay in place.
    assert_eq!(c.block_table[..128], chunk_of(&p1, 1).block_table[..]);
    assert!(e2.is_empty());

    let (p3, e3) = step(&mut s, 7);
    let c = chunk_of(&p3, 1);
    // 5000 - 4096 = 904 tokens, ceil(5000 / 16) = 313 blocks.
    assert_eq!((c.start_pos, c.tokens.len(), c.sample), (4096, 904, true));
    assert_eq!(c.block_table.len(), 313);
    assert_eq!(e3.len(), 1);
    assert_eq!(e3[0].tokens, vec![(7, false)]);
    assert_eq!(e3[0].cached_tokens, Some(0));

    // Then a plain decode of the sampled token at position 5000.
    let (p4, _) = step(&mut s, 8);
    let c = chunk_of(&p4, 1);
    assert_eq!(
        (c.start_pos, c.tokens.clone(), c.sample),
        (5000, vec![7], true)
    );
    assert_eq!(
        c.block_table.len(),
        313,
        "5001 tokens still fit 313 blocks of 16"
    );
}

#[test]
fn decodes_are_scheduled_before_prefills() {
    // Budget 4. A and B (1-token prompts) and P (20 tokens) arrive in that order.
    let mut cfg = config(64, 4, 64);
    cfg.max_batched_tokens = 4;
    let mut s = sched(cfg);
    s.submit(req(1, vec![10], 10)).unwrap();
    s.submit(req(2, vec![11], 10)).unwrap();
    s.submit(req(3, text(100, 20), 10)).unwrap();

    // Step 1: A 1, B 1, P gets the 2 tokens left.
    let (p1, e1) = step(&mut s, 5);
    assert_eq!(ids(&p1), [1, 2, 3]);
    assert_eq!(chunk_of(&p1, 3).tokens.len(), 2);
    assert_eq!(e1.len(), 2);

    // Step 2: A and B decode first (1 token each), P gets the remaining 2.
    let (p2, _) = step(&mut s, 5);
    assert_eq!(ids(&p2), [1, 2, 3]);
    let a = chunk_of(&p2, 1);
    assert_eq!(
        (a.start_pos, a.tokens.clone(), a.sample),
        (1, vec![5], true)
    );
    let p = chunk_of(&p2, 3);
    assert_eq!((p.start_pos, p.tokens.len(), p.sample), (2, 2, false));
    let total: usize = p2.chunks.iter().map(|c| c.tokens.len()).sum();
    assert_eq!(total, 4);
}

#[test]
fn prefills_get_nothing_when_decodes_take_the_budget() {
    let mut cfg = config(64, 4, 64);
    cfg.max_batched_tokens = 2;
    let mut s = sched(cfg);
    s.submit(req(1, vec![10], 10)).unwrap();
    s.submit(req(2, vec![11], 10)).unwrap();
    let _ = step(&mut s, 5);
    s.submit(req(3, text(100, 20), 10)).unwrap();
    for _ in 0..3 {
        let (p, _) = step(&mut s, 5);
        assert_eq!(ids(&p), [1, 2], "the two decodes use the whole budget");
    }
    assert_eq!(s.stats().waiting, 1);
}

#[test]
fn admission_stops_at_max_num_seqs() {
    let mut cfg = config(64, 4, 64);
    cfg.max_num_seqs = 2;
    let mut s = sched(cfg);
    for id in 1..=3 {
        // max_new_tokens = 1: each finishes with its first token.
        s.submit(req(id, vec![10 + id as u32], 1)).unwrap();
    }
    let (p1, e1) = step(&mut s, 5);
    assert_eq!(ids(&p1), [1, 2]);
    assert_eq!(
        e1.iter().map(|e| e.finish).collect::<Vec<_>>(),
        [Some(Finish::Length); 2]
    );
    assert_eq!((s.stats().running, s.stats().waiting), (0, 1));

    let (p2, _) = step(&mut s, 5);
    assert_eq!(ids(&p2), [3]);
    assert_eq!(p2.release, [SeqId(1), SeqId(2)]);
}

#[test]
fn two_block_prefix_hit_shares_blocks_and_sends_history() {
    let mut s = sched(config(64, 4, 64));
    // A: 10 tokens = blocks [0..4) [4..8) full + 2 tokens.
    let a_prompt = text(100, 10);
    s.submit(req(1, a_prompt.clone(), 10)).unwrap();
    let (pa, _) = step(&mut s, 5);
    let a_table = chunk_of(&pa, 1).block_table.clone();

    // B: the same first 8 tokens, then 3 others (11 tokens): at most (11-1)/4 = 2 blocks hit.
    let mut b_prompt = a_prompt[..8].to_vec();
    b_prompt.extend([50, 51, 52]);
    s.submit(req(2, b_prompt.clone(), 10)).unwrap();
    let (p, events) = step(&mut s, 6);
    let b = chunk_of(&p, 2);
    assert_eq!(b.start_pos, 8);
    assert_eq!(b.tokens, [50, 51, 52]);
    assert_eq!(b.history, b_prompt[..8]);
    assert!(b.first_chunk && b.sample);
    assert_eq!(b.block_table[..2], a_table[..2]);
    assert_ne!(b.block_table[2], a_table[2]);
    let snap = s.snapshot();
    assert_eq!(snap.blocks[a_table[0] as usize].ref_count, 2);
    assert_eq!(snap.blocks[a_table[1] as usize].ref_count, 2);
    let stats = s.stats();
    assert_eq!(
        (stats.prefix_hit_tokens, stats.prefix_query_tokens),
        (8, 10 + 11)
    );
    let eb = events.iter().find(|e| e.seq_id == SeqId(2)).unwrap();
    assert_eq!(eb.cached_tokens, Some(8));
}

#[test]
fn a_full_prompt_match_still_computes_the_last_block() {
    let mut s = sched(config(64, 4, 64));
    let prompt = text(100, 8);
    s.submit(req(1, prompt.clone(), 1)).unwrap();
    let (_, e) = step(&mut s, 5);
    assert_eq!(e[0].finish, Some(Finish::Length));
    // Identical 8-token prompt: (8-1)/4 = 1 block may hit; the last block is recomputed.
    s.submit(req(2, prompt.clone(), 1)).unwrap();
    let (p, _) = step(&mut s, 5);
    let c = chunk_of(&p, 2);
    assert_eq!((c.start_pos, c.tokens.clone()), (4, prompt[4..].to_vec()));
    assert_eq!(c.history, prompt[..4]);
}

fn image_req(id: u64, digest: u8) -> SeqRequest {
    // 2 text tokens, 6 <image> tokens, 3 text tokens: 11 tokens, blocks of 4.
    let mut prompt = vec![1, 3];
    prompt.extend([IMG; 6]);
    prompt.extend([4, 5, 6]);
    SeqRequest {
        id: SeqId(id),
        prompt_ids: prompt,
        images: vec![ImageSpan {
            start: 2,
            len: 6,
            digest: [digest; 32],
            encode_cost: 3,
        }],
        stopping: stopping(1),
        score_prompt: false,
    }
}

#[test]
fn image_digests_decide_prefix_hits() {
    let mut s = sched(config(64, 4, 64));
    s.submit(image_req(1, 0xAA)).unwrap();
    let (p, _) = step(&mut s, 5);
    // The first chunk reaches the image: it is encoded in the same step.
    assert_eq!(chunk_of(&p, 1).encode_images, 0..1);
    // Same ids, another image: block 0 holds image rows 0-1, so nothing is shared.
    s.submit(image_req(2, 0xBB)).unwrap();
    let (p, _) = step(&mut s, 5);
    assert_eq!(chunk_of(&p, 2).start_pos, 0);
    // Same image again: (11-1)/4 = 2 blocks hit, so the chunk starts at position 8, after all
    // 6 image rows (positions 2..8): the image is never sent, and no row comes before the chunk
    // among the rows the workers hold for it.
    s.submit(image_req(3, 0xAA)).unwrap();
    let (p, _) = step(&mut s, 5);
    let c = chunk_of(&p, 3);
    assert_eq!(c.start_pos, 8);
    assert_eq!(c.encode_images, 0..0);
    assert_eq!(c.image_row_offset, 0);
    assert_eq!(s.stats().prefix_hit_tokens, 8);
}

#[test]
fn images_are_encoded_under_the_token_budget() {
    // Budget 6; blocks of 4; the image (rows 2..8) costs 3.
    let mut cfg = config(64, 4, 64);
    cfg.max_batched_tokens = 6;
    let mut s = sched(cfg);
    s.submit(image_req(1, 0xAA)).unwrap();
    // Step 1: 2 text tokens, the image (3 of the budget), 1 of its rows.
    let (p, _) = step(&mut s, 5);
    let c = chunk_of(&p, 1);
    assert_eq!(
        (c.encode_images.clone(), c.start_pos, c.tokens.len()),
        (0..1, 0, 3)
    );
    // Step 2: the other 5 rows and 1 text token; nothing to encode.
    let (p, _) = step(&mut s, 5);
    let c = chunk_of(&p, 1);
    assert_eq!(
        (c.encode_images.clone(), c.start_pos, c.tokens.len()),
        (0..0, 3, 6)
    );
    assert_eq!(c.image_row_offset, 1);
}

#[test]
fn an_image_over_budget_is_encoded_when_no_other_prefill_runs() {
    // Budget 2 < the image's cost of 3.
    let mut cfg = config(64, 4, 64);
    cfg.max_batched_tokens = 2;
    let mut s = sched(cfg);
    s.submit(image_req(1, 0xAA)).unwrap();
    let (p, _) = step(&mut s, 5);
    assert_eq!(chunk_of(&p, 1).tokens.len(), 2, "the text before the image");
    let (p, _) = step(&mut s, 5);
    let c = chunk_of(&p, 1);
    assert_eq!(
        (c.encode_images.clone(), c.start_pos, c.tokens.len()),
        (0..1, 2, 1)
    );
}

#[test]
fn preemption_recomputes_the_newest_sequence_from_prompt_plus_output() {
    // 4 blocks of 2 tokens, max_model_len 8.
    let mut s = sched(config(4, 2, 8));
    s.submit(req(1, vec![1, 2, 3], 3)).unwrap();
    s.submit(req(2, vec![4, 5, 6], 10)).unwrap();
    // Step 1: both prefill 3 tokens, 2 blocks each: all 4 blocks used.
    let (p1, _) = step(&mut s, 7);
    assert_eq!(ids(&p1), [1, 2]);
    assert_eq!(s.stats().blocks_used, 4);
    // Step 2: decodes at position 3 still fit in 2 blocks each. A samples 9, B samples 9.
    let (p2, _) = step(&mut s, 9);
    assert_eq!(ids(&p2), [1, 2]);
    // Step 3: A's decode at position 4 needs a 3rd block; none is free or cached, so B (the
    // most recently admitted) is preempted, leaves the plan and is released.
    let plan = s.schedule().unwrap();
    assert_eq!(ids(&plan), [1]);
    assert_eq!(plan.release, [SeqId(2)]);
    assert_eq!(chunk_of(&plan, 1).block_table.len(), 3);
    let st = s.stats();
    assert_eq!((st.preemptions, st.running, st.waiting), (1, 1, 1));
    let snap = s.snapshot();
    let b = snap.seqs.iter().find(|q| q.id == SeqId(2)).unwrap();
    assert_eq!(
        (b.running, b.kv_len, b.tokens.clone()),
        (false, 0, vec![4, 5, 6, 7, 9])
    );
    // A samples 11: its third output, so it finishes (Length).
    let e = s.on_step_done(&plan, &[(SeqId(1), 11)]);
    assert_eq!(e[0].finish, Some(Finish::Length));
    // Step 4: B is re-admitted. Its recompute prompt is [4,5,6,7,9] (prompt + output); block
    // [4,5] is still cached, so it restarts at position 2 with history [4,5].
    let (p4, e4) = step(&mut s, 12);
    assert_eq!(p4.release, [SeqId(1)]);
    let c = chunk_of(&p4, 2);
    assert!(c.first_chunk && c.sample);
    assert_eq!(
        (c.start_pos, c.history.clone(), c.tokens.clone()),
        (2, vec![4, 5], vec![6, 7, 9])
    );
    assert_eq!(c.prompt_len, 3, "the original prompt length is kept");
    // B's output count survived: 2 before + 12 now.
    assert_eq!(e4[0].tokens, vec![(12, false)]);
    assert_eq!(
        e4[0].cached_tokens, None,
        "only the first event of a sequence reports it"
    );
}

#[test]
fn preempted_output_still_counts_against_max_new_tokens() {
    let mut s = sched(config(4, 2, 8));
    s.submit(req(1, vec![1, 2, 3], 3)).unwrap();
    s.submit(req(2, vec![4, 5, 6], 3)).unwrap();
    let _ = step(&mut s, 7);
    let _ = step(&mut s, 9);
    // Step 3 preempts B (see above); A finishes.
    let _ = step(&mut s, 11);
    // B had 2 outputs; its third (after the re-prefill) ends it.
    let (_, e) = step(&mut s, 12);
    assert_eq!(e[0].seq_id, SeqId(2));
    assert_eq!(e[0].finish, Some(Finish::Length));
    assert!(s.stats().preemptions >= 1);
}

#[test]
fn thinking_budget_forces_the_close_tokens_as_one_chunk() {
    const OPEN: u32 = 40;
    const CLOSE: u32 = 41;
    const NL: u32 = 42;
    let mut s = sched(config(64, 4, 64));
    let mut r = req(1, vec![5, OPEN], 20);
    r.stopping.max_thinking_tokens = Some(3);
    r.stopping.think_open_id = Some(OPEN);
    r.stopping.think_close_id = Some(CLOSE);
    r.stopping.think_close_ids = vec![NL, CLOSE, NL];
    r.stopping.think_open_in_prompt = true;
    s.submit(r).unwrap();
    let (_, e1) = step(&mut s, 20);
    let (_, e2) = step(&mut s, 21);
    assert_eq!(
        (e1[0].tokens.clone(), e2[0].tokens.clone()),
        (vec![(20, false)], vec![(21, false)])
    );
    // The third thinking token spends the budget: the close ids follow it, forced.
    let (_, e3) = step(&mut s, 22);
    assert_eq!(
        e3[0].tokens,
        [(22, false), (NL, true), (CLOSE, true), (NL, true)]
    );
    assert_eq!(e3[0].finish, None);
    // Next step feeds 22 and the close ids as one chunk at position 2 + 2 = 4, sampling at its end.
    let (p4, e4) = step(&mut s, 30);
    let c = chunk_of(&p4, 1);
    assert_eq!(
        (c.start_pos, c.tokens.clone(), c.sample),
        (4, vec![22, NL, CLOSE, NL], true)
    );
    assert_eq!(e4[0].tokens, [(30, false)]);
    // Then ordinary decodes: position 8.
    let (p5, _) = step(&mut s, 31);
    assert_eq!(chunk_of(&p5, 1).start_pos, 8);
}

#[test]
fn min_new_tokens_suppresses_an_early_eos() {
    let mut s = sched(config(64, 4, 64));
    let mut r = req(1, vec![5], 10);
    r.stopping.min_new_tokens = 2;
    s.submit(r).unwrap();
    assert_eq!(step(&mut s, EOS).1[0].finish, None);
    assert_eq!(step(&mut s, EOS).1[0].finish, None);
    let (_, e) = step(&mut s, EOS);
    assert_eq!(
        (e[0].tokens.clone(), e[0].finish),
        (vec![(EOS, false)], Some(Finish::Stop))
    );
}

#[test]
fn ignore_eos_runs_to_max_new_tokens() {
    let mut s = sched(config(64, 4, 64));
    let mut r = req(1, vec![5], 3);
    r.stopping.ignore_eos = true;
    s.submit(r).unwrap();
    assert_eq!(step(&mut s, EOS).1[0].finish, None);
    assert_eq!(step(&mut s, EOS).1[0].finish, None);
    assert_eq!(step(&mut s, EOS).1[0].finish, Some(Finish::Length));
}

#[test]
fn length_at_max_new_tokens_and_at_max_model_len() {
    let mut s = sched(config(64, 4, 8));
    // max_new 2 with room to spare.
    s.submit(req(1, vec![5], 2)).unwrap();
    // Prompt 6 of max_model_len 8: the 2nd output reaches 8 tokens.
    s.submit(req(2, text(10, 6), 100)).unwrap();
    let (_, e1) = step(&mut s, 7);
    assert!(e1.iter().all(|e| e.finish.is_none()));
    let (_, e2) = step(&mut s, 7);
    assert_eq!(
        e2.iter().map(|e| e.finish).collect::<Vec<_>>(),
        [Some(Finish::Length); 2]
    );
    assert_eq!(s.stats().running, 0);
}

#[test]
fn stop_token_ends_and_is_reported() {
    let mut s = sched(config(64, 4, 64));
    s.submit(req(1, vec![5], 10)).unwrap();
    let (_, e) = step(&mut s, EOS);
    assert_eq!(
        (e[0].tokens.clone(), e[0].finish),
        (vec![(EOS, false)], Some(Finish::Stop))
    );
}

#[test]
fn full_queue_hands_the_request_back() {
    let mut cfg = config(64, 4, 64);
    cfg.max_queue = 1;
    cfg.max_num_seqs = 1;
    let mut s = sched(cfg);
    // One for the free running slot, one queued.
    s.submit(req(1, vec![5], 10)).unwrap();
    s.submit(req(2, vec![6], 10)).unwrap();
    let third = req(3, vec![6, 7], 10);
    assert_eq!(
        s.submit(third.clone()),
        Err(SubmitError::Full(Box::new(third.clone())))
    );
    // The first runs, the second still waits: no room.
    let _ = step(&mut s, 9);
    assert_eq!(
        s.submit(third.clone()),
        Err(SubmitError::Full(Box::new(third)))
    );
    // Once the first finished and the second runs, the queue has room again.
    s.abort(SeqId(1));
    let _ = step(&mut s, 9);
    assert_eq!(s.submit(req(3, vec![6, 7], 10)), Ok(()));
}

#[test]
fn bad_requests_are_refused() {
    let mut s = sched(config(64, 4, 8));
    assert_eq!(s.submit(req(1, vec![], 1)), Err(SubmitError::Empty));
    assert_eq!(
        s.submit(req(1, text(0, 8), 1)),
        Err(SubmitError::TooLong { len: 8, max: 7 })
    );
    s.submit(req(1, vec![5], 1)).unwrap();
    assert_eq!(
        s.submit(req(1, vec![5], 1)),
        Err(SubmitError::DuplicateId(SeqId(1)))
    );
}

#[test]
fn abort_frees_blocks_and_releases() {
    let mut s = sched(config(64, 4, 64));
    s.submit(req(1, text(10, 9), 10)).unwrap();
    s.submit(req(2, vec![5], 10)).unwrap();
    let _ = step(&mut s, 7);
    // 9 + 1 tokens: 3 blocks for A, 1 for B.
    assert_eq!(s.stats().blocks_used, 4);
    assert!(s.abort(SeqId(1)));
    assert!(s.abort(SeqId(2)));
    assert!(!s.abort(SeqId(3)), "unknown id: no-op");
    let st = s.stats();
    assert_eq!((st.blocks_used, st.running, st.waiting), (0, 0, 0));
    assert_eq!(st.blocks_used + st.blocks_cached + st.blocks_free, 64);
    // A plan with only the releases, then nothing.
    let plan = s.schedule().unwrap();
    assert!(plan.chunks.is_empty());
    assert_eq!(plan.release, [SeqId(1), SeqId(2)]);
    assert!(s.on_step_done(&plan, &[]).is_empty());
    assert!(s.schedule().is_none());
    assert!(s.is_idle());
}

#[test]
fn abort_of_a_waiting_request_needs_no_release() {
    let mut cfg = config(64, 4, 64);
    cfg.max_num_seqs = 1;
    let mut s = sched(cfg);
    s.submit(req(1, vec![5], 10)).unwrap();
    s.submit(req(2, vec![6], 10)).unwrap();
    assert!(s.abort(SeqId(2)));
    assert_eq!(s.stats().waiting, 1, "only the first is left");
    let (p, _) = step(&mut s, 7);
    assert_eq!((ids(&p), p.release.clone()), (vec![1], vec![]));
}

#[test]
fn abort_during_a_step_is_ignored_by_on_step_done() {
    let mut s = sched(config(64, 4, 64));
    s.submit(req(1, vec![5, 6], 10)).unwrap();
    let plan = s.schedule().unwrap();
    assert!(s.schedule().is_none(), "one plan outstanding at a time");
    s.abort(SeqId(1));
    assert!(s.on_step_done(&plan, &[(SeqId(1), 7)]).is_empty());
    assert_eq!(s.stats().blocks_used, 0);
    assert_eq!(s.schedule().unwrap().release, [SeqId(1)]);
}

#[test]
fn a_missing_sample_reruns_the_last_position() {
    let mut s = sched(config(64, 4, 64));
    s.submit(req(1, vec![5, 6, 7], 10)).unwrap();
    let plan = s.schedule().unwrap();
    assert!(s.on_step_done(&plan, &[]).is_empty());
    let plan = s.schedule().unwrap();
    let c = chunk_of(&plan, 1);
    assert_eq!(
        (c.start_pos, c.tokens.clone(), c.sample, c.first_chunk),
        (2, vec![7], true, false)
    );
}

#[test]
fn a_scoring_request_skips_the_prefix_cache_and_max_new_0_ends_after_the_prefill() {
    let mut s = sched(config(64, 4, 64));
    // A: 10 tokens; its two full blocks are cached once computed.
    let prompt = text(100, 10);
    s.submit(req(1, prompt.clone(), 10)).unwrap();
    step(&mut s, 5);
    // B: the same prompt, scored (prompt logprobs) with max_new_tokens = 0. Without the flag
    // (10-1)/4 = 2 blocks would hit; with it every position is computed from 0.
    let mut b = req(2, prompt.clone(), 0);
    b.score_prompt = true;
    s.submit(b).unwrap();
    let (p, events) = step(&mut s, 6);
    let c = chunk_of(&p, 2);
    assert_eq!((c.start_pos, c.tokens.clone()), (0, prompt.clone()));
    assert!(c.history.is_empty() && c.sample);
    // Its sampled token is dropped: no tokens, finished by length, nothing cached reported.
    let e = events.iter().find(|e| e.seq_id == SeqId(2)).unwrap();
    assert_eq!(
        (e.tokens.clone(), e.finish, e.cached_tokens),
        (vec![], Some(Finish::Length), Some(0))
    );
    assert!(!s.snapshot().seqs.iter().any(|q| q.id == SeqId(2)));
}
