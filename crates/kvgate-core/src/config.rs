//! The router's knobs: Dynamo's env var names and defaults (a public contract, CONTRACTS.md
//! section 6), validated with messages that name the variable, its flag and the allowed range.
//!
//! Parsing from the environment and the command line lives in the binary (clap with `env`); this
//! module owns the meaning: types, defaults, ranges, and the table of names ([`KNOBS`]).

use std::fmt;
use std::time::Duration;

/// One documented knob: its env var, the CLI flag that mirrors it, its default and meaning.
#[derive(Clone, Copy, Debug)]
pub struct Knob {
    pub env: &'static str,
    pub flag: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! knobs {
    ($($id:ident = $env:literal, $flag:literal, $default:literal, $help:literal;)*) => {
        $(pub const $id: Knob = Knob { env: $env, flag: $flag, default: $default, help: $help };)*
        /// Every router knob, in documentation order.
        pub const KNOBS: &[Knob] = &[$($id),*];
    };
}

knobs! {
    ROUTER_POLICY = "KVGATE_ROUTER_POLICY", "--router-policy", "kvgate",
        "kvgate: lowest predicted time to first token; dynamo: Dynamo's cost function, bit for bit";
    PREFILL_TOKENS_PER_SEC = "KVGATE_PREFILL_TOKENS_PER_SEC", "--prefill-tokens-per-sec", "learned",
        "kvgate policy: a worker's prefill throughput; unset: learned from the router's own bookings";
    ENFORCE_DISAGG = "DYN_ENFORCE_DISAGG", "--enforce-disagg", "false",
        "true: fail when prefill routing is unavailable; false: fall back to aggregated";
    OVERLAP_SCORE_CREDIT = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT", "--kv-overlap-score-credit", "1.0",
        "credit (in blocks) for each block of device-local prefix overlap";
    OVERLAP_SCORE_CREDIT_DECAY = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY", "--kv-overlap-score-credit-decay", "0.0",
        "shrink the overlap credit as a worker's prefill load rises above the least-loaded candidate";
    PREFILL_LOAD_SCALE = "DYN_ROUTER_PREFILL_LOAD_SCALE", "--prefill-load-scale", "1.0",
        "scale of the prompt-side load after credits";
    TEMPERATURE = "DYN_ROUTER_TEMPERATURE", "--router-temperature", "0.0",
        "0: deterministic argmin; >0: softmax sampling over normalised costs";
    REPLICA_SYNC = "DYN_ROUTER_REPLICA_SYNC", "--router-replica-sync", "false",
        "publish and apply bookings across router replicas";
    TRACK_ACTIVE_BLOCKS = "DYN_ROUTER_TRACK_ACTIVE_BLOCKS", "--track-active-blocks", "true",
        "count active (decode) KV blocks as load";
    TRACK_OUTPUT_BLOCKS = "DYN_ROUTER_TRACK_OUTPUT_BLOCKS", "--track-output-blocks", "false",
        "predict output blocks, decayed by progress toward the expected output length";
    TRACK_PREFILL_TOKENS = "DYN_ROUTER_TRACK_PREFILL_TOKENS", "--track-prefill-tokens", "true",
        "count in-flight prefill tokens as load";
    PREDICTED_TTL_SECS = "DYN_ROUTER_PREDICTED_TTL_SECS", "--router-predicted-ttl-secs", "unset",
        "with KV events on, also keep predicted (routed-but-unconfirmed) blocks for this many seconds";
    ADMISSION_CONTROL = "DYN_ADMISSION_CONTROL", "--admission-control", "none",
        "none | token-capacity: skip workers over the busy thresholds";
    ACTIVE_DECODE_BLOCKS_THRESHOLD = "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD", "--active-decode-blocks-threshold", "unset",
        "busy above this fraction of KV blocks active (setting it enables token-capacity)";
    ACTIVE_PREFILL_TOKENS_THRESHOLD = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD", "--active-prefill-tokens-threshold", "unset",
        "busy above this many active prefill tokens";
    ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC", "--active-prefill-tokens-threshold-frac", "unset",
        "busy above this fraction of the worker's max_num_batched_tokens";
    USE_KV_EVENTS = "DYN_USE_KV_EVENTS", "--use-kv-events", "true",
        "false: approximate mode, route on predicted cache state";
    KV_CACHE_BLOCK_SIZE = "DYN_KV_CACHE_BLOCK_SIZE", "--kv-cache-block-size", "unset",
        "block size when discovery does not announce it";
}

/// Dynamo's TTL for predicted blocks in approximate mode.
pub const DEFAULT_APPROX_TTL: Duration = Duration::from_secs(120);
/// Bound on predicted (worker, block) entries before the oldest are pruned.
pub const DEFAULT_APPROX_MAX_BLOCKS: usize = 1 << 20;

/// Which cost function ranks the candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterPolicy {
    /// Predicted time to first token, with a batch-size penalty on uncached work and the wait
    /// for KV memory (see [`crate::latency`]).
    #[default]
    Kvgate,
    /// Dynamo's cost function in blocks, bit for bit (the parity mode).
    Dynamo,
}

