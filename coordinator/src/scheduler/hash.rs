//! Content hashes of full KV blocks, chained so that a block's hash names its whole prefix.
//!
//! `hash(block i) = SHA-256(tag, hash(block i-1), key(token) for each token of block i)`. A text
//! token's key is its id; an `<image>` token's key is its image's digest and its index within the
//! image, so two prompts with equal ids but different images never share a block.

use sha2::{Digest, Sha256};

use super::types::ImageSpan;

/// Identity of a full block's content and of everything before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct BlockHash(pub(super) [u8; 32]);

/// What a position contributes to its block's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TokenKey<'a> {
    /// A text token (prompt or output).
    Text(u32),
    /// The `index`-th `<image>` token of the image with this digest.
    Image { digest: &'a [u8; 32], index: u32 },
}

/// The key of position `pos` of a sequence whose tokens are `tokens` and whose prompt images are
/// `images` (sorted, non-overlapping; positions past the prompt are text).
pub(super) fn token_key<'a>(tokens: &[u32], images: &'a [ImageSpan], pos: usize) -> TokenKey<'a> {
    // Spans are sorted: the candidate is the last span starting at or before `pos`.
    let i = images.partition_point(|s| s.start <= pos);
    if let Some(span) = i.checked_sub(1).map(|i| &images[i]) {
        if pos < span.start + span.len {
            // Image lengths are bounded by the prompt length, which fits u32 token positions.
            let index = u32::try_from(pos - span.start).unwrap_or(u32::MAX);
            return TokenKey::Image {
                digest: &span.digest,
                index,
            };
        }
    }
    TokenKey::Text(tokens[pos])
}

/// Hash of block `block` (positions `block * block_size ..`, all of which must exist), chained
/// from `prev` (`None` for block 0).
pub(super) fn block_hash(
    prev: Option<&BlockHash>,
    tokens: &[u32],
    images: &[ImageSpan],
    block: usize,
    block_size: usize,
) -> BlockHash {
    let mut h = Sha256::new();
    h.update(b"r4b-kv-block-v1");
    match prev {
        Some(p) => {
            h.update([1u8]);
            h.update(p.0);
        }
        None => h.update([0u8]),
    }
    for pos in block * block_size..(block + 1) * block_size {
        match token_key(tokens, images, pos) {
            TokenKey::Text(id) => {
                h.update([0u8]);
                h.update(id.to_le_bytes());
            }
            TokenKey::Image { digest, index } => {
                h.update([1u8]);
                h.update(digest);
                h.update(index.to_le_bytes());
                h.update(tokens[pos].to_le_bytes());
            }
        }
    }
    BlockHash(h.finalize().into())
}

/// Extends `hashes` (the chained hashes of the first blocks) to the first `blocks` blocks.
pub(super) fn extend_hashes(
    hashes: &mut Vec<BlockHash>,
    tokens: &[u32],
    images: &[ImageSpan],
    blocks: usize,
    block_size: usize,
) {
    while hashes.len() < blocks {
        let next = block_hash(hashes.last(), tokens, images, hashes.len(), block_size);
        hashes.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 7;

    fn span(start: usize, len: usize, d: u8) -> ImageSpan {
        ImageSpan {
            start,
            len,
            digest: [d; 32],
            encode_cost: 1,
        }
    }

    #[test]
    fn token_keys_follow_spans() {
        let tokens = [1, IMG, IMG, 2, IMG, 3];
        let images = [span(1, 2, 0xA), span(4, 1, 0xB)];
        assert_eq!(token_key(&tokens, &images, 0), TokenKey::Text(1));
        assert_eq!(
            token_key(&tokens, &images, 2),
            TokenKey::Image {
                digest: &[0xA; 32],
                index: 1
            }
        );
        assert_eq!(token_key(&tokens, &images, 3), TokenKey::Text(2));
        assert_eq!(
            token_key(&tokens, &images, 4),
            TokenKey::Image {
                digest: &[0xB; 32],
                index: 0
            }
        );
        assert_eq!(token_key(&tokens, &images, 5), TokenKey::Text(3));
    }

    #[test]
    fn equal_content_equal_hash_and_chain_matters() {
        let a = [1, 2, 3, 4, 5, 6];
        let b = [1, 2, 9, 4, 5, 6];
        let mut ha = Vec::new();
        let mut hb = Vec::new();
        extend_hashes(&mut ha, &a, &[], 3, 2);
        extend_hashes(&mut hb, &b, &[], 3, 2);
        assert_eq!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        // Block 2 has the same tokens in both, but a different prefix.
        assert_ne!(ha[2], hb[2]);
    }

    #[test]
    fn image_digest_and_index_change_the_hash() {
        let tokens = [IMG, IMG, 1, 2];
        let h = |images: &[ImageSpan]| block_hash(None, &tokens, images, 0, 2);
        assert_ne!(h(&[span(0, 2, 1)]), h(&[span(0, 2, 2)]));
        assert_eq!(h(&[span(0, 2, 1)]), h(&[span(0, 2, 1)]));
        // Same ids, but as text instead of image rows.
        assert_ne!(h(&[span(0, 2, 1)]), h(&[]));
        // Index within the image: [IMG(img 1, idx 0), IMG(img 1, idx 1)] vs two one-token images.
        assert_ne!(h(&[span(0, 2, 1)]), h(&[span(0, 1, 1), span(1, 1, 1)]));
    }

    /// A pinned answer; `gateway/src/prefix.rs` pins the same one (the gateway computes these
    /// hashes to route a request where its prefix is cached).
    #[test]
    fn known_answer() {
        let tokens = [1, 2, 3, IMG, IMG, IMG, 4, 5];
        let images = [span(3, 3, 0xAB)];
        let mut hs = Vec::new();
        extend_hashes(&mut hs, &tokens, &images, 2, 4);
        let key = |h: &BlockHash| {
            let mut k = [0u8; 8];
            k.copy_from_slice(&h.0[..8]);
            u64::from_le_bytes(k)
        };
        let keys: Vec<u64> = hs.iter().map(key).collect();
        assert_eq!(keys, [0xf486_d496_b92c_9564, 0xbeff_ecae_f1d2_d7e7]);
    }
}
