//! Draft length from what verification costs here: the time of a target forward by its number
//! of positions (measured on this request, as it runs), the draft's time per token, and the
//! acceptance so far. Where a forward of more positions costs nearly what one costs (a
//! memory-bound target, on a kernel that shares the weight loads) long drafts pay; where it costs
//! nearly k times as much (a compute-bound one) they do not, whatever the acceptance.

use std::time::Duration;

/// Positions per verify forward it keeps a cost for (a draft of up to 16 tokens, and the last).
const POSITIONS: usize = 18;
/// Weight of a new measurement in a running mean.
const NEW: f64 = 0.2;

/// Running means of forward time by positions, draft time per token, and per-token acceptance.
pub(crate) struct CostModel {
    forward_ms: [Option<f64>; POSITIONS],
    draft_ms: Option<f64>,
    /// Accepted drafts and judged ones (accepted, and the first rejected of a round), decayed.
    accepted: f64,
    judged: f64,
}

fn mean(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |old| old + NEW * (new - old))
}

impl CostModel {
    pub(crate) fn new() -> CostModel {
        CostModel { forward_ms: [None; POSITIONS], draft_ms: None, accepted: 0.0, judged: 0.0 }
    }

    /// A target forward over `positions` took `took`.
    pub(crate) fn forward(&mut self, positions: usize, took: Duration) {
        if let Some(slot) = self.forward_ms.get_mut(positions) {
            *slot = Some(mean(*slot, took.as_secs_f64() * 1000.0));
        }
    }

    /// The draft proposed `tokens` in `took`.
    pub(crate) fn drafted(&mut self, tokens: usize, took: Duration) {
        if tokens > 0 {
            self.draft_ms = Some(mean(self.draft_ms, took.as_secs_f64() * 1000.0 / tokens as f64));
        }
    }

    /// A round: `accepted` of `proposed` drafts.
    pub(crate) fn judged(&mut self, proposed: usize, accepted: usize) {
        if proposed == 0 {
            return;
        }
        let judged = (accepted + 1).min(proposed) as f64;
        // Rounds decay as the means do, so that acceptance follows the text.
        self.accepted = self.accepted * (1.0 - NEW) + accepted as f64;
        self.judged = self.judged * (1.0 - NEW) + judged;
    }

    /// Forward time over `positions`: measured, or on the line through the measured ones
    /// (least squares; `None` until two position counts are measured).
    fn forward_at(&self, positions: usize) -> Option<f64> {
        if let Some(Some(ms)) = self.forward_ms.get(positions) {
            return Some(*ms);
        }
        let known: Vec<(f64, f64)> = self.forward_ms.iter().enumerate().filter_map(|(n, ms)| ms.map(|ms| (n as f64, ms))).collect();
        if known.len() < 2 {
            return None;
        }
        let count = known.len() as f64;
        let (mx, my) = (known.iter().map(|p| p.0).sum::<f64>() / count, known.iter().map(|p| p.1).sum::<f64>() / count);
        let sxx: f64 = known.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let slope = known.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx;
        Some((my + slope * (positions as f64 - mx)).max(f64::MIN_POSITIVE))
    }

    /// The draft length in `min..=max` that gives the most tokens per millisecond, or `None`
    /// while the costs are not known yet (the caller's own rule explores meanwhile).
    pub(crate) fn best_length(&self, min: usize, max: usize) -> Option<usize> {
        let draft_ms = self.draft_ms?;
        if self.judged < 4.0 {
            return None;
        }
        // Per-token acceptance, kept off 0 and 1 so that the expectation stays finite.
        let p = (self.accepted / self.judged).clamp(0.01, 0.99);
        let tokens = |k: usize| (1.0 - p.powi(k as i32 + 1)) / (1.0 - p);
        let rate = |k: usize| Some(tokens(k) / (self.forward_at(k + 1)? + k as f64 * draft_ms));
        let mut best: Option<(usize, f64)> = None;
        for k in min.max(1)..=max {
            let r = rate(k)?;
            if best.is_none_or(|(_, b)| r > b) {
                best = Some((k, r));
            }
        }
        best.map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    fn model(costs: &[(usize, f64)], draft: f64, accepted: usize, proposed: usize) -> CostModel {
        let mut m = CostModel::new();
        for &(n, c) in costs {
            m.forward(n, ms(c));
        }
        m.drafted(1, ms(draft));
        for _ in 0..10 {
            m.judged(proposed, accepted);
        }
        m
    }

    #[test]
    fn long_drafts_where_positions_are_nearly_free_short_ones_where_they_cost() {
        // Memory-bound: 9 positions cost 1.2x one; acceptance about 0.8.
        let flat = model(&[(1, 10.0), (9, 12.0)], 0.1, 4, 5);
        assert_eq!(flat.best_length(1, 8), Some(8));
        // Compute-bound: cost grows with every position.
        let steep = model(&[(1, 10.0), (9, 90.0)], 0.1, 4, 5);
        assert_eq!(steep.best_length(1, 8), Some(1));
        // The measured XL curve (1, 1.14, 1.45, 2.05, 3.29 x 16 ms) at acceptance 0.77: 2 or 3.
        let xl = model(&[(1, 16.0), (2, 18.2), (3, 23.2), (5, 32.8), (9, 52.6)], 0.07, 3, 4);
        let k = xl.best_length(1, 8).unwrap();
        assert!((2..=3).contains(&k), "{k}");
    }

    #[test]
    fn unknown_until_two_position_counts_and_a_few_rounds() {
        let mut m = CostModel::new();
        m.forward(5, ms(30.0));
        m.drafted(4, ms(1.0));
        for _ in 0..10 {
            m.judged(4, 3);
        }
        assert_eq!(m.best_length(1, 8), None, "one position count measured");
        m.forward(3, ms(20.0));
        assert!(m.best_length(1, 8).is_some());
        assert_eq!(model(&[(1, 10.0), (9, 12.0)], 0.1, 0, 0).best_length(1, 8), None, "no round judged");
    }
}
