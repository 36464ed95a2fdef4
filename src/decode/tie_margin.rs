//! The near-tie margin: under what gap between a verify row's top two logits a greedy decision
//! is re-checked by a one-token forward (`super::verify::greedy_verdict`), learnt per target from
//! what its re-checks measure. Kept apart from the verifier so that the targets that learn a
//! margin (`super::decoder`, the multi-token base) need not import the verifier.

use super::sampler::argmax;

/// Logit gap under which a greedy decision from a batched verify row is re-checked with a
/// single-token forward, until a target's own re-checks have measured how far its batched rows
/// stray (`TieMargin`). Batched and single-token forwards of the committed target differed by
/// up to ~0.04 in a logit (measured with onnxruntime on CPU); 0.1 leaves room for that.
pub const TIE_MARGIN: f32 = 0.1;

/// Re-checks a target makes before its margin follows what they measured.
pub const TIE_SAMPLES: usize = 32;
/// The margin is this many times the largest difference measured, as 0.1 is to the 0.04 above.
pub const TIE_SAFETY: f32 = 2.5;
/// A margin never below this, however alike the two forwards have been.
pub const TIE_FLOOR: f32 = 0.01;

/// The near-tie margin of one target, learnt from its re-checks. Each re-check runs the row's
/// position alone and so measures how far the batched row's decision strayed: how much the
/// logits near the top moved against the top one. The margin is `TIE_SAFETY` times the largest
/// such move seen (never less than `TIE_MARGIN` before `TIE_SAMPLES` re-checks, never less than
/// `TIE_FLOOR` after). It only grows once learnt: a provider whose batched rows stray further
/// gets a wider margin, where a fixed one would let its verify decide ties plain decoding
/// decides otherwise. Every speculative request of an engine adds to it.
#[derive(Debug, Clone, Default)]
pub struct TieMargin {
    worst: f32,
    checks: usize,
    /// The target's batched rows are its one-position rows bit for bit
    /// (`Int4Kernel::rows_exact`): nothing is too close to call.
    exact: bool,
}

impl TieMargin {
    /// The margin of a target whose batched rows equal its one-position rows exactly: 0.
    pub fn exact() -> TieMargin {
        TieMargin { exact: true, ..TieMargin::default() }
    }

    pub fn margin(&self) -> f32 {
        if self.exact {
            return 0.0;
        }
        let measured = TIE_SAFETY * self.worst;
        measured.max(if self.checks < TIE_SAMPLES { TIE_MARGIN } else { TIE_FLOOR })
    }

    /// A re-check: `batched` is the verify's row, `single` the one-token forward's, both as the
    /// greedy decision reads them (masked and penalised alike). The tokens that count are those
    /// within twice the margin of the batched row's top: the ones a stray could put first.
    pub fn observe(&mut self, batched: &[f32], single: &[f32]) {
        let top = argmax(batched);
        let (b_top, s_top) = (batched[top], single[top]);
        let window = 2.0 * self.margin();
        let moved = batched
            .iter()
            .zip(single)
            .filter(|(&b, _)| b.is_finite() && b_top - b < window)
            .map(|(&b, &s)| ((b - b_top) - (s - s_top)).abs())
            .filter(|d| d.is_finite())
            .fold(0f32, f32::max);
        self.worst = self.worst.max(moved);
        self.checks += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The margin keeps the prior until enough re-checks, then follows the largest move seen
    /// (times the safety factor, above the floor); a large move widens it at once; a token far
    /// from the top moving does not count.
    #[test]
    fn the_tie_margin_follows_what_re_checks_measure() {
        let mut ties = TieMargin::default();
        let batched = [5.0, 4.96, 1.0, -3.0];
        let single = [5.0, 4.97, 1.0, -1.0];
        for _ in 0..TIE_SAMPLES - 1 {
            ties.observe(&batched, &single);
        }
        assert_eq!(ties.margin(), TIE_MARGIN, "the prior until {TIE_SAMPLES} re-checks");
        ties.observe(&batched, &single);
        assert!((ties.margin() - TIE_SAFETY * 0.01).abs() < 1e-4, "learnt: {}", ties.margin());
        ties.observe(&[5.0, 4.99, 0.0], &[5.0, 4.99, 0.0]);
        assert!((ties.margin() - TIE_SAFETY * 0.01).abs() < 1e-4, "alike forwards do not narrow a learnt margin");
        let mut alike = TieMargin::default();
        (0..TIE_SAMPLES).for_each(|_| alike.observe(&[1.0, 0.99], &[1.0, 0.99]));
        assert_eq!(alike.margin(), TIE_FLOOR);
        let mut strays = TieMargin::default();
        strays.observe(&[2.0, 1.95, 0.0], &[2.0, 2.05, 0.0]);
        assert!((strays.margin() - TIE_SAFETY * 0.1).abs() < 1e-4, "a wide move widens the margin at once: {}", strays.margin());
    }
}
