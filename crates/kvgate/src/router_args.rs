//! Router knobs on the command line, each mirroring its `DYN_*` env var (flags win over env).
//!
//! Values are taken as text and parsed here rather than by clap so that every error names the
//! env var *and* the flag, whichever the value came from.

use clap::Args;
use kvgate_core::config::{
    self as knobs, AdmissionMode, ConfigError, Knob, RouterConfig, RouterPolicy,
};
use std::fmt::Write as _;
use std::time::Duration;

#[derive(Args, Debug, Clone, Default)]
pub struct RouterArgs {
    #[arg(long, env = "KVGATE_ROUTER_POLICY", value_name = "POLICY", help = knobs::ROUTER_POLICY.help)]
    pub router_policy: Option<String>,
    #[arg(long, env = "KVGATE_PREFILL_TOKENS_PER_SEC", value_name = "TOKENS", allow_hyphen_values = true, help = knobs::PREFILL_TOKENS_PER_SEC.help)]
    pub prefill_tokens_per_sec: Option<String>,
    #[arg(long, env = "DYN_ENFORCE_DISAGG", value_name = "BOOL", help = knobs::ENFORCE_DISAGG.help)]
    pub enforce_disagg: Option<String>,
    #[arg(long, env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT", value_name = "BLOCKS", allow_hyphen_values = true, help = knobs::OVERLAP_SCORE_CREDIT.help)]
    pub kv_overlap_score_credit: Option<String>,
    #[arg(long, env = "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT_DECAY", value_name = "X", allow_hyphen_values = true, help = knobs::OVERLAP_SCORE_CREDIT_DECAY.help)]
    pub kv_overlap_score_credit_decay: Option<String>,
    #[arg(long, env = "DYN_ROUTER_PREFILL_LOAD_SCALE", value_name = "X", allow_hyphen_values = true, help = knobs::PREFILL_LOAD_SCALE.help)]
    pub prefill_load_scale: Option<String>,
    #[arg(long, env = "DYN_ROUTER_TEMPERATURE", value_name = "T", allow_hyphen_values = true, help = knobs::TEMPERATURE.help)]
    pub router_temperature: Option<String>,
    #[arg(long, env = "DYN_ROUTER_REPLICA_SYNC", value_name = "BOOL", help = knobs::REPLICA_SYNC.help)]
    pub router_replica_sync: Option<String>,
    #[arg(long, env = "DYN_ROUTER_TRACK_ACTIVE_BLOCKS", value_name = "BOOL", help = knobs::TRACK_ACTIVE_BLOCKS.help)]
    pub track_active_blocks: Option<String>,
    #[arg(long, env = "DYN_ROUTER_TRACK_OUTPUT_BLOCKS", value_name = "BOOL", help = knobs::TRACK_OUTPUT_BLOCKS.help)]
    pub track_output_blocks: Option<String>,
    #[arg(long, env = "DYN_ROUTER_TRACK_PREFILL_TOKENS", value_name = "BOOL", help = knobs::TRACK_PREFILL_TOKENS.help)]
    pub track_prefill_tokens: Option<String>,
    #[arg(long, env = "DYN_ROUTER_PREDICTED_TTL_SECS", value_name = "SECS", allow_hyphen_values = true, help = knobs::PREDICTED_TTL_SECS.help)]
    pub router_predicted_ttl_secs: Option<String>,
    #[arg(long, env = "DYN_ADMISSION_CONTROL", value_name = "MODE", help = knobs::ADMISSION_CONTROL.help)]
    pub admission_control: Option<String>,
    #[arg(long, env = "DYN_ACTIVE_DECODE_BLOCKS_THRESHOLD", value_name = "FRAC", allow_hyphen_values = true, help = knobs::ACTIVE_DECODE_BLOCKS_THRESHOLD.help)]
    pub active_decode_blocks_threshold: Option<String>,
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD", value_name = "TOKENS", allow_hyphen_values = true, help = knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD.help)]
    pub active_prefill_tokens_threshold: Option<String>,
    #[arg(long, env = "DYN_ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC", value_name = "FRAC", allow_hyphen_values = true, help = knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC.help)]
    pub active_prefill_tokens_threshold_frac: Option<String>,
    #[arg(long, env = "DYN_USE_KV_EVENTS", value_name = "BOOL", help = knobs::USE_KV_EVENTS.help)]
    pub use_kv_events: Option<String>,
    #[arg(long, env = "DYN_KV_CACHE_BLOCK_SIZE", value_name = "TOKENS", allow_hyphen_values = true, help = knobs::KV_CACHE_BLOCK_SIZE.help)]
    pub kv_cache_block_size: Option<String>,
}

fn parse_bool(knob: &Knob, v: &Option<String>, default: bool) -> Result<bool, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            knob,
            v,
            "must be a boolean (true/false, 1/0, yes/no, on/off)",
        )),
    }
}

