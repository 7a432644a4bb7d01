//! `preprocessor_config.json`: what the HF image processor (`LlavaOnevisionImageProcessorPil`)
//! would use — mean/std, rescale factor, resampling filter (PIL codes 0–5), tile size and its own
//! `image_grid_pinpoints`. Absent fields take the processor class's defaults
//! ([`super::defaults::LLAVA_ONEVISION_PROCESSOR`]: OpenAI-CLIP mean/std, bicubic, the 36
//! pinpoints). Without the file at all (the embedded model before it had one, hand-made
//! checkpoints) the project's SigLIP defaults apply: mean = std = 0.5, 1/255, bicubic, and the
//! model's own pinpoints.

use std::path::Path;

use serde_json::Value;

use super::defaults::{LLAVA_ONEVISION_PROCESSOR, TRANSFORMERS_VERSION};
use super::resolve::{config_err, ConfigFile, Log, Reader, Resolved, Source};
use crate::anyres::{Normalize, Resample};
use crate::{Error, Result};

/// Image preprocessing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePreprocessing {
    /// Rescale and normalisation.
    pub norm: Normalize,
    /// Resampling filter.
    pub resample: Resample,
    /// Side of a view (`size.height`), when the file gives one.
    pub tile: Option<usize>,
    /// The processor's pinpoints (the file's, else the class default); `None` without a file.
    pub pinpoints: Option<Vec<(usize, usize)>>,
    /// Every value with its source.
    pub provenance: Vec<Resolved>,
}

impl Default for ImagePreprocessing {
    fn default() -> Self {
        let why = |what: &str| Source::Derived(format!("no preprocessor_config.json: {what}"));
        let provenance = vec![
            Resolved {
                field: "preprocessor.image_mean".into(),
                value: Value::from(vec![0.5; 3]),
                source: why("SigLIP's mean (r4b-model.md §5.1)"),
            },
            Resolved {
                field: "preprocessor.image_std".into(),
                value: Value::from(vec![0.5; 3]),
                source: why("SigLIP's std (r4b-model.md §5.1)"),
            },
            Resolved {
                field: "preprocessor.resample".into(),
                value: Value::from(3),
                source: why("bicubic, as the LLaVA-OneVision processor"),
            },
        ];
        ImagePreprocessing {
            norm: Normalize {
                mean: [0.5; 3],
                std: [0.5; 3],
                rescale: 1.0 / 255.0,
            },
            resample: Resample::Bicubic,
            tile: None,
            pinpoints: None,
            provenance,
        }
    }
}

impl ImagePreprocessing {
    /// Reads `dir/preprocessor_config.json` if it exists, else the defaults.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::CheckpointFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json_str(&text)
    }

    /// Parses the JSON text of `preprocessor_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| config_err("preprocessor.<root>", format!("not valid JSON: {e}")))?;
        let log = Log::default();
        let r = Reader::new(
            Some(&root),
            "preprocessor",
            ConfigFile::Preprocessor,
            &LLAVA_ONEVISION_PROCESSOR,
            &log,
        )?;
        let triple = |key: &str| -> Result<[f32; 3]> {
            let (v, source) = r.value(key)?;
            let t = v
                .as_array()
                .filter(|a| a.len() == 3)
                .and_then(|a| {
                    Some([
                        a[0].as_f64()? as f32,
                        a[1].as_f64()? as f32,
                        a[2].as_f64()? as f32,
                    ])
                })
                .ok_or_else(|| r.err(key, "not a list of 3 numbers"))?;
            r.record(key, v, source);
            Ok(t)
        };
        let mean = triple("image_mean")?;
        let std = triple("image_std")?;
        if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return Err(r.err("image_std", "contains 0 or a non-finite value"));
        }
        let rescale = r.f64("rescale_factor")? as f32;
        let code = r.usize("resample").map_err(|_| {
            r.err(
                "resample",
                "not a PIL resampling code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)",
            )
        })?;
        let resample = u8::try_from(code)
            .ok()
            .and_then(Resample::from_pil)
            .ok_or_else(|| {
                r.err(
                    "resample",
                    format!("{code} is not a PIL resampling code (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)"),
                )
            })?;
        let tile = match r.raw("size") {
            None => None,
            Some(size) => {
                let side = |k: &str| size.get(k).and_then(Value::as_u64).map(|n| n as usize);
                match (side("height"), side("width")) {
                    (Some(h), Some(w)) if h == w && h > 0 => {
                        r.record("size", size.clone(), Source::File(ConfigFile::Preprocessor));
                        Some(h)
                    }
                    _ => {
                        return Err(r.err(
                            "size",
                            format!(
                            "{size} is not a square {{height, width}} (anyres tiles are square)"
                        ),
                        ))
                    }
                }
            }
        };
        let pinpoints = r.pinpoints("image_grid_pinpoints", tile.unwrap_or(384))?;
        Ok(ImagePreprocessing {
            norm: Normalize { mean, std, rescale },
            resample,
            tile,
            pinpoints: Some(pinpoints),
            provenance: log.into_inner(),
        })
    }

    /// The source of the processor's pinpoints, for messages.
    pub fn pinpoints_source(&self) -> String {
        self.provenance
            .iter()
            .find(|r| r.field == "preprocessor.image_grid_pinpoints")
            .map(|r| r.source.to_string())
            .unwrap_or_else(|| format!("none (transformers {TRANSFORMERS_VERSION})"))
    }
}
