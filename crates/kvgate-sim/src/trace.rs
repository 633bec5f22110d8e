//! Mooncake-format request traces: `{"timestamp": ms, "input_length": n, "output_length": n,
//! "hash_ids": [...]}` per line, where each hash id names a 512-token prefix block (equal ids at
//! equal positions are a shared prefix). Prompts are synthesised deterministically: the same id
//! always expands to the same tokens, so prefix sharing survives the expansion.

use serde::Deserialize;

/// Tokens per hash id in Mooncake's traces.
pub const MOONCAKE_BLOCK_TOKENS: usize = 512;

#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct TraceRow {
    /// Milliseconds from the start of the trace.
    pub timestamp: f64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// Parses a whole trace; errors name the line.
pub fn parse(text: &str) -> Result<Vec<TraceRow>, String> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: TraceRow =
            serde_json::from_str(line).map_err(|e| format!("trace line {}: {e}", i + 1))?;
        if !row.timestamp.is_finite() || row.timestamp < 0.0 {
            return Err(format!("trace line {}: bad timestamp", i + 1));
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err("the trace has no requests".into());
    }
    // Replay order is arrival order.
    rows.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(rows)
}

/// Token ids for trace block `id`: the same id always expands to the same tokens.
pub fn block_tokens(id: u64, n: usize) -> impl Iterator<Item = u32> {
    (0..n as u64).map(move |j| {
        let mut z = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ j.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^= z >> 31;
        z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z >> 33) % 100_000) as u32 + 1_000
    })
}

/// The prompt of `row` with `per_block` tokens per hash id: `input_length` scaled by
/// `per_block / 512` (at least one token), made of its blocks' tokens in order.
pub fn prompt(row: &TraceRow, per_block: usize) -> Vec<u32> {
    let len = prompt_len(row, per_block);
    let mut out = Vec::with_capacity(len);
    for &h in &row.hash_ids {
        let take = per_block.min(len - out.len());
        out.extend(block_tokens(h, take));
        if out.len() >= len {
            break;
        }
    }
    // A trace whose ids do not cover its length: pad with tokens unique to this request.
    let pad_id = u64::MAX - row.timestamp.to_bits();
    let missing = len - out.len();
    out.extend(block_tokens(pad_id, missing));
    out
}

pub fn prompt_len(row: &TraceRow, per_block: usize) -> usize {
    (row.input_length as usize * per_block)
        .div_ceil(MOONCAKE_BLOCK_TOKENS)
        .max(1)
}

/// The most any router can hit with unlimited cache: the fraction of prompt tokens whose block
/// id was seen before (ids are prefix ids, so a repeated id is a repeated prefix).
pub fn reuse_bound(rows: &[TraceRow], per_block: usize) -> f64 {
    let mut seen = std::collections::HashSet::new();
    let (mut hit, mut total) = (0u64, 0u64);
    for r in rows {
        let len = prompt_len(r, per_block);
        let mut covered = 0usize;
        for &h in &r.hash_ids {
            let take = per_block.min(len - covered);
            covered += take;
            total += take as u64;
            if !seen.insert(h) {
                hit += take as u64;
            }
            if covered >= len {
                break;
            }
        }
        total += (len - covered) as u64;
    }
    hit as f64 / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ts: f64, len: u64, ids: &[u64]) -> TraceRow {
        TraceRow {
            timestamp: ts,
            input_length: len,
            output_length: 10,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn prompts_share_exactly_their_shared_blocks() {
        let a = prompt(&row(0.0, 1024, &[1, 2]), 512);
        let b = prompt(&row(1.0, 1000, &[1, 3]), 512);
        assert_eq!(a.len(), 1024);
        assert_eq!(b.len(), 1000);
        assert_eq!(a[..512], b[..512]);
        assert_ne!(a[512..600], b[512..600]);
        // Scaled down: 64 tokens per id.
        let c = prompt(&row(0.0, 1024, &[1, 2]), 64);
        assert_eq!(c.len(), 128);
        assert_eq!(c[..64], block_tokens(1, 64).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn reuse_bound_counts_repeated_blocks() {
        let rows = vec![row(0.0, 1024, &[1, 2]), row(1.0, 1024, &[1, 3])];
        assert!((reuse_bound(&rows, 512) - 0.25).abs() < 1e-9);
    }

    #[test]
    fn parse_names_the_bad_line_and_sorts() {
        let err =
            parse("{\"timestamp\":0,\"input_length\":1,\"output_length\":1,\"hash_ids\":[]}\nnope")
                .unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let rows = parse(
            "{\"timestamp\":5,\"input_length\":1,\"output_length\":1,\"hash_ids\":[1]}\n{\"timestamp\":1,\"input_length\":1,\"output_length\":1,\"hash_ids\":[2]}\n",
        )
        .unwrap();
        assert_eq!(rows[0].hash_ids, vec![2]);
        assert!(parse("\n").is_err());
    }
}
