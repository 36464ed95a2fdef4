//! How long a draft is: decided here for every proposer whose drafts are verified.
//! - By cost (`CostModel`, `RoundCosts`; the default for a draft model and for a multi-token
//!   model's verify mode): from what drafts are worth on this engine, below.
//! - By acceptance (`AdaptiveK`): grows after a fully accepted round, shrinks after a poor one
//!   (a draft model with `cost_aware = false`, and prompt lookup).
//! - Prompt lookup's back-off (`BackOff`): after a round with nothing accepted it proposes
//!   nothing for 1, 2, 4, ... up to 16 rounds, so that text that does not repeat itself decodes
//!   at plain speed.
//!
//! By cost: a draft token is worth verifying when the chance that it and every draft before it
//! are accepted (one more token) pays for the time it adds to the verify forward, at the rate
//! decoding already reaches: with `chain` that chance, `rate` the tokens per millisecond so far,
//! and `forward(n)` a forward's time over n positions, keep draft j while
//! `chain >= rate * (forward(j + 1) - forward(j) + draft time)`. (The rule of a renewal process:
//! a round's extra work is worth doing while its yield per millisecond beats the long-run rate.)
//!
//! All of it is measured on this engine, as it decodes: the forward time by positions (a
//! memory-bound target's extra positions cost little, a compute-bound one's nearly a step each),
//! the draft's time per token, the rate, and how often a draft token is accepted given the
//! draft's own probability of it. That last one is what lets a round stop where the draft is
//! unsure and run long where it is sure (a confident draft token is accepted far more often than
//! an unsure one).

use std::time::{Duration, Instant};

/// Positions per verify forward it keeps a cost for (a draft of up to 16 tokens, and the last).
const POSITIONS: usize = 18;
/// Weight of a new measurement in a running mean.
const NEW: f64 = 0.05;
/// Confidence bins of the acceptance estimate: [0, 0.1), [0.1, 0.2), ... [0.9, 1].
const BINS: usize = 10;
/// Pseudo-counts of the prior in each bin, which says a draft token of probability p is
/// accepted with probability p (a calibrated draft) until the bin has data of its own.
const PRIOR: f64 = 4.0;
/// Rounds with drafts after a pause before their rate is held against plain steps' again.
const PROBE_ROUNDS: usize = 8;
/// The longest pause of the draft, in target steps.
const MAX_PAUSE: usize = 64;
/// Rounds without a draft after which the next round sends its first draft whatever it seems
/// worth: the costs a decision rests on (a forward over two positions, the acceptance) are only
/// measured by rounds with drafts, and one measured under a burst of load would otherwise hold
/// the draft back for good. At most one forward in this many pays for the look.
const EXPLORE_AFTER: usize = 64;

/// Running means of forward time by positions and of the draft's time per token, acceptance by
/// the draft's confidence, and the decoding rate.
pub(crate) struct CostModel {
    forward_ms: [Option<f64>; POSITIONS],
    /// Target forwards since each count of positions was last measured. A mean that old is
    /// stale: a round goes one draft past where the rule stops to measure it again (else a burst
    /// of load that inflated it would shorten every round from then on), and the new time
    /// replaces it.
    forward_age: [usize; POSITIONS],
    draft_ms: Option<f64>,
    accepted: [f64; BINS],
    judged: [f64; BINS],
    /// Tokens per millisecond of whole rounds (drafting and verifying).
    rate: Option<f64>,
    /// Where drafting is slower than plain steps (a compute-bound target, a draft that is
    /// rarely right) the draft pauses: steps left in this pause, the next pause's length, and the
    /// rounds with drafts since the last one.
    paused: usize,
    next_pause: usize,
    probed: usize,
    /// Rounds since the last one that sent a draft.
    without_drafts: usize,
}

/// One request's side of the rule, for a proposer whose drafts are verified: the confidences of
/// the drafts sent this round, when the round began (`None`: not a round's cost, as one that
/// began with a prefill), and a draft made but not sent. Once the target decides that draft's
/// position after accepting every draft sent, it shows whether the draft would have been
/// accepted: what drafts are worth at confidences they are rarely sent with is learnt without
/// sending them.
#[derive(Default)]
pub(crate) struct RoundCosts {
    confidences: Vec<f32>,
    started: Option<Instant>,
    withheld: Option<(usize, u32, f32)>,
}