fn parse_f64(knob: &Knob, v: &Option<String>) -> Result<Option<f64>, ConfigError> {
    v.as_ref()
        .map(|s| {
            s.trim()
                .parse::<f64>()
                .map_err(|_| ConfigError::new(knob, s, "must be a number"))
        })
        .transpose()
}

fn parse_u64(knob: &Knob, v: &Option<String>) -> Result<Option<u64>, ConfigError> {
    v.as_ref()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| ConfigError::new(knob, s, "must be a whole number >= 0"))
        })
        .transpose()
}

impl RouterArgs {
    /// Builds and validates the configuration; unset knobs take the documented defaults
    /// (Dynamo's, plus kvgate's policy).
    pub fn to_config(&self) -> Result<RouterConfig, ConfigError> {
        let d = RouterConfig::default();
        let ttl = match parse_f64(&knobs::PREDICTED_TTL_SECS, &self.router_predicted_ttl_secs)? {
            None => None,
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Some(Duration::from_secs_f64(s)),
            Some(s) => {
                return Err(ConfigError::new(
                    &knobs::PREDICTED_TTL_SECS,
                    s,
                    "must be a number of seconds in (0, 1e9) (leave it unset to disable)",
                ));
            }
        };
        let block_size = match parse_u64(&knobs::KV_CACHE_BLOCK_SIZE, &self.kv_cache_block_size)? {
            None => None,
            Some(b) => Some(u32::try_from(b).map_err(|_| {
                ConfigError::new(
                    &knobs::KV_CACHE_BLOCK_SIZE,
                    b,
                    "must be a whole number of tokens in [1, 1048576]",
                )
            })?),
        };
        let config = RouterConfig {
            policy: match &self.router_policy {
                None => d.policy,
                Some(s) => RouterPolicy::parse(s)?,
            },
            prefill_tokens_per_sec: parse_f64(
                &knobs::PREFILL_TOKENS_PER_SEC,
                &self.prefill_tokens_per_sec,
            )?,
            enforce_disagg: parse_bool(
                &knobs::ENFORCE_DISAGG,
                &self.enforce_disagg,
                d.enforce_disagg,
            )?,
            overlap_score_credit: parse_f64(
                &knobs::OVERLAP_SCORE_CREDIT,
                &self.kv_overlap_score_credit,
            )?
            .unwrap_or(d.overlap_score_credit),
            overlap_score_credit_decay: parse_f64(
                &knobs::OVERLAP_SCORE_CREDIT_DECAY,
                &self.kv_overlap_score_credit_decay,
            )?
            .unwrap_or(d.overlap_score_credit_decay),
            prefill_load_scale: parse_f64(&knobs::PREFILL_LOAD_SCALE, &self.prefill_load_scale)?
                .unwrap_or(d.prefill_load_scale),
            temperature: parse_f64(&knobs::TEMPERATURE, &self.router_temperature)?
                .unwrap_or(d.temperature),
            replica_sync: parse_bool(
                &knobs::REPLICA_SYNC,
                &self.router_replica_sync,
                d.replica_sync,
            )?,
            track_active_blocks: parse_bool(
                &knobs::TRACK_ACTIVE_BLOCKS,
                &self.track_active_blocks,
                d.track_active_blocks,
            )?,
            track_output_blocks: parse_bool(
                &knobs::TRACK_OUTPUT_BLOCKS,
                &self.track_output_blocks,
                d.track_output_blocks,
            )?,
            track_prefill_tokens: parse_bool(
                &knobs::TRACK_PREFILL_TOKENS,
                &self.track_prefill_tokens,
                d.track_prefill_tokens,
            )?,
            predicted_ttl: ttl,
            admission: knobs::AdmissionConfig {
                mode: match &self.admission_control {
                    None => AdmissionMode::None,
                    Some(s) => AdmissionMode::parse(s)?,
                },
                active_decode_blocks_threshold: parse_f64(
                    &knobs::ACTIVE_DECODE_BLOCKS_THRESHOLD,
                    &self.active_decode_blocks_threshold,
                )?,
                active_prefill_tokens_threshold: parse_u64(
                    &knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD,
                    &self.active_prefill_tokens_threshold,
                )?,
                active_prefill_tokens_threshold_frac: parse_f64(
                    &knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC,
                    &self.active_prefill_tokens_threshold_frac,
                )?,
            },
            use_kv_events: parse_bool(&knobs::USE_KV_EVENTS, &self.use_kv_events, d.use_kv_events)?,
            block_size,
            ..d
        };
        config.validate()?;
        Ok(config)
    }
}

