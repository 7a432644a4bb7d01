//! Sampling-parameter bounds, one table for the gateway, the coordinator and the worker.
//!
//! Each float parameter is checked after its conversion to `f32` (what the sampler uses), and
//! must be finite. The bounds are OpenAI's where OpenAI defines the field (temperature, top_p,
//! presence and frequency penalties) and vLLM's otherwise, with one addition: the repetition
//! penalty divides or multiplies logits, so it is kept in `[0.01, 100]`, where the result stays
//! finite for any logit below 1e36 and a larger penalty already removes a token.

use r4b_proto::v1 as pb;

/// Most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// A float parameter that is out of bounds (after conversion to `f32`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("`{field}` must be {bound}, got {value}")]
pub struct SamplingError {
    /// The request field, e.g. `top_p`.
    pub field: &'static str,
    /// The bound, e.g. `in (0, 1]`.
    pub bound: &'static str,
    /// The value sent, as sent (with what it became in `f32` when that is what broke it).
    pub value: String,
}

/// The bound of one float sampling parameter.
#[derive(Clone, Copy, Debug)]
pub struct FloatBound {
    /// The request field.
    pub field: &'static str,
    /// The bound in words, e.g. `in [0, 2]`.
    pub bound: &'static str,
    /// Lowest allowed value.
    pub min: f32,
    /// Whether `min` itself is allowed.
    pub min_inclusive: bool,
    /// Highest allowed value (inclusive).
    pub max: f32,
}

impl FloatBound {
    /// Whether `v` is finite and within the bound.
    pub fn allows(&self, v: f32) -> bool {
        let above_min = if self.min_inclusive {
            v >= self.min
        } else {
            v > self.min
        };
        v.is_finite() && above_min && v <= self.max
    }

    /// Converts a JSON number to the worker's `f32` and checks it.
    pub fn check_f64(&self, v: f64) -> Result<f32, SamplingError> {
        let y = v as f32;
        if self.allows(y) {
            return Ok(y);
        }
        let mut value = format!("{v:?}");
        if v.is_finite() && y == 0.0 && v != 0.0 {
            value.push_str(" (0 as a 32-bit float)");
        } else if v.is_finite() && y.is_infinite() {
            value.push_str(" (infinite as a 32-bit float)");
        }
        Err(SamplingError {
            field: self.field,
            bound: self.bound,
            value,
        })
    }

    /// Checks an `f32` already converted (the gRPC field).
    pub fn check_f32(&self, v: f32) -> Result<f32, SamplingError> {
        if self.allows(v) {
            Ok(v)
        } else {
            Err(SamplingError {
                field: self.field,
                bound: self.bound,
                value: format!("{v:?}"),
            })
        }
    }
}

/// `temperature`: 0 is greedy.
pub const TEMPERATURE: FloatBound = FloatBound {
    field: "temperature",
    bound: "in [0, 2]",
    min: 0.0,
    min_inclusive: true,
    max: 2.0,
};
/// `top_p`: nucleus mass; 1 = off.
pub const TOP_P: FloatBound = FloatBound {
    field: "top_p",
    bound: "in (0, 1]",
    min: 0.0,
    min_inclusive: false,
    max: 1.0,
};
/// `min_p`: 0 = off.
pub const MIN_P: FloatBound = FloatBound {
    field: "min_p",
    bound: "in [0, 1]",
    min: 0.0,
    min_inclusive: true,
    max: 1.0,
};
/// `presence_penalty` (OpenAI).
pub const PRESENCE_PENALTY: FloatBound = FloatBound {
    field: "presence_penalty",
    bound: "in [-2, 2]",
    min: -2.0,
    min_inclusive: true,
    max: 2.0,
};
/// `frequency_penalty` (OpenAI).
pub const FREQUENCY_PENALTY: FloatBound = FloatBound {
    field: "frequency_penalty",
    bound: "in [-2, 2]",
    min: -2.0,
    min_inclusive: true,
    max: 2.0,
};
/// `repetition_penalty` (HF / vLLM): 1 = off.
pub const REPETITION_PENALTY: FloatBound = FloatBound {
    field: "repetition_penalty",
    bound: "in [0.01, 100]",
    min: 0.01,
    min_inclusive: true,
    max: 100.0,
};