impl RouterPolicy {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvgate" => Ok(RouterPolicy::Kvgate),
            "dynamo" => Ok(RouterPolicy::Dynamo),
            _ => Err(ConfigError::new(
                &ROUTER_POLICY,
                s,
                "must be `kvgate` or `dynamo`",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouterPolicy::Kvgate => "kvgate",
            RouterPolicy::Dynamo => "dynamo",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdmissionMode {
    #[default]
    None,
    TokenCapacity,
}

impl AdmissionMode {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "none" | "off" => Ok(AdmissionMode::None),
            "token-capacity" | "token_capacity" => Ok(AdmissionMode::TokenCapacity),
            _ => Err(ConfigError::new(
                &ADMISSION_CONTROL,
                s,
                "must be `none` or `token-capacity`",
            )),
        }
    }
}

/// Busy thresholds for `token-capacity` admission control.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdmissionConfig {
    pub mode: AdmissionMode,
    /// Busy when active KV blocks exceed this fraction of the worker's total.
    pub active_decode_blocks_threshold: Option<f64>,
    /// Busy when active prefill tokens exceed this many.
    pub active_prefill_tokens_threshold: Option<u64>,
    /// Busy when active prefill tokens exceed this fraction of `max_num_batched_tokens`.
    pub active_prefill_tokens_threshold_frac: Option<f64>,
}

impl AdmissionConfig {
    /// Token-capacity is on when asked for, or implicitly when the decode threshold is set.
    pub fn enabled(&self) -> bool {
        self.mode == AdmissionMode::TokenCapacity || self.active_decode_blocks_threshold.is_some()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouterConfig {
    pub policy: RouterPolicy,
    /// Fixed prefill throughput for the kvgate policy; `None` learns it.
    pub prefill_tokens_per_sec: Option<f64>,
    pub enforce_disagg: bool,
    pub overlap_score_credit: f64,
    pub overlap_score_credit_decay: f64,
    pub prefill_load_scale: f64,
    pub temperature: f64,
    pub replica_sync: bool,
    pub track_active_blocks: bool,
    pub track_output_blocks: bool,
    pub track_prefill_tokens: bool,
    pub predicted_ttl: Option<Duration>,
    pub admission: AdmissionConfig,
    pub use_kv_events: bool,
    pub block_size: Option<u32>,
    /// TTL of predicted entries in approximate mode (`use_kv_events = false`).
    pub approx_ttl: Duration,
    pub approx_max_blocks: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            policy: RouterPolicy::default(),
            prefill_tokens_per_sec: None,
            enforce_disagg: false,
            overlap_score_credit: 1.0,
            overlap_score_credit_decay: 0.0,
            prefill_load_scale: 1.0,
            temperature: 0.0,
            replica_sync: false,
            track_active_blocks: true,
            track_output_blocks: false,
            track_prefill_tokens: true,
            predicted_ttl: None,
            admission: AdmissionConfig::default(),
            use_kv_events: true,
            block_size: None,
            approx_ttl: DEFAULT_APPROX_TTL,
            approx_max_blocks: DEFAULT_APPROX_MAX_BLOCKS,
        }
    }
}

