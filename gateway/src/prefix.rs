//! The coordinator's KV block hashes, computed here from the tokenized prompt so that a request
//! can be sent where its longest prefix is cached.
//!
//! Mirrors `coordinator/src/scheduler/hash.rs` exactly (both crates pin the same known answer in a
//! test): `hash(block i) = SHA-256("r4b-kv-block-v1", 0 | 1 ‖ hash(block i-1), key of each
//! token)`, where a text token's key is `0 ‖ id` and the `k`-th `<image>` token of an image is
//! `1 ‖ digest ‖ k ‖ id`. Image spans are found as the coordinator finds them: image `i` takes the
//! first `<image>` run after image `i-1`, `num_tokens` long. Replicas publish the first 8 bytes of
//! each hash (little-endian `u64`), and so does [`block_hashes`].

use r4b_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// Most blocks of a prompt hashed for routing (longer prompts are matched on this many).
pub const MAX_ROUTING_BLOCKS: usize = 1024;

struct Span<'a> {
    start: usize,
    len: usize,
    digest: &'a [u8],
}

/// Spans of `images` in `ids`, as the coordinator finds them; `None` if they do not pair up
/// (the coordinator refuses such a request anyway).
fn spans<'a>(ids: &[u32], images: &'a [pb::Image], image_token: u32) -> Option<Vec<Span<'a>>> {
    let mut out = Vec::with_capacity(images.len());
    let mut cursor = 0;
    for img in images {
        let start = ids[cursor..].iter().position(|&t| t == image_token)? + cursor;
        let len = img.num_tokens as usize;
        if start + len > ids.len() || img.digest.len() != 32 {
            return None;
        }
        out.push(Span {
            start,
            len,
            digest: &img.digest,
        });
        cursor = start + len;
    }
    Some(out)
}

/// Routing keys of the full blocks of `ids` (at most [`MAX_ROUTING_BLOCKS`]): the first 8 bytes of
/// each chained block hash. Empty when `block_size` is 0 or the images do not pair up.
pub fn block_hashes(
    ids: &[u32],
    images: &[pb::Image],
    image_token: Option<u32>,
    block_size: usize,
) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let spans = match (images.is_empty(), image_token) {
        (true, _) => Vec::new(),
        (false, Some(t)) => match spans(ids, images, t) {
            Some(s) => s,
            None => return Vec::new(),
        },
        (false, None) => return Vec::new(),
    };
    let blocks = (ids.len() / block_size).min(MAX_ROUTING_BLOCKS);
    let mut out = Vec::with_capacity(blocks);
    let mut prev: Option<[u8; 32]> = None;
    let mut span_i = 0;
    for b in 0..blocks {
        let mut h = Sha256::new();
        h.update(b"r4b-kv-block-v1");
        match &prev {
            Some(p) => {
                h.update([1u8]);
                h.update(p);
            }
            None => h.update([0u8]),
        }
        for (pos, &id) in ids.iter().enumerate().skip(b * block_size).take(block_size) {
            while span_i < spans.len() && spans[span_i].start + spans[span_i].len <= pos {
                span_i += 1;
            }
            match spans.get(span_i).filter(|s| s.start <= pos) {
                Some(s) => {
                    h.update([1u8]);
                    h.update(s.digest);
                    h.update(((pos - s.start) as u32).to_le_bytes());
                    h.update(id.to_le_bytes());
                }
                None => {
                    h.update([0u8]);
                    h.update(id.to_le_bytes());
                }
            }
        }
        let full: [u8; 32] = h.finalize().into();
        let mut key = [0u8; 8];
        key.copy_from_slice(&full[..8]);
        out.push(u64::from_le_bytes(key));
        prev = Some(full);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same prompt and answers as the coordinator's `hash::tests::known_answer`.
    #[test]
    fn known_answer_matches_the_coordinator() {
        let ids: Vec<u32> = vec![1, 2, 3, 7, 7, 7, 4, 5];
        let images = [pb::Image {
            num_tokens: 3,
            digest: vec![0xAB; 32],
            ..Default::default()
        }];
        let h = block_hashes(&ids, &images, Some(7), 4);
        assert_eq!(h, [0xf486_d496_b92c_9564, 0xbeff_ecae_f1d2_d7e7]);
        // As text (no image), block 0 (which holds the image's first row) differs.
        let text = block_hashes(&ids, &[], Some(7), 4);
        assert_ne!(text[0], h[0]);
        // Blocks before any image are plain text hashes.
        assert_eq!(
            block_hashes(&ids[..3], &[], Some(7), 3),
            block_hashes(&[1, 2, 3, 7, 7, 7], &images, Some(7), 3)[..1]
        );
    }

    #[test]
    fn partial_blocks_and_bad_images_give_fewer_keys() {
        assert_eq!(block_hashes(&[1, 2, 3], &[], None, 2).len(), 1);
        assert!(block_hashes(&[1, 2, 3], &[], None, 0).is_empty());
        let bad = [pb::Image {
            num_tokens: 9,
            digest: vec![1; 32],
            ..Default::default()
        }];
        assert!(block_hashes(&[1, 7, 7], &bad, Some(7), 1).is_empty());
    }
}
