//! Reading a JSON config object the way transformers does: a field that is present wins, an
//! absent one takes its config class's default ([`super::defaults`]), and every value is recorded
//! with where it came from ([`Resolved`]), for `r4b inspect` and the field-by-field tests.

use std::cell::RefCell;
use std::fmt;

use serde_json::{Map, Value};

use super::defaults::{self, ClassDefaults};
use crate::{Error, Result};

/// A file of the checkpoint directory that configuration is read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigFile {
    /// `config.json`.
    Config,
    /// `preprocessor_config.json`.
    Preprocessor,
}

impl ConfigFile {
    /// The file name.
    pub fn name(self) -> &'static str {
        match self {
            ConfigFile::Config => "config.json",
            ConfigFile::Preprocessor => "preprocessor_config.json",
        }
    }
}

/// Where a resolved value came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Read from this file.
    File(ConfigFile),
    /// Absent from the file: the default of this config class ([`super::defaults`]).
    ClassDefault(&'static str),
    /// Computed from other values, as described.
    Derived(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(file) => f.write_str(file.name()),
            Source::ClassDefault(class) => write!(
                f,
                "class default ({class}, transformers {})",
                defaults::TRANSFORMERS_VERSION
            ),
            Source::Derived(how) => write!(f, "derived: {how}"),
        }
    }
}

/// One resolved value: its field path (as transformers' `to_dict()` names it), the value, and
/// its source.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// Dotted path, e.g. `text_config.head_dim`.
    pub field: String,
    /// The value.
    pub value: Value,
    /// Where it came from.
    pub source: Source,
}

/// Collects [`Resolved`] entries while several readers are alive.
pub(crate) type Log = RefCell<Vec<Resolved>>;

/// A config object (or its absence) with the class whose defaults fill the gaps.
pub(crate) struct Reader<'a> {
    map: Option<&'a Map<String, Value>>,
    path: String,
    file: ConfigFile,
    defaults: &'static ClassDefaults,
    /// Consulted before `defaults` (LLaVA-OneVision's so400m values for an absent `vision_config`).
    overrides: Option<&'static ClassDefaults>,
    log: &'a Log,
}