/// Every float sampling parameter's bound.
pub const SAMPLING_BOUNDS: [FloatBound; 6] = [
    TEMPERATURE,
    TOP_P,
    MIN_P,
    PRESENCE_PENALTY,
    FREQUENCY_PENALTY,
    REPETITION_PENALTY,
];

/// Checks a `cluster.v1.SamplingParams` as the worker will use it.
pub fn check_sampling(p: &pb::SamplingParams) -> Result<(), SamplingError> {
    TEMPERATURE.check_f32(p.temperature)?;
    TOP_P.check_f32(p.top_p)?;
    MIN_P.check_f32(p.min_p)?;
    PRESENCE_PENALTY.check_f32(p.presence_penalty)?;
    FREQUENCY_PENALTY.check_f32(p.frequency_penalty)?;
    REPETITION_PENALTY.check_f32(p.repetition_penalty)?;
    if p.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(SamplingError {
            field: "top_logprobs",
            bound: "in [0, 20]",
            value: p.top_logprobs.to_string(),
        });
    }
    if let Some(k) = p.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
        return Err(SamplingError {
            field: "prompt_logprobs",
            bound: "in [0, 20]",
            value: k.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neutral() -> pb::SamplingParams {
        pb::SamplingParams {
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn neutral_parameters_pass() {
        assert_eq!(check_sampling(&neutral()), Ok(()));
    }

    #[test]
    fn conversion_to_f32_is_what_is_checked() {
        // 1e300 passes an f64 "> 0" check but is inf in f32; 1e-300 is 0 in f32.
        let e = REPETITION_PENALTY.check_f64(1e300).expect_err("inf");
        assert_eq!(e.field, "repetition_penalty");
        assert!(e.value.contains("infinite as a 32-bit float"), "{e}");
        let e = TOP_P.check_f64(1e-300).expect_err("0");
        assert!(e.value.contains("0 as a 32-bit float"), "{e}");
        assert_eq!(
            e.to_string(),
            "`top_p` must be in (0, 1], got 1e-300 (0 as a 32-bit float)"
        );
        assert!(REPETITION_PENALTY.check_f64(1e-300).is_err());
        // The f32 boundaries of an open bound: the smallest positive f32 is > 0.
        assert_eq!(
            TOP_P.check_f64(f64::from(f32::MIN_POSITIVE)),
            Ok(f32::MIN_POSITIVE)
        );
        assert_eq!(TOP_P.check_f64(1.0), Ok(1.0));
        assert!(TOP_P.check_f64(1.0000001).is_err());
    }

    #[test]
    fn every_bound_refuses_non_finite_and_huge_values() {
        let extremes = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e300,
            -1e300,
            f64::from(f32::MAX),
            -f64::from(f32::MAX),
            3.5e38, // above f32::MAX: inf
        ];
        for b in SAMPLING_BOUNDS {
            for v in extremes {
                assert!(b.check_f64(v).is_err(), "{} accepted {v}", b.field);
            }
            // And the tiny ones are refused exactly when 0 is refused.
            for v in [1e-300, -1e-300, 1e-46] {
                assert_eq!(b.check_f64(v).is_ok(), b.allows(0.0), "{} {v}", b.field);
            }
        }
    }

    #[test]
    fn proto_check_names_the_field() {
        let mut p = neutral();
        p.min_p = f32::NAN;
        assert_eq!(check_sampling(&p).expect_err("nan").field, "min_p");
        let mut p = neutral();
        p.repetition_penalty = 0.0;
        assert_eq!(
            check_sampling(&p).expect_err("0").field,
            "repetition_penalty"
        );
        let mut p = neutral();
        p.top_logprobs = 21;
        assert_eq!(check_sampling(&p).expect_err("21").field, "top_logprobs");
        p.top_logprobs = 0;
        p.prompt_logprobs = Some(21);
        assert_eq!(check_sampling(&p).expect_err("21").field, "prompt_logprobs");
        p.prompt_logprobs = Some(20);
        assert!(check_sampling(&p).is_ok());
        let mut p = neutral();
        p.temperature = 2.0;
        p.presence_penalty = -2.0;
        p.repetition_penalty = 100.0;
        assert_eq!(check_sampling(&p), Ok(()));
    }
}