/// The effective configuration, one knob per line with its env var.
pub fn describe(c: &RouterConfig) -> String {
    let opt_f = |v: Option<f64>| v.map_or("unset".to_string(), |x| x.to_string());
    let rows: Vec<(&Knob, String)> = vec![
        (&knobs::ROUTER_POLICY, c.policy.as_str().to_string()),
        (
            &knobs::PREFILL_TOKENS_PER_SEC,
            c.prefill_tokens_per_sec
                .map_or("learned".into(), |v| v.to_string()),
        ),
        (&knobs::ENFORCE_DISAGG, c.enforce_disagg.to_string()),
        (
            &knobs::OVERLAP_SCORE_CREDIT,
            c.overlap_score_credit.to_string(),
        ),
        (
            &knobs::OVERLAP_SCORE_CREDIT_DECAY,
            c.overlap_score_credit_decay.to_string(),
        ),
        (&knobs::PREFILL_LOAD_SCALE, c.prefill_load_scale.to_string()),
        (&knobs::TEMPERATURE, c.temperature.to_string()),
        (&knobs::REPLICA_SYNC, c.replica_sync.to_string()),
        (
            &knobs::TRACK_ACTIVE_BLOCKS,
            c.track_active_blocks.to_string(),
        ),
        (
            &knobs::TRACK_OUTPUT_BLOCKS,
            c.track_output_blocks.to_string(),
        ),
        (
            &knobs::TRACK_PREFILL_TOKENS,
            c.track_prefill_tokens.to_string(),
        ),
        (
            &knobs::PREDICTED_TTL_SECS,
            c.predicted_ttl
                .map_or("unset".into(), |d| d.as_secs_f64().to_string()),
        ),
        (
            &knobs::ADMISSION_CONTROL,
            if c.admission.enabled() {
                "token-capacity"
            } else {
                "none"
            }
            .into(),
        ),
        (
            &knobs::ACTIVE_DECODE_BLOCKS_THRESHOLD,
            opt_f(c.admission.active_decode_blocks_threshold),
        ),
        (
            &knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD,
            c.admission
                .active_prefill_tokens_threshold
                .map_or("unset".into(), |v| v.to_string()),
        ),
        (
            &knobs::ACTIVE_PREFILL_TOKENS_THRESHOLD_FRAC,
            opt_f(c.admission.active_prefill_tokens_threshold_frac),
        ),
        (&knobs::USE_KV_EVENTS, c.use_kv_events.to_string()),
        (
            &knobs::KV_CACHE_BLOCK_SIZE,
            c.block_size.map_or("unset".into(), |v| v.to_string()),
        ),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(
            out,
            "{:<42} {:<10} (default {}; {})",
            k.env, v, k.default, k.flag
        );
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The clap flags and env names must be exactly the documented table.
    #[test]
    fn flags_and_env_names_match_the_knob_table() {
        let cmd = crate::cli::Cli::command();
        let config = cmd.find_subcommand("config").unwrap();
        let mut seen: Vec<(String, String)> = config
            .get_arguments()
            .filter_map(|a| {
                Some((
                    a.get_env()?.to_string_lossy().into_owned(),
                    format!("--{}", a.get_long()?),
                ))
            })
            .collect();
        seen.sort();
        let mut want: Vec<(String, String)> = knobs::KNOBS
            .iter()
            .map(|k| (k.env.to_string(), k.flag.to_string()))
            .collect();
        want.sort();
        assert_eq!(seen, want);
    }

    #[test]
    fn unset_means_defaults() {
        assert_eq!(
            RouterArgs::default().to_config().unwrap(),
            RouterConfig::default()
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_flag() {
        let a = RouterArgs {
            router_temperature: Some("-1".into()),
            ..Default::default()
        };
        let msg = a.to_config().unwrap_err().to_string();
        assert!(
            msg.contains("DYN_ROUTER_TEMPERATURE") && msg.contains("--router-temperature"),
            "{msg}"
        );
        let a = RouterArgs {
            track_active_blocks: Some("maybe".into()),
            ..Default::default()
        };
        assert!(
            a.to_config()
                .unwrap_err()
                .to_string()
                .contains("DYN_ROUTER_TRACK_ACTIVE_BLOCKS")
        );
        let a = RouterArgs {
            kv_cache_block_size: Some("99999999999".into()),
            ..Default::default()
        };
        assert!(
            a.to_config()
                .unwrap_err()
                .to_string()
                .contains("DYN_KV_CACHE_BLOCK_SIZE")
        );
    }

    #[test]
    fn values_are_parsed() {
        let a = RouterArgs {
            router_temperature: Some("0.5".into()),
            track_prefill_tokens: Some("off".into()),
            active_decode_blocks_threshold: Some("0.9".into()),
            router_predicted_ttl_secs: Some("30".into()),
            ..Default::default()
        };
        let c = a.to_config().unwrap();
        assert_eq!(c.temperature, 0.5);
        assert!(!c.track_prefill_tokens);
        assert!(c.admission.enabled());
        assert_eq!(c.predicted_ttl, Some(Duration::from_secs(30)));
    }
}