/// A config error naming `field`.
pub(crate) fn config_err(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

impl<'a> Reader<'a> {
    /// Reads `v` (an object) at `path` of `file`.
    pub(crate) fn new(
        v: Option<&'a Value>,
        path: &str,
        file: ConfigFile,
        defaults: &'static ClassDefaults,
        log: &'a Log,
    ) -> Result<Self> {
        let map = match v {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                return Err(config_err(
                    if path.is_empty() { "<root>" } else { path },
                    "not an object",
                ))
            }
        };
        Ok(Reader {
            map,
            path: path.to_string(),
            file,
            defaults,
            overrides: None,
            log,
        })
    }

    /// Consults `overrides` before the class defaults.
    pub(crate) fn with_overrides(mut self, overrides: &'static ClassDefaults) -> Self {
        self.overrides = Some(overrides);
        self
    }

    /// The dotted name of `key` under this object.
    pub(crate) fn name(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An error naming `key`.
    pub(crate) fn err(&self, key: &str, reason: impl Into<String>) -> Error {
        config_err(self.name(key), reason)
    }

    /// The value stored under `key`, `None` when absent or null.
    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.map?.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is present with the JSON value `null`.
    pub(crate) fn is_null(&self, key: &str) -> bool {
        self.map
            .and_then(|m| m.get(key))
            .is_some_and(Value::is_null)
    }

    /// Records a value.
    pub(crate) fn record(&self, key: &str, value: Value, source: Source) {
        self.log.borrow_mut().push(Resolved {
            field: self.name(key),
            value,
            source,
        });
    }

    /// The class default of `key` (dotted for nested fields) and the class it belongs to.
    fn default_of(&self, key: &str) -> Option<(defaults::Value, &'static str)> {
        self.overrides
            .and_then(|o| o.get(key).map(|v| (v, o.class)))
            .or_else(|| self.defaults.get(key).map(|v| (v, self.defaults.class)))
    }

    /// The file's value, else the class default; `null` is an error (transformers' strict
    /// dataclasses refuse it for every field read this way).
    pub(crate) fn value(&self, key: &str) -> Result<(Value, Source)> {
        if self.is_null(key) {
            return Err(self.err(
                key,
                format!(
                    "null (transformers' {} requires a value)",
                    self.defaults.class
                ),
            ));
        }
        if let Some(v) = self.raw(key) {
            return Ok((v.clone(), Source::File(self.file)));
        }
        match self.default_of(key) {
            Some((d, class)) => Ok((default_json(d), Source::ClassDefault(class))),
            None => Err(self.err(key, "missing (and its config class has no default)")),
        }
    }

    fn typed<T>(&self, key: &str, what: &str, convert: impl Fn(&Value) -> Option<T>) -> Result<T> {
        let (v, source) = self.value(key)?;
        let out = convert(&v).ok_or_else(|| self.err(key, format!("{v} is not {what}")))?;
        self.record(key, v, source);
        Ok(out)
    }

    /// A non-negative integer.
    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|n| usize::try_from(n).ok())
        })
    }

    /// A number.
    pub(crate) fn f64(&self, key: &str) -> Result<f64> {
        self.typed(key, "a number", Value::as_f64)
    }

    /// A boolean.
    pub(crate) fn bool(&self, key: &str) -> Result<bool> {
        self.typed(key, "a boolean", Value::as_bool)
    }

    /// A string.
    pub(crate) fn string(&self, key: &str) -> Result<String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_string))
    }

    /// `image_grid_pinpoints`: `[height, width]` pairs, each a positive multiple of `tile`; the
    /// class default when absent or null (`image_grid_pinpoints: list | None = None`).
    pub(crate) fn pinpoints(&self, key: &str, tile: usize) -> Result<Vec<(usize, usize)>> {
        let Some(v) = self.raw(key) else {
            let (d, class) = self
                .default_of(key)
                .ok_or_else(|| self.err(key, "missing (and its config class has no default)"))?;
            let list = match d {
                defaults::Value::Pinpoints6x6 => defaults::pinpoints_6x6(),
                _ => return Err(self.err(key, "the class default is not a pinpoint list")),
            };
            self.record(key, default_json(d), Source::ClassDefault(class));
            return check_tiles(self, key, list, tile);
        };
        let items = v.as_array().ok_or_else(|| self.err(key, "not a list"))?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let pair = item
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| {
                    Some((
                        usize::try_from(a[0].as_u64()?).ok()?,
                        usize::try_from(a[1].as_u64()?).ok()?,
                    ))
                })
                .ok_or_else(|| {
                    self.err(
                        &format!("{key}[{i}]"),
                        "not a [height, width] pair of integers",
                    )
                })?;
            out.push(pair);
        }
        self.record(key, v.clone(), Source::File(self.file));
        check_tiles(self, key, out, tile)
    }
}

fn check_tiles(
    r: &Reader,
    key: &str,
    list: Vec<(usize, usize)>,
    tile: usize,
) -> Result<Vec<(usize, usize)>> {
    if list.is_empty() {
        return Err(r.err(key, "empty"));
    }
    for (i, &(h, w)) in list.iter().enumerate() {
        if h == 0 || w == 0 || !h.is_multiple_of(tile) || !w.is_multiple_of(tile) {
            return Err(r.err(
                &format!("{key}[{i}]"),
                format!(
                    "{:?} is not a positive multiple of the tile size {tile}",
                    (h, w)
                ),
            ));
        }
    }
    Ok(list)
}

/// A default as the JSON value transformers' `to_dict()` would show.
pub(crate) fn default_json(d: defaults::Value) -> Value {
    match d {
        defaults::Value::Int(i) => Value::from(i),
        defaults::Value::Float(f) => Value::from(f),
        defaults::Value::Bool(b) => Value::from(b),
        defaults::Value::Str(s) => Value::from(s),
        defaults::Value::Pinpoints6x6 => Value::from(
            defaults::pinpoints_6x6()
                .into_iter()
                .map(|(h, w)| vec![h, w])
                .collect::<Vec<_>>(),
        ),
        defaults::Value::Triple(t) => Value::from(t.to_vec()),
    }
}