impl RoundCosts {
    /// Before a round: what the target decided at a withheld draft's position is learnt, and
    /// the round starts untimed with no drafts.
    pub(crate) fn begin(&mut self, costs: &mut CostModel, sequence: &[u32]) {
        if let Some((position, token, confidence)) = self.withheld.take() {
            if let Some(&decided) = sequence.get(position) {
                costs.observe(confidence, decided == token);
            }
        }
        self.confidences.clear();
        self.started = None;
    }

    /// The round, begun at `started`, counts as a round's cost.
    pub(crate) fn timed(&mut self, started: Instant) {
        self.started = Some(started);
    }

    /// A draft of this confidence was sent.
    pub(crate) fn sent(&mut self, confidence: f32) {
        self.confidences.push(confidence);
    }

    /// A draft not worth sending, for position `position` of the sequence (greedy only: a
    /// sampled draft is accepted with probability min(1, p/q), which the target's own draw
    /// does not show).
    pub(crate) fn withhold(&mut self, position: usize, token: u32, confidence: f32) {
        self.withheld = Some((position, token, confidence));
    }

    /// After the verify: `accepted` of the `proposed` drafts.
    pub(crate) fn judged(&mut self, costs: &mut CostModel, proposed: usize, accepted: usize) {
        if accepted < proposed {
            // The withheld draft followed a rejected one: nothing to learn from its position.
            self.withheld = None;
        }
        let took = self.started.take().map(|started| started.elapsed());
        costs.judged(&self.confidences[..proposed.min(self.confidences.len())], accepted, took);
    }
}

fn mean(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |old| old + NEW * (new - old))
}

