//! How long a step may take before the replica declares its worker group frozen.
//!
//! `deadline = base + tokens · per_token + views · per_view`, where the per-token and per-view
//! allowances are the larger of a configured floor and `SLACK` times what recent steps took
//! (an exponential average of wall time per token). So a slow device (the f32 reference on a
//! CPU) earns long deadlines from its own measurements, while a frozen rank is caught after
//! `base` plus a multiple of what the step should have cost.

use std::time::Duration;

/// Multiple of the observed cost a step is allowed.
const SLACK: f64 = 8.0;
/// Weight of the newest step in the running average.
const ALPHA: f64 = 0.1;

/// The step deadline policy (see the module docs).
#[derive(Clone, Debug)]
pub struct StepDeadline {
    /// Allowance every step gets (covers fixed per-step costs and scheduling noise).
    pub base: Duration,
    /// Least allowance per token of the step.
    pub per_token: Duration,
    /// Least allowance per image view encoded in the step.
    pub per_view: Duration,
    /// Running average of observed seconds per token.
    observed_per_token: Option<f64>,
}

impl StepDeadline {
    /// A policy with the given base and floors.
    pub fn new(base: Duration, per_token: Duration, per_view: Duration) -> Self {
        StepDeadline {
            base,
            per_token,
            per_view,
            observed_per_token: None,
        }
    }

    /// Defaults for a device: the GPU engine runs a 2048-token prefill in tens of ms and a view
    /// in a few; the f32 CPU reference is orders of magnitude slower.
    pub fn for_device(device: &str, base: Duration) -> Self {
        match device {
            "cuda" => Self::new(base, Duration::from_millis(1), Duration::from_millis(100)),
            _ => Self::new(base, Duration::from_millis(20), Duration::from_secs(2)),
        }
    }

    /// The deadline of a step of `tokens` tokens that encodes `views` image views.
    pub fn for_step(&self, tokens: usize, views: usize) -> Duration {
        let observed = self.observed_per_token.unwrap_or(0.0) * SLACK;
        let per_token = self.per_token.as_secs_f64().max(observed);
        let per_view = self.per_view.as_secs_f64().max(observed * 729.0);
        let extra = tokens as f64 * per_token + views as f64 * per_view;
        self.base + Duration::from_secs_f64(extra.min(1e6))
    }

    /// Records a finished step.
    pub fn observe(&mut self, tokens: usize, wall: Duration) {
        if tokens == 0 {
            return;
        }
        let x = wall.as_secs_f64() / tokens as f64;
        self.observed_per_token = Some(match self.observed_per_token {
            None => x,
            Some(avg) => avg + ALPHA * (x - avg),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_grows_with_size_and_observed_cost() {
        let ms = Duration::from_millis;
        let mut d = StepDeadline::new(ms(1000), ms(2), ms(50));
        // Floors only: 1 s + 100 · 2 ms + 3 · 50 ms.
        assert_eq!(d.for_step(100, 3), ms(1350));
        // A step of 10 tokens in 100 ms: 10 ms/token observed, 8 x 10 ms = 80 ms allowed.
        d.observe(10, ms(100));
        let got = d.for_step(100, 0).as_secs_f64();
        assert!((got - 9.0).abs() < 1e-9, "{got}");
        // Views get 729 token-equivalents of the observed cost: 80 ms · 729.
        let got = d.for_step(0, 1).as_secs_f64();
        assert!((got - (1.0 + 0.08 * 729.0)).abs() < 1e-9, "{got}");
        // The average moves by 10 % towards a new observation: 10 + 0.1 · (1 - 10) = 9.1 ms.
        d.observe(100, ms(100));
        let got = d.for_step(1, 0).as_secs_f64();
        assert!((got - (1.0 + 8.0 * 0.0091)).abs() < 1e-9, "{got}");
        // Steps without tokens teach nothing.
        d.observe(0, ms(10_000));
        assert!((d.for_step(1, 0).as_secs_f64() - got).abs() < 1e-12);
    }
}
