//! Checkpoint access: `model.safetensors` or shards listed in `model.safetensors.index.json`,
//! memory-mapped; a rank reads only the byte ranges of the slices it owns.
//!
//! Tensor names in the model code are the HF ≥ 4.52 names (`model.language_model.*`,
//! `model.vision_tower.vision_model.*`, `model.multi_modal_projector.*`, `model.image_newline`,
//! `lm_head.weight`). [`NameLayout`] maps them onto what the files hold: that layout, the older
//! `language_model.model.*` / `vision_tower.*` / `language_model.lm_head.*` one, what
//! transformers 5 `save_pretrained` writes (`model.language_model.model.*`: its LLaVA weight
//! renaming reversed), and towers saved with or without the `vision_model.` segment
//! (transformers 5 drops it).
//!
//! Every byte a rank copies out of the mapping goes through [`Checkpoint::read`], which counts
//! it (and, when asked, records the ranges) so tests can prove a rank never touches another
//! rank's slice.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::shard::Shard;
use crate::{Error, Result};

/// One byte range read from a checkpoint file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRange {
    /// Index of the file in [`Checkpoint::files`].
    pub file: usize,
    /// First byte (absolute offset in the file).
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
}

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Index of the file in [`Checkpoint::files`].
    pub file: usize,
    /// dtype on disk.
    pub dtype: Dtype,
    /// Shape on disk.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the first element in the file.
    pub start: usize,
    /// Absolute byte offset one past the last element.
    pub end: usize,
}

/// How stored names relate to the canonical (HF ≥ 4.52) names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameLayout {
    /// `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`.
    Current {
        /// Whether the tower keeps the `vision_model.` segment.
        vision_model_segment: bool,
    },
    /// `language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`, `language_model.lm_head.*`.
    Legacy {
        /// Whether the tower keeps the `vision_model.` segment.
        vision_model_segment: bool,
    },
    /// transformers 5 `save_pretrained`: `model.language_model.model.*`, `model.vision_tower.*`,
    /// `model.multi_modal_projector.*`, `lm_head.*` (transformers 5.17 loads it back through its
    /// `language_model.model` → `language_model` renaming).
    Saved5 {
        /// Whether the tower keeps the `vision_model.` segment.
        vision_model_segment: bool,
    },
}

impl NameLayout {
    fn detect(names: &BTreeMap<String, TensorEntry>) -> Result<Self> {
        let any = |prefix: &str| names.keys().any(|k| k.starts_with(prefix));
        if any("model.language_model.model.") {
            Ok(NameLayout::Saved5 {
                vision_model_segment: any("model.vision_tower.vision_model."),
            })
        } else if any("model.language_model.") {
            Ok(NameLayout::Current {
                vision_model_segment: any("model.vision_tower.vision_model."),
            })
        } else if any("language_model.model.") {
            Ok(NameLayout::Legacy {
                vision_model_segment: any("vision_tower.vision_model."),
            })
        } else {
            Err(Error::MissingTensor {
                name: "model.language_model.* (or language_model.model.*): no decoder tensors in the checkpoint"
                    .into(),
            })
        }
    }

    /// The stored name of a canonical name.
    pub fn stored_name(&self, canonical: &str) -> String {
        const VT: &str = "model.vision_tower.vision_model.";
        let (legacy, segment) = match *self {
            NameLayout::Current {
                vision_model_segment,
            } => (false, vision_model_segment),
            NameLayout::Legacy {
                vision_model_segment,
            } => (true, vision_model_segment),
            NameLayout::Saved5 {
                vision_model_segment,
            } => {
                if let Some(rest) = canonical.strip_prefix("model.language_model.") {
                    return format!("model.language_model.model.{rest}");
                }
                (false, vision_model_segment)
            }
        };
        if let Some(rest) = canonical.strip_prefix(VT) {
            let tower = if legacy {
                "vision_tower."
            } else {
                "model.vision_tower."
            };
            let seg = if segment { "vision_model." } else { "" };
            return format!("{tower}{seg}{rest}");
        }
        if !legacy {
            return canonical.to_string();
        }
        if let Some(rest) = canonical.strip_prefix("model.language_model.") {
            format!("language_model.model.{rest}")
        } else if let Some(rest) = canonical.strip_prefix("lm_head.") {
            format!("language_model.lm_head.{rest}")
        } else if let Some(rest) = canonical.strip_prefix("model.") {
            rest.to_string()
        } else {
            canonical.to_string()
        }
    }
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorEntry>,
    layout: NameLayout,
    bytes_read: Mutex<u64>,
    ranges: Mutex<Option<Vec<ByteRange>>>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .field("layout", &self.layout)
            .finish()
    }
}

