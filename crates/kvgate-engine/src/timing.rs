//! Forward-pass timing of the simulated engine (Dynamo's mocker model, CONTRACTS.md section 7).
//!
//! `N` = new (uncached) prefill tokens in the batch, `u` = active KV tokens / total KV tokens:
//! - prefill ms = `4.209989e-07 * N^2 + 1.518344e-02 * N + 16.50142`
//! - decode ms  = `max(1, -25.74 * u^2 + 54.01 * u + 5.74)`
//!
//! A mixed step (prefill chunks and decoding requests in one batch) costs the larger of the two:
//! the batch runs as one pass, so it is never cheaper than either part alone.

use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimingModel {
    /// Quadratic coefficients `[a, b, c]` of prefill ms in `N`.
    pub prefill: [f64; 3],
    /// Quadratic coefficients `[a, b, c]` of decode ms in `u`, floored at `decode_floor_ms`.
    pub decode: [f64; 3],
    pub decode_floor_ms: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        Self {
            prefill: [4.209989e-07, 1.518344e-02, 16.50142],
            decode: [-25.74, 54.01, 5.74],
            decode_floor_ms: 1.0,
        }
    }
}

impl TimingModel {
    pub fn prefill_ms(&self, new_tokens: usize) -> f64 {
        let n = new_tokens as f64;
        let [a, b, c] = self.prefill;
        a * n * n + b * n + c
    }

    pub fn decode_ms(&self, kv_usage: f64) -> f64 {
        let u = kv_usage.clamp(0.0, 1.0);
        let [a, b, c] = self.decode;
        (a * u * u + b * u + c).max(self.decode_floor_ms)
    }

    /// Duration of one forward pass.
    pub fn step(&self, new_prefill_tokens: usize, decoding: usize, kv_usage: f64) -> Duration {
        let prefill = if new_prefill_tokens > 0 {
            self.prefill_ms(new_prefill_tokens)
        } else {
            0.0
        };
        let decode = if decoding > 0 {
            self.decode_ms(kv_usage)
        } else {
            0.0
        };
        let ms = prefill.max(decode);
        Duration::from_secs_f64(ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_curves() {
        let t = TimingModel::default();
        assert!((t.prefill_ms(0) - 16.50142).abs() < 1e-9);
        assert!((t.prefill_ms(1000) - (0.4209989 + 15.18344 + 16.50142)).abs() < 1e-9);
        assert!((t.decode_ms(0.0) - 5.74).abs() < 1e-12);
        assert!((t.decode_ms(0.5) - (-25.74 * 0.25 + 54.01 * 0.5 + 5.74)).abs() < 1e-12);
        assert_eq!(t.step(0, 0, 0.0), Duration::ZERO);
        let mixed = t.step(100, 3, 0.5);
        assert!(mixed >= t.step(0, 3, 0.5) && mixed >= t.step(100, 0, 0.5));
        assert!(t.step(5000, 3, 0.5) > t.step(0, 3, 0.5));
    }
}
