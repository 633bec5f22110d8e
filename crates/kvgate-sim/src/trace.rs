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

/// Spreads requests that share a timestamp evenly over the time to the next timestamp (the
/// last group over the mean gap), in trace order. Traces published with coarse timestamps (the
/// bundled one counts in ~3 s steps, ~10 requests per step) otherwise arrive in bursts of exactly
/// simultaneous requests, which no gateway sees: its requests are at least microseconds apart.
/// Returns how many requests moved.
pub fn spread_ties(rows: &mut [TraceRow]) -> usize {
    let distinct: Vec<f64> = {
        let mut d: Vec<f64> = rows.iter().map(|r| r.timestamp).collect();
        d.dedup();
        d
    };
    let mean_gap = match (distinct.first(), distinct.last()) {
        (Some(a), Some(b)) if distinct.len() > 1 => (b - a) / (distinct.len() - 1) as f64,
        _ => 0.0,
    };
    let mut moved = 0;
    let mut i = 0;
    while i < rows.len() {
        let t = rows[i].timestamp;
        let j = i + rows[i..].iter().take_while(|r| r.timestamp == t).count();
        let next = rows.get(j).map_or(t + mean_gap, |r| r.timestamp);
        let n = (j - i) as f64;
        for (k, r) in rows[i..j].iter_mut().enumerate().skip(1) {
            r.timestamp = t + (next - t) * k as f64 / n;
            moved += 1;
        }
        i = j;
    }
    moved
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
    fn spread_ties_keeps_order_and_stays_before_the_next_timestamp() {
        let mut rows = vec![
            row(0.0, 16, &[1]),
            row(0.0, 16, &[2]),
            row(0.0, 16, &[3]),
            row(0.0, 16, &[4]),
            row(3000.0, 16, &[5]),
            row(6000.0, 16, &[6]),
            row(6000.0, 16, &[7]),
        ];
        assert_eq!(spread_ties(&mut rows), 4);
        let ts: Vec<f64> = rows.iter().map(|r| r.timestamp).collect();
        assert_eq!(ts, vec![0.0, 750.0, 1500.0, 2250.0, 3000.0, 6000.0, 7500.0]);
        let ids: Vec<u64> = rows.iter().map(|r| r.hash_ids[0]).collect();
        assert_eq!(ids, (1..=7).collect::<Vec<_>>());
        // Nothing to spread: nothing moves.
        assert_eq!(spread_ties(&mut rows), 0);
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