/// A knob with a value outside its allowed range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub env: &'static str,
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(knob: &Knob, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        Self {
            env: knob.env,
            flag: knob.flag,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} ({}) = {:?}: {}",
            self.env, self.flag, self.value, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

fn non_negative(knob: &Knob, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError::new(
            knob,
            v,
            "must be a finite number >= 0 (allowed range [0, +inf))",
        ))
    }
}

fn fraction(knob: &Knob, v: f64) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(ConfigError::new(knob, v, "must be a fraction in (0, 1]"))
    }
}

impl RouterConfig {
    /// Checks every knob's range. Returns the first problem, naming the variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(v) = self.prefill_tokens_per_sec
            && !(v.is_finite() && v >= 1.0)
        {
            return Err(ConfigError::new(
                &PREFILL_TOKENS_PER_SEC,
                v,
                "must be a finite number of tokens per second >= 1 (leave it unset to learn it)",
            ));
        }
        non_negative(&OVERLAP_SCORE_CREDIT, self.overlap_score_credit)?;
        non_negative(&OVERLAP_SCORE_CREDIT_DECAY, self.overlap_score_credit_decay)?;
        non_negative(&PREFILL_LOAD_SCALE, self.prefill_load_scale)?;
        non_negative(&TEMPERATURE, self.temperature)?;
        if let Some(v) = self.admission.active_decode_blocks_threshold {
            fraction(&ACTIVE_DECODE_BLOCKS_THRESHOLD, v)?;
        }
        if let Some(v) = self.admission.active_prefill_tokens_threshold_frac
            && !(v.is_finite() && v > 0.0)
        {
            return Err(ConfigError::new(
                &ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC,
                v,
                "must be a finite number > 0 (a fraction of max_num_batched_tokens; above 1 allows queueing)",
            ));
        }
        if self.admission.active_prefill_tokens_threshold == Some(0) {
            return Err(ConfigError::new(
                &ACTIVE_PREFILL_TOKENS_THRESHOLD,
                0,
                "must be a whole number >= 1 (0 would mark every worker busy)",
            ));
        }
        if let Some(bs) = self.block_size
            && (bs == 0 || bs > 1 << 20)
        {
            return Err(ConfigError::new(
                &KV_CACHE_BLOCK_SIZE,
                bs,
                "must be a whole number of tokens in [1, 1048576]",
            ));
        }
        if let Some(ttl) = self.predicted_ttl
            && ttl.is_zero()
        {
            return Err(ConfigError::new(
                &PREDICTED_TTL_SECS,
                0,
                "must be > 0 seconds (leave it unset to disable)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_table() {
        let c = RouterConfig::default();
        c.validate().unwrap();
        assert_eq!(
            OVERLAP_SCORE_CREDIT.default.parse::<f64>().unwrap(),
            c.overlap_score_credit
        );
        assert_eq!(
            OVERLAP_SCORE_CREDIT_DECAY.default.parse::<f64>().unwrap(),
            c.overlap_score_credit_decay
        );
        assert_eq!(
            PREFILL_LOAD_SCALE.default.parse::<f64>().unwrap(),
            c.prefill_load_scale
        );
        assert_eq!(TEMPERATURE.default.parse::<f64>().unwrap(), c.temperature);
        assert_eq!(
            TRACK_ACTIVE_BLOCKS.default.parse::<bool>().unwrap(),
            c.track_active_blocks
        );
        assert_eq!(
            TRACK_OUTPUT_BLOCKS.default.parse::<bool>().unwrap(),
            c.track_output_blocks
        );
        assert_eq!(
            TRACK_PREFILL_TOKENS.default.parse::<bool>().unwrap(),
            c.track_prefill_tokens
        );
        assert_eq!(
            USE_KV_EVENTS.default.parse::<bool>().unwrap(),
            c.use_kv_events
        );
        assert_eq!(
            ENFORCE_DISAGG.default.parse::<bool>().unwrap(),
            c.enforce_disagg
        );
        assert_eq!(
            REPLICA_SYNC.default.parse::<bool>().unwrap(),
            c.replica_sync
        );
        assert_eq!(
            AdmissionMode::parse(ADMISSION_CONTROL.default).unwrap(),
            c.admission.mode
        );
        assert_eq!(
            RouterPolicy::parse(ROUTER_POLICY.default).unwrap(),
            c.policy
        );
        assert_eq!(c.prefill_tokens_per_sec, None);
        assert_eq!(KNOBS.len(), 18);
    }

    #[test]
    fn negative_temperature_is_refused_naming_the_variable() {
        let c = RouterConfig {
            temperature: -1.0,
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.env, "DYN_ROUTER_TEMPERATURE");
        let msg = e.to_string();
        assert!(msg.contains("DYN_ROUTER_TEMPERATURE"), "{msg}");
        assert!(msg.contains("--router-temperature"), "{msg}");
        assert!(msg.contains("[0, +inf)"), "{msg}");
    }

    #[test]
    fn every_range_is_checked() {
        let bad = [
            RouterConfig {
                prefill_tokens_per_sec: Some(0.5),
                ..Default::default()
            },
            RouterConfig {
                overlap_score_credit: f64::NAN,
                ..Default::default()
            },
            RouterConfig {
                overlap_score_credit_decay: -0.1,
                ..Default::default()
            },
            RouterConfig {
                prefill_load_scale: f64::INFINITY,
                ..Default::default()
            },
            RouterConfig {
                admission: AdmissionConfig {
                    active_decode_blocks_threshold: Some(1.5),
                    ..Default::default()
                },
                ..Default::default()
            },
            RouterConfig {
                admission: AdmissionConfig {
                    active_prefill_tokens_threshold: Some(0),
                    ..Default::default()
                },
                ..Default::default()
            },
            RouterConfig {
                admission: AdmissionConfig {
                    active_prefill_tokens_threshold_frac: Some(0.0),
                    ..Default::default()
                },
                ..Default::default()
            },
            RouterConfig {
                block_size: Some(0),
                ..Default::default()
            },
            RouterConfig {
                predicted_ttl: Some(Duration::ZERO),
                ..Default::default()
            },
        ];
        let names: Vec<&str> = bad.iter().map(|c| c.validate().unwrap_err().env).collect();
        assert_eq!(
            names,
            [
                "KVGATE_PREFILL_TOKENS_PER_SEC",
                "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT",
                "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY",
                "DYN_ROUTER_PREFILL_LOAD_SCALE",
                "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD",
                "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD",
                "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC",
                "DYN_KV_CACHE_BLOCK_SIZE",
                "DYN_ROUTER_PREDICTED_TTL_SECS",
            ]
        );
    }

    #[test]
    fn admission_mode_parsing() {
        assert_eq!(
            AdmissionMode::parse("token-capacity").unwrap(),
            AdmissionMode::TokenCapacity
        );
        assert_eq!(AdmissionMode::parse("NONE").unwrap(), AdmissionMode::None);
        let e = AdmissionMode::parse("fifo").unwrap_err();
        assert_eq!(e.env, "DYN_ADMISSION_CONTROL");
        let implicit = AdmissionConfig {
            active_decode_blocks_threshold: Some(0.9),
            ..Default::default()
        };
        assert!(implicit.enabled());
        assert!(!AdmissionConfig::default().enabled());
    }

    #[test]
    fn router_policy_parsing() {
        assert_eq!(RouterPolicy::parse("Dynamo").unwrap(), RouterPolicy::Dynamo);
        assert_eq!(RouterPolicy::parse("kvgate").unwrap(), RouterPolicy::Kvgate);
        let e = RouterPolicy::parse("lmetric").unwrap_err();
        assert_eq!(e.env, "KVGATE_ROUTER_POLICY");
        assert!(e.to_string().contains("`kvgate` or `dynamo`"));
    }
}
