//! Byte- and text-level mutations of corpus seeds, shared by the targets.

use fastrand::Rng;

/// Values that tend to hit edges in headers and numbers.
const INTERESTING_U32: [u32; 12] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
];

/// A random index below `n` (`n` > 0).
pub fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> Option<&'a T> {
    if items.is_empty() {
        None
    } else {
        items.get(rng.usize(..items.len()))
    }
}

/// Applies 1..=`max` random byte mutations to `data`.
pub fn bytes(rng: &mut Rng, data: &mut Vec<u8>, max: usize, dict: &[&[u8]]) {
    let rounds = rng.usize(1..=max.max(1));
    for _ in 0..rounds {
        let len = data.len();
        match rng.u8(..9) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                data[i] ^= 1 << rng.u8(..8);
            }
            1 if len > 0 => {
                let i = rng.usize(..len);
                data[i] = rng.u8(..);
            }
            2 if len > 0 => {
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..=16)).min(len);
                data.drain(start..end);
            }
            3 => {
                let at = rng.usize(..=len);
                let n = rng.usize(1..=16);
                let ins: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                data.splice(at..at, ins);
            }
            4 if len >= 4 => {
                // An interesting value, either endianness, at a random offset.
                let i = rng.usize(..=len - 4);
                let v = INTERESTING_U32[rng.usize(..INTERESTING_U32.len())];
                let b = if rng.bool() {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let width = [1, 2, 4][rng.usize(..3)];
                data[i..i + width].copy_from_slice(&b[4 - width..]);
            }
            5 if len > 1 => {
                // Duplicate a chunk.
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..=64)).min(len);
                let chunk = data[start..end].to_vec();
                let at = rng.usize(..=len);
                data.splice(at..at, chunk);
            }
            6 => {
                if let Some(word) = pick(rng, dict) {
                    let at = rng.usize(..=len);
                    data.splice(at..at, word.iter().copied());
                }
            }
            7 if len > 0 => {
                data.truncate(rng.usize(..len));
            }
            _ => {
                if let Some(word) = pick(rng, dict) {
                    if len >= word.len() && !word.is_empty() {
                        let at = rng.usize(..=len - word.len());
                        data[at..at + word.len()].copy_from_slice(word);
                    }
                }
            }
        }
    }
}

/// Splices the head of `a` with the tail of `b`.
pub fn splice(rng: &mut Rng, a: &[u8], b: &[u8]) -> Vec<u8> {
    let cut_a = rng.usize(..=a.len());
    let cut_b = rng.usize(..=b.len());
    let mut out = a[..cut_a].to_vec();
    out.extend_from_slice(&b[cut_b..]);
    out
}

/// Pieces of text that stress the tokenizer, the template and the escaping: every special and
/// added token of the embedded tokenizer, template syntax, the private-use escape marks,
/// unusual unicode.
pub const TEXT_PIECES: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<image>",
    "<video>",
    "<|im_start|>system\n",
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end",
    "|>",
    "<",
    "{{",
    "}}",
    "{{ messages }}",
    "{% for m in messages %}{{ m }}{% endfor %}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{{ raise_exception('x') }}",
    "{% raw %}",
    "\u{E000}",
    "\u{E001}",
    "\u{E002}",
    "\u{E000}\u{E001}",
    "\u{E000}\u{E002}",
    "\u{E003}",
    "\u{FFFD}",
    "\u{0}",
    "\u{200B}",
    "\u{202E}",
    "\u{FEFF}",
    "e\u{301}",
    "\u{1F600}",
    "\u{10FFFF}",
    "Ω",
    "日本語",
    "\r\n",
    "\n",
    "\t",
    " ",
    "\\",
    "\"",
    "'",
];

/// A random string of up to `max` pieces from [`TEXT_PIECES`], ASCII and random characters.
pub fn text(rng: &mut Rng, max: usize) -> String {
    let mut s = String::new();
    for _ in 0..rng.usize(0..=max) {
        match rng.u8(..4) {
            0 | 1 => s.push_str(TEXT_PIECES[rng.usize(..TEXT_PIECES.len())]),
            2 => s.push(rng.alphanumeric()),
            _ => s.push(char::from_u32(rng.u32(..0x11_0000)).unwrap_or('?')),
        }
    }
    s
}
