//! Checks of a generation request's prompt ids and images that do not need the model's weights:
//! the coordinator runs them on every `Generate` and the worker again on admission.

use r4b_proto::v1 as pb;

/// A prompt id or an image payload the model cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A token id at or above the vocabulary size.
    #[error("prompt token {index} is {id}, outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// Position in the prompt.
        index: usize,
        /// The id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: u32,
    },
    /// An image whose payload does not match its declared geometry.
    #[error("image {index}: {reason}")]
    Image {
        /// Index of the image in the request.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

/// Checks every prompt id against the vocabulary.
pub fn check_prompt_ids(ids: &[u32], vocab_size: u32) -> Result<(), RequestError> {
    match ids.iter().position(|&id| id >= vocab_size) {
        Some(index) => Err(RequestError::TokenOutOfRange {
            index,
            id: ids[index],
            vocab_size,
        }),
        None => Ok(()),
    }
}

/// The image geometry a replica accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Side of one view in pixels (the vision tower's image size).
    pub tile: u32,
    /// Most views one image may have (the base view plus the largest anyres grid).
    pub max_views: u32,
}

impl ImageLimits {
    /// Limits from the flattened `(h, w)` pinpoints of `ModelInfo`: `1 + max(h/tile · w/tile)`.
    pub fn from_pinpoints(tile: u32, pinpoints: &[u32]) -> Self {
        let tiles = pinpoints
            .chunks_exact(2)
            .map(|p| (p[0] / tile.max(1)) * (p[1] / tile.max(1)))
            .max()
            .unwrap_or(0);
        ImageLimits {
            tile,
            max_views: 1 + tiles,
        }
    }
}

/// Checks image `index`'s payload: views within the limit, `views · 3 · tile²` bytes, a size, a
/// positive token count and a 32-byte digest. Whether `num_tokens` is the count the model
/// gives for that size is the worker's check (it owns the anyres geometry).
pub fn check_image(index: usize, img: &pb::Image, limits: ImageLimits) -> Result<(), RequestError> {
    let bad = |reason: String| Err(RequestError::Image { index, reason });
    if img.tile != limits.tile {
        return bad(format!(
            "tile is {}, the model's is {}",
            img.tile, limits.tile
        ));
    }
    if img.views == 0 || img.views > limits.max_views {
        return bad(format!(
            "{} views, expected 1 to {}",
            img.views, limits.max_views
        ));
    }
    let side = u64::from(img.tile);
    let want = u64::from(img.views) * 3 * side * side;
    if img.views_u8.len() as u64 != want {
        return bad(format!(
            "{} bytes of pixels, {} views of 3x{}x{} need {want}",
            img.views_u8.len(),
            img.views,
            img.tile,
            img.tile
        ));
    }
    if img.height == 0 || img.width == 0 {
        return bad(format!("size {}x{} is empty", img.width, img.height));
    }
    if img.num_tokens == 0 {
        return bad("num_tokens is 0".into());
    }
    if img.digest.len() != 32 {
        return bad(format!(
            "digest has {} bytes, expected 32",
            img.digest.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_checked_against_the_vocabulary() {
        assert_eq!(check_prompt_ids(&[0, 1, 511], 512), Ok(()));
        assert_eq!(
            check_prompt_ids(&[3, 512], 512),
            Err(RequestError::TokenOutOfRange {
                index: 1,
                id: 512,
                vocab_size: 512
            })
        );
        assert!(check_prompt_ids(&[u32::MAX], 151_936).is_err());
    }

    fn image(views: u32, tile: u32) -> pb::Image {
        pb::Image {
            views_u8: vec![0; (views * 3 * tile * tile) as usize],
            views,
            tile,
            height: 10,
            width: 20,
            digest: vec![7; 32],
            num_tokens: 5,
        }
    }

    #[test]
    fn image_payloads_must_match_their_geometry() {
        // R-4B's pinpoints reach 6x6 tiles of 384: 1 + 36 views.
        let limits = ImageLimits::from_pinpoints(4, &[24, 24, 4, 8]);
        assert_eq!(limits.max_views, 37);
        assert_eq!(check_image(0, &image(3, 4), limits), Ok(()));
        let field = |img: pb::Image| match check_image(2, &img, limits) {
            Err(RequestError::Image { index: 2, reason }) => reason,
            other => panic!("expected an image error, got {other:?}"),
        };
        assert!(field(image(3, 5)).contains("tile is 5"));
        assert!(field(image(0, 4)).contains("0 views"));
        assert!(field(image(38, 4)).contains("38 views"));
        let mut short = image(3, 4);
        short.views_u8.pop();
        assert!(field(short).contains("143 bytes"));
        let mut no_size = image(1, 4);
        no_size.height = 0;
        assert!(field(no_size).contains("empty"));
        let mut no_tokens = image(1, 4);
        no_tokens.num_tokens = 0;
        assert!(field(no_tokens).contains("num_tokens"));
        let mut digest = image(1, 4);
        digest.digest.truncate(31);
        assert!(field(digest).contains("31 bytes"));
    }
}