fn bin(confidence: f32) -> usize {
    ((confidence.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1)
}

impl CostModel {
    pub(crate) fn new() -> CostModel {
        let mid = |b: usize| (b as f64 + 0.5) / BINS as f64;
        CostModel {
            forward_ms: [None; POSITIONS],
            forward_age: [0; POSITIONS],
            draft_ms: None,
            accepted: std::array::from_fn(|b| mid(b) * PRIOR),
            judged: [PRIOR; BINS],
            rate: None,
            paused: 0,
            next_pause: 1,
            probed: 0,
            without_drafts: 0,
        }
    }

    /// Whether this step drafts at all: not during a pause, and a pause begins (doubling each
    /// time, up to `MAX_PAUSE` steps) when rounds with drafts have made fewer tokens per
    /// millisecond than plain steps make.
    pub(crate) fn drafts_now(&mut self) -> bool {
        self.without_drafts += 1;
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        self.probed += 1;
        let (Some(rate), Some(step_ms)) = (self.rate, self.forward_at(1)) else { return true };
        if self.probed < PROBE_ROUNDS {
            return true;
        }
        if rate * step_ms < 1.0 {
            self.paused = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
            self.probed = 0;
            return false;
        }
        self.next_pause = 1;
        true
    }

    /// A target forward over `positions` took `took`.
    pub(crate) fn forward(&mut self, positions: usize, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        let stale = self.stale(positions);
        if let Some(slot) = self.forward_ms.get_mut(positions) {
            *slot = Some(if stale { ms } else { mean(*slot, ms) });
        }
        for (n, age) in self.forward_age.iter_mut().enumerate() {
            *age = if n == positions { 0 } else { age.saturating_add(1) };
        }
    }

    /// Whether a forward over `positions` was measured, but not for `EXPLORE_AFTER` forwards.
    fn stale(&self, positions: usize) -> bool {
        matches!(self.forward_ms.get(positions), Some(Some(_))) && self.forward_age[positions] >= EXPLORE_AFTER
    }

    /// Whether the estimate of a forward over `positions` rests on a stale mean: its own, or
    /// where it was never measured, that of the nearest count above it (`forward_at`
    /// interpolates towards it).
    fn estimate_stale(&self, positions: usize) -> bool {
        match self.forward_ms.get(positions) {
            Some(Some(_)) => self.stale(positions),
            Some(None) => (positions + 1..POSITIONS).find(|&n| self.forward_ms[n].is_some()).is_some_and(|n| self.stale(n)),
            None => false,
        }
    }

    /// The draft made `tokens` in `took`.
    pub(crate) fn drafted(&mut self, tokens: usize, took: Duration) {
        if tokens > 0 {
            self.draft_ms = Some(mean(self.draft_ms, took.as_secs_f64() * 1000.0 / tokens as f64));
        }
    }

    /// A round: the drafts' confidences in order, `accepted` of them accepted, `took` for the
    /// whole round (drafting and verifying; `None` when it included a prefill). Drafts after the
    /// first rejected one were not judged.
    pub(crate) fn judged(&mut self, confidences: &[f32], accepted: usize, took: Option<Duration>) {
        if !confidences.is_empty() {
            self.without_drafts = 0;
        }
        for (i, &confidence) in confidences.iter().enumerate().take(accepted + 1) {
            self.observe(confidence, i < accepted);
        }
        let ms = took.map_or(0.0, |t| t.as_secs_f64() * 1000.0);
        if ms > 0.0 {
            self.rate = Some(mean(self.rate, (accepted + 1) as f64 / ms));
        }
    }

    /// A draft token of this confidence that was not sent would have been accepted, or not.
    pub(crate) fn observe(&mut self, confidence: f32, accepted: bool) {
        let b = bin(confidence);
        self.judged[b] += 1.0;
        self.accepted[b] += accepted as u8 as f64;
    }

    /// How often a draft token of this confidence has been accepted.
    fn acceptance(&self, confidence: f32) -> f64 {
        let b = bin(confidence);
        self.accepted[b] / self.judged[b]
    }

    /// Forward time over `positions`: measured; else on the segment between the nearest measured
    /// counts below and above it; else, past the measured ones, along the least-squares line
    /// through them. `None` until two position counts are measured.
    fn forward_at(&self, positions: usize) -> Option<f64> {
        if let Some(Some(ms)) = self.forward_ms.get(positions) {
            return Some(*ms);
        }
        let known: Vec<(f64, f64)> = self.forward_ms.iter().enumerate().filter_map(|(n, ms)| ms.map(|ms| (n as f64, ms))).collect();
        if known.len() < 2 {
            return None;
        }
        let x = positions as f64;
        let below = known.iter().rev().find(|p| p.0 < x);
        let above = known.iter().find(|p| p.0 > x);
        if let (Some(&(x0, y0)), Some(&(x1, y1))) = (below, above) {
            return Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0));
        }
        let count = known.len() as f64;
        let (mx, my) = (known.iter().map(|p| p.0).sum::<f64>() / count, known.iter().map(|p| p.1).sum::<f64>() / count);
        let sxx: f64 = known.iter().map(|p| (p.0 - mx).powi(2)).sum();
        // Never cheaper with more positions.
        let slope = (known.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx).max(0.0);
        let &(x0, y0) = below.or(above)?;
        Some((y0 + slope * (x - x0)).max(f64::MIN_POSITIVE))
    }

    /// Whether the costs are known well enough to decide draft lengths by them.
    pub(crate) fn ready(&self) -> bool {
        self.draft_ms.is_some() && self.rate.is_some() && self.forward_ms.iter().filter(|ms| ms.is_some()).count() >= 2
    }

    /// Whether the draft token that would be the `index`-th of this round (from 0), drawn with
    /// probability `confidence`, is worth verifying; `chain` is the chance that every draft
    /// before it is accepted, and becomes the chance including it. `None` while not `ready`.
    ///
    /// A draft the rule would not send goes out where the estimate of the forward it makes rests
    /// on a stale mean (or no
    /// draft went out for `EXPLORE_AFTER` rounds); it ends the round (`chain` becomes 0), so that
    /// the forward measured is that one.
    pub(crate) fn worth(&mut self, index: usize, confidence: f32, chain: &mut f64) -> Option<bool> {
        let (rate, draft_ms) = (self.rate?, self.draft_ms?);
        // The verify runs the last decided token and the drafts: index + 1 positions without
        // this one, index + 2 with it.
        let added = self.forward_at(index + 2)? - self.forward_at(index + 1)? + draft_ms;
        let with = *chain * self.acceptance(confidence);
        if with >= rate * added && *chain > 0.0 {
            *chain = with;
            return Some(true);
        }
        let explore = *chain > 0.0 && ((index == 0 && self.without_drafts >= EXPLORE_AFTER) || self.estimate_stale(index + 2));
        if explore {
            *chain = 0.0;
        }
        Some(explore)
    }
}