fn file_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::CheckpointFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors.index.json` (shards) or `dir/model.safetensors`, maps the
    /// files and reads their headers (no tensor data is read here).
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files: Vec<MappedFile> = Vec::new();
        let mut tensors = BTreeMap::new();
        if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| file_err(&index, e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| file_err(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_err(&index, "no `weight_map` object"))?;
            let mut shard_names: Vec<&str> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    file_err(&index, format!("weight_map[{name}] is not a file name"))
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(file_err(
                        &index,
                        format!("weight_map[{name}] = {file} leaves the directory"),
                    ));
                }
                if !shard_names.contains(&file) {
                    shard_names.push(file);
                }
            }
            shard_names.sort_unstable();
            for shard in &shard_names {
                let idx = files.len();
                files.push(Self::map_file(&dir.join(shard))?);
                Self::read_header(idx, &files[idx], &mut tensors)?;
            }
            for (name, file) in map {
                let Some(entry) = tensors.get(name) else {
                    return Err(file_err(
                        &index,
                        format!(
                            "weight_map lists `{name}` in {file}, but that file does not hold it"
                        ),
                    ));
                };
                if files[entry.file].path.file_name().and_then(|s| s.to_str()) != file.as_str() {
                    return Err(file_err(
                        &index,
                        format!("`{name}` is not in {file} as the index says"),
                    ));
                }
            }
        } else if single.exists() {
            files.push(Self::map_file(&single)?);
            Self::read_header(0, &files[0], &mut tensors)?;
        } else {
            return Err(file_err(
                dir,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ));
        }
        let layout = NameLayout::detect(&tensors)?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
            layout,
            bytes_read: Mutex::new(0),
            ranges: Mutex::new(None),
        })
    }

    fn map_file(path: &Path) -> Result<MappedFile> {
        let f = File::open(path).map_err(|e| file_err(path, e.to_string()))?;
        // SAFETY: the mapping is read-only and the checkpoint is not modified while serving;
        // a concurrent truncation by another process could fault, as with any mmap-based loader.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| file_err(path, format!("mmap: {e}")))?;
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    fn read_header(
        idx: usize,
        file: &MappedFile,
        out: &mut BTreeMap<String, TensorEntry>,
    ) -> Result<()> {
        let (header_len, meta) = SafeTensors::read_metadata(&file.map)
            .map_err(|e| file_err(&file.path, format!("bad safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let available = file.map.len().saturating_sub(data_start);
        for (name, info) in meta.tensors() {
            let (s, e) = info.data_offsets;
            if e > available {
                return Err(file_err(
                    &file.path,
                    format!("truncated: tensor `{name}` ends at data byte {e}, the file holds {available}"),
                ));
            }
            let elems: usize = info.shape.iter().product();
            if (e - s) * 8 != elems * info.dtype.bitsize() {
                return Err(file_err(
                    &file.path,
                    format!("tensor `{name}`: byte length does not match its shape"),
                ));
            }
            let entry = TensorEntry {
                file: idx,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + s,
                end: data_start + e,
            };
            if out.insert(name.clone(), entry).is_some() {
                return Err(file_err(
                    &file.path,
                    format!("tensor `{name}` appears in two files"),
                ));
            }
        }
        Ok(())
    }

    /// The directory this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The detected name layout.
    pub fn layout(&self) -> NameLayout {
        self.layout
    }

    /// Paths of the mapped files, in the order [`ByteRange::file`] indexes.
    pub fn files(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// The entry of a canonical tensor name, if stored.
    pub fn entry(&self, canonical: &str) -> Option<&TensorEntry> {
        self.tensors.get(&self.layout.stored_name(canonical))
    }

    /// Whether a canonical tensor name is stored.
    pub fn contains(&self, canonical: &str) -> bool {
        self.entry(canonical).is_some()
    }

    /// Total bytes copied out of the mapping so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.lock().map(|g| *g).unwrap_or(0)
    }

    /// Starts recording every byte range read (for tests and diagnostics).
    pub fn record_reads(&self) {
        if let Ok(mut g) = self.ranges.lock() {
            *g = Some(Vec::new());
        }
    }

    /// The ranges read since [`Checkpoint::record_reads`], sorted.
    pub fn recorded_reads(&self) -> Vec<ByteRange> {
        let mut v = self
            .ranges
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The one place bytes leave the mapping.
    fn read(&self, file: usize, start: usize, end: usize) -> &[u8] {
        if let Ok(mut n) = self.bytes_read.lock() {
            *n += (end - start) as u64;
        }
        if let Ok(mut g) = self.ranges.lock() {
            if let Some(v) = g.as_mut() {
                v.push(ByteRange { file, start, end });
            }
        }
        &self.files[file].map[start..end]
    }

    fn lookup(&self, canonical: &str, expected: &[usize]) -> Result<&TensorEntry> {
        let e = self.entry(canonical).ok_or_else(|| Error::MissingTensor {
            name: canonical.to_string(),
        })?;
        if e.shape != expected {
            return Err(Error::TensorShape {
                name: canonical.to_string(),
                found: e.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        match e.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(e),
            other => Err(Error::TensorDtype {
                name: canonical.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// Loads a whole tensor (replicated on every rank).
    pub fn load(&self, canonical: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let e = self.lookup(canonical, shape)?;
        let mut out = Vec::with_capacity(shape.iter().product());
        decode_into(e.dtype, self.read(e.file, e.start, e.end), &mut out);
        Ok(Tensor::from_vec(out, shape, device)?)
    }

    /// Loads this rank's slice of `dim` 0 (`shape[0] / world` rows), a contiguous byte range.
    pub fn load_rows(
        &self,
        canonical: &str,
        shape: &[usize],
        shard: Shard,
        device: &Device,
    ) -> Result<Tensor> {
        let (dtype, bytes) = self.raw_slice(canonical, shape, shard, Some(0))?;
        let mut out = Vec::with_capacity(bytes.len() / elem_size(dtype));
        decode_into(dtype, &bytes, &mut out);
        let mut local = shape.to_vec();
        local[0] /= shard.world;
        Ok(Tensor::from_vec(out, local, device)?)
    }

    /// Loads this rank's slice of `dim` 1 of a 2-D tensor (`shape[1] / world` columns): one
    /// byte range per row.
    pub fn load_cols(
        &self,
        canonical: &str,
        shape: &[usize],
        shard: Shard,
        device: &Device,
    ) -> Result<Tensor> {
        let (dtype, bytes) = self.raw_slice(canonical, shape, shard, Some(1))?;
        let mut out = Vec::with_capacity(bytes.len() / elem_size(dtype));
        decode_into(dtype, &bytes, &mut out);
        Ok(Tensor::from_vec(
            out,
            (shape[0], shape[1] / shard.world),
            device,
        )?)
    }

    /// This rank's slice of a tensor as stored bytes (no conversion): the whole tensor
    /// (`split` None), its rows (`Some(0)`: one contiguous range, straight out of the mapping) or
    /// its columns of a 2-D tensor (`Some(1)`: one range per row, gathered).
    pub fn raw_slice(
        &self,
        canonical: &str,
        shape: &[usize],
        shard: Shard,
        split: Option<usize>,
    ) -> Result<(Dtype, std::borrow::Cow<'_, [u8]>)> {
        let e = self.lookup(canonical, shape)?;
        let es = elem_size(e.dtype);
        match split {
            None => Ok((e.dtype, self.read(e.file, e.start, e.end).into())),
            Some(0) => {
                let rows = split_len(canonical, shape[0], shard)?;
                let row_bytes = shape[1..].iter().product::<usize>() * es;
                let start = e.start + shard.rank * rows * row_bytes;
                Ok((
                    e.dtype,
                    self.read(e.file, start, start + rows * row_bytes).into(),
                ))
            }
            Some(_) => {
                if shape.len() != 2 {
                    return Err(Error::TensorShape {
                        name: canonical.to_string(),
                        found: e.shape.clone(),
                        expected: shape.to_vec(),
                    });
                }
                let (rows, cols) = (shape[0], shape[1]);
                let local = split_len(canonical, cols, shard)?;
                let mut out = Vec::with_capacity(rows * local * es);
                for r in 0..rows {
                    let start = e.start + (r * cols + shard.rank * local) * es;
                    out.extend_from_slice(self.read(e.file, start, start + local * es));
                }
                Ok((e.dtype, out.into()))
            }
        }
    }

    /// Whether two stored tensors hold the same dtype, shape and bytes (reads both whole).
    pub fn same_tensor(&self, a: &str, b: &str) -> Result<bool> {
        let (Some(ea), Some(eb)) = (self.entry(a), self.entry(b)) else {
            return Ok(false);
        };
        if ea.dtype != eb.dtype || ea.shape != eb.shape {
            return Ok(false);
        }
        let (ea, eb) = (ea.clone(), eb.clone());
        Ok(self.read(ea.file, ea.start, ea.end) == self.read(eb.file, eb.start, eb.end))
    }

    /// Names of all stored tensors (stored names, not canonical).
    pub fn stored_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    /// The stored entries by stored name.
    pub fn entries(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }
}

/// Bytes per element of the float dtypes the loader reads.
fn elem_size(dtype: Dtype) -> usize {
    dtype.bitsize() / 8
}

fn split_len(name: &str, len: usize, shard: Shard) -> Result<usize> {
    if shard.world == 0 || !len.is_multiple_of(shard.world) || shard.rank >= shard.world {
        return Err(Error::TensorParallel {
            tp: shard.world,
            reason: format!(
                "`{name}`: dimension {len} does not split into {} equal parts",
                shard.world
            ),
        });
    }
    Ok(len / shard.world)
}

/// Appends the little-endian elements of `bytes` as f32.
fn decode_into(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        // `lookup` refuses other dtypes before any read.
        _ => {}
    }
}

/// A prefix-scoped view of a checkpoint for one rank, like candle's `VarBuilder`: `pp` pushes a
/// name segment, so model code spells tensor names exactly as in the checkpoint.
#[derive(Clone)]
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    device: Device,
    dtype: DType,
}

impl<'a> Weights<'a> {
    /// The root scope.
    pub fn new(ckpt: &'a Checkpoint, device: &Device, dtype: DType) -> Self {
        Weights {
            ckpt,
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// A child scope `prefix.segment`.
    pub fn pp(&self, segment: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            segment.to_string()
        } else {
            format!("{}.{segment}", self.prefix)
        };
        Weights {
            prefix,
            ..self.clone()
        }
    }

    /// The full canonical name of `name` in this scope.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The checkpoint behind this scope.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// Device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether `name` is stored in this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.name(name))
    }

    fn cast(&self, t: Tensor) -> Result<Tensor> {
        Ok(if t.dtype() == self.dtype {
            t
        } else {
            t.to_dtype(self.dtype)?
        })
    }

    /// A replicated tensor.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.cast(self.ckpt.load(&self.name(name), shape, &self.device)?)
    }

    /// This rank's rows (dim 0 split).
    pub fn rows(&self, name: &str, shape: &[usize], shard: Shard) -> Result<Tensor> {
        self.cast(
            self.ckpt
                .load_rows(&self.name(name), shape, shard, &self.device)?,
        )
    }

    /// This rank's columns (dim 1 split).
    pub fn cols(&self, name: &str, shape: &[usize], shard: Shard) -> Result<Tensor> {
        self.cast(
            self.ckpt
                .load_cols(&self.name(name), shape, shard, &self.device)?,
        )
    }
}
