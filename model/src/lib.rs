//! # r4b-model
//!
//! What every process of r4b-serve must agree on about the model and a request, written once and
//! free of tensors: the resolved configuration ([`config`], as transformers resolves
//! `config.json`), the anyres geometry and image preprocessing ([`anyres`]), the embedded tiny
//! checkpoint ([`embedded`]), the bounds of the sampling parameters and the checks of prompt
//! ids and image payloads. The gateway applies them to the OpenAI body (naming the JSON field), the coordinator to its gRPC `Generate`
//! (which skips the gateway), and the worker again on admission, so a request that slipped past
//! one of them is refused alone instead of failing a step.
//!
//! Bounds are checked on the value the worker computes with: a float is converted to `f32`
//! first, so `1e300` (→ `inf`) and `1e-300` (→ `0`) are refused like `inf` and `0`.
#![deny(missing_docs)]

pub mod anyres;
pub mod config;
pub mod embedded;
mod error;
pub mod grammar;
pub mod request;
pub mod sampling;

pub use error::{Error, Result};
pub use request::{check_image, check_prompt_ids, ImageLimits, RequestError};
pub use sampling::{check_sampling, FloatBound, SamplingError, SAMPLING_BOUNDS};