/// Draft length by acceptance: grows after a fully accepted round, shrinks after a poor one.
pub(crate) struct AdaptiveK {
    k: usize,
    min: usize,
    max: usize,
}

impl AdaptiveK {
    /// Starts half way up.
    pub(crate) fn new(min: usize, max: usize) -> Self {
        AdaptiveK { k: max.div_ceil(2).max(min), min, max }
    }
    /// This round's length, within `limit`.
    pub(crate) fn now(&self, limit: usize) -> usize {
        self.k.min(limit)
    }
    pub(crate) fn min(&self) -> usize {
        self.min
    }
    pub(crate) fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed > 0 && accepted == proposed {
            self.k = (self.k + 1).min(self.max);
        } else if accepted * 2 < proposed {
            self.k = self.k.saturating_sub(1).max(self.min);
        }
    }
}

/// The longest back-off, in rounds.
const MAX_BACK_OFF: usize = 16;

/// Prompt lookup's back-off: rounds left to propose nothing, and the next pause after a failed
/// round.
pub(crate) struct BackOff {
    paused: usize,
    next_pause: usize,
}

impl BackOff {
    pub(crate) fn new() -> BackOff {
        BackOff { paused: 0, next_pause: 1 }
    }
    /// Whether this round proposes nothing (one round of the pause used).
    pub(crate) fn pausing(&mut self) -> bool {
        let pausing = self.paused > 0;
        self.paused = self.paused.saturating_sub(1);
        pausing
    }
    pub(crate) fn update(&mut self, proposed: usize, accepted: usize) {
        if proposed > 0 && accepted == 0 {
            self.paused = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(MAX_BACK_OFF);
        } else if accepted > 0 {
            self.next_pause = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    /// Measured forwards by positions, a draft cost, and `rounds` rounds in which a draft of
    /// `confidence` was accepted `accepted` of `of` times, at `rate` tokens per ms.
    fn model(costs: &[(usize, f64)], confidence: f32, accepted: usize, of: usize, rate: f64) -> CostModel {
        let mut m = CostModel::new();
        for &(n, c) in costs {
            m.forward(n, ms(c));
        }
        m.drafted(1, ms(0.1));
        for i in 0..of {
            let ok = (i < accepted) as usize;
            m.judged(&[confidence], ok, Some(ms((ok + 1) as f64 / rate)));
        }
        m
    }

    fn length(m: &mut CostModel, confidences: &[f32]) -> usize {
        let mut chain = 1.0;
        confidences.iter().enumerate().take_while(|&(i, &c)| m.worth(i, c, &mut chain).unwrap()).count()
    }

    #[test]
    fn long_drafts_where_positions_are_nearly_free_short_ones_where_they_cost() {
        // Memory-bound: 9 positions cost 1.2x one; drafts at 0.8 confidence accepted 4 in 5.
        let mut flat = model(&[(1, 10.0), (9, 12.0)], 0.85, 40, 50, 0.15);
        assert_eq!(length(&mut flat, &[0.85; 8]), 8);
        // Compute-bound: every position costs nearly a step.
        let mut steep = model(&[(1, 10.0), (9, 90.0)], 0.85, 40, 50, 0.15);
        assert!(length(&mut steep, &[0.85; 8]) <= 1);
    }

    #[test]
    fn a_round_stops_where_the_draft_is_unsure() {
        // A memory-bound curve (1, 1.21, 1.50, 2.08, 3.28 times one position) at a rate of
        // about 1.5 tokens per step.
        let mut m = model(&[(1, 17.8), (2, 21.5), (3, 26.7), (5, 37.0), (9, 58.4)], 0.95, 50, 50, 1.5 / 17.8);
        // Unsure drafts were accepted 2 times in 10.
        for i in 0..40 {
            m.judged(&[0.15], (i % 5 == 0) as usize, Some(ms(17.8)));
        }
        assert_eq!(length(&mut m, &[0.95, 0.95, 0.95, 0.15, 0.95]), 3, "sure drafts go on, an unsure one ends the round");
        assert_eq!(length(&mut m, &[0.15, 0.95]), 0, "an unsure first draft: a plain step");
    }

    #[test]
    fn unknown_until_costs_and_a_round_are_measured() {
        let mut m = CostModel::new();
        m.forward(5, ms(30.0));
        m.drafted(4, ms(1.0));
        m.judged(&[0.9, 0.9, 0.9, 0.9], 3, Some(ms(31.0)));
        assert!(!m.ready() && m.worth(0, 0.9, &mut 1.0).is_none(), "one position count measured");
        m.forward(3, ms(20.0));
        assert!(m.ready() && m.worth(0, 0.9, &mut 1.0).is_some());
    }

    #[test]
    fn drafting_pauses_where_plain_steps_are_faster_and_probes_again() {
        // Plain steps make 1 token per 10 ms; rounds with drafts 0.8 per 10 ms.
        let mut m = model(&[(1, 10.0), (5, 30.0)], 0.5, 1, 2, 0.08);
        let pattern: Vec<bool> = (0..40).map(|_| m.drafts_now()).collect();
        let first_pause = pattern.iter().position(|d| !d).expect("a pause");
        assert!(first_pause <= PROBE_ROUNDS, "{pattern:?}");
        assert!(pattern[first_pause..].iter().any(|&d| d), "drafting is tried again after a pause: {pattern:?}");
        assert!(pattern.iter().filter(|&&d| !d).count() >= 3, "pauses grow: {pattern:?}");
        // Where drafts pay, no pause.
        let mut paying = model(&[(1, 10.0), (5, 12.0)], 0.9, 9, 10, 0.3);
        assert!((0..40).all(|_| paying.drafts_now()));
    }

    /// Costs measured under a burst (two positions far dearer than one) say no draft pays; with
    /// no round sending one they would never be measured again. After `EXPLORE_AFTER` rounds
    /// without a draft, one round sends its first draft; once it is judged, the rule decides again.
    #[test]
    fn a_draft_goes_out_now_and_then_so_that_stale_costs_are_measured_again() {
        let mut m = model(&[(1, 10.0), (2, 60.0)], 0.9, 9, 10, 0.1);
        let mut sent = Vec::new();
        for _ in 0..2 * EXPLORE_AFTER + 2 {
            if m.drafts_now() && length(&mut m, &[0.9]) == 1 {
                sent.push(m.without_drafts);
                m.judged(&[0.9], 1, Some(ms(11.0)));
            } else {
                m.judged(&[], 0, Some(ms(10.0)));
            }
        }
        assert_eq!(sent, vec![EXPLORE_AFTER, EXPLORE_AFTER], "one draft each {EXPLORE_AFTER} rounds");
        // Measured again, the two positions cost what they do: drafts pay from then on.
        for _ in 0..100 {
            m.forward(2, ms(11.0));
        }
        assert_eq!(length(&mut m, &[0.9]), 1);
    }

    /// Costs of three and more positions measured under a burst make the rule stop after one
    /// draft, so they would never be measured again. Once a count has not been measured for
    /// `EXPLORE_AFTER` forwards, one round sends the draft that makes it (and ends there), its
    /// new time replaces the stale mean, and the rule sends long drafts again.
    #[test]
    fn a_stale_cost_of_more_positions_is_measured_again_and_replaced() {
        let burst = [(1, 10.0), (2, 10.5), (3, 30.0), (4, 31.0), (9, 36.0)];
        let mut m = model(&burst, 0.95, 19, 20, 0.15);
        assert_eq!(length(&mut m, &[0.95; 8]), 1, "the burst's costs stop the round after one draft");
        // Rounds of one draft measure two positions; the rest grow stale.
        let mut lengths = Vec::new();
        for _ in 0..EXPLORE_AFTER + 1 {
            let n = length(&mut m, &[0.95; 8]);
            lengths.push(n);
            m.forward(n + 1, ms(10.0 + 0.5 * n as f64));
        }
        let first = lengths.iter().position(|&n| n > 1).expect("a round explores");
        assert!(first + 2 >= EXPLORE_AFTER && lengths[first] == 2, "after the stale age, one draft further: {lengths:?}");
        // Three positions measured again at 11 ms, the 30 ms burst replaced: the counts after
        // it are explored in turn (each round one further) until the rule sends long drafts.
        let mut longest = 0;
        for _ in 0..4 * EXPLORE_AFTER {
            let n = length(&mut m, &[0.95; 8]);
            longest = longest.max(n);
            m.forward(n + 1, ms(10.0 + 0.5 * n as f64));
        }
        assert_eq!(longest, 8, "drafts pay again once the burst's costs are measured again");
        assert_eq!(length(&mut m, &[0.95; 8]), 8);
    }

    /// A withheld draft is judged by what the target decided at its position, unless a draft
    /// before it was rejected (the target then never decided that position after them).
    #[test]
    fn a_withheld_draft_is_learnt_from_once_the_target_decides_its_position() {
        // Rounds that send one sure draft (`accepted` of it) and withhold an unsure one, after
        // which the target decides the withheld draft's token at its position.
        let learnt = |accepted: usize| {
            let (mut m, mut round) = (CostModel::new(), RoundCosts::default());
            for _ in 0..40 {
                round.begin(&mut m, &[1, 2, 3]);
                round.sent(0.95);
                round.withhold(3, 7, 0.15);
                round.judged(&mut m, 1, accepted);
                round.begin(&mut m, &[1, 2, 3, 7]);
            }
            m.acceptance(0.15)
        };
        assert!(learnt(1) > 0.8, "withheld drafts that would have been accepted: {}", learnt(1));
        assert!((learnt(0) - 0.15).abs() < 1e-9, "after a rejection nothing is learnt: {}", learnt(0));
    }

    #[test]
    fn acceptance_starts_at_the_confidence_and_follows_what_is_seen() {
        let mut m = CostModel::new();
        assert!((m.acceptance(0.55) - 0.55).abs() < 1e-9, "the prior: a calibrated draft");
        for _ in 0..100 {
            m.judged(&[0.55], 1, Some(ms(1.0)));
        }
        assert!(m.acceptance(0.55) > 0.95, "{}", m.acceptance(0.55));
        assert!((m.acceptance(0.05) - 0.05).abs() < 1e-9, "other bins keep their prior");
    }

    #[test]
    fn adaptive_k_moves_within_bounds() {
        let mut k = AdaptiveK::new(2, 6);
        assert_eq!(k.k, 3, "starts half way up");
        assert_eq!(k.now(2), 2, "within the round's limit");
        k.update(3, 3);
        k.update(4, 4);
        k.update(5, 5);
        k.update(6, 6);
        assert_eq!(k.k, 6);
        for _ in 0..10 {
            k.update(6, 0);
        }
        assert_eq!(k.k, 2);
    }

    #[test]
    fn the_back_off_doubles_after_each_failed_round_and_resets_on_success() {
        let mut back_off = BackOff::new();
        let pauses = |b: &mut BackOff| std::iter::from_fn(|| b.pausing().then_some(())).count();
        assert_eq!(pauses(&mut back_off), 0);
        for expected in [1, 2, 4, 8, 16, 16] {
            back_off.update(3, 0);
            assert_eq!(pauses(&mut back_off), expected);
        }
        back_off.update(3, 1);
        back_off.update(3, 0);
        assert_eq!(pauses(&mut back_off), 1, "an accepted draft resets the pause");
    }
}
