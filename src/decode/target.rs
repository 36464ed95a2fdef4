//! The target: what runs the forwards the driver verifies with, and the decoder graph's target
//! (a decoder graph with this request's KV cache). A multi-token model's base is the other
//! target (`crate::multitoken::BaseTarget`).

use super::decoder::{Decoder, KvCache, KvLayout};
use super::run::{CancelToken, Run};
use super::tie_margin::TIE_MARGIN;
use crate::error::{Error, Result};

/// The hidden state of the row that decided the sequence's last token, for proposers that
/// draft from the target's own features (a multi-token micro decoder; MTP or EAGLE heads).
pub(crate) struct RowState<'a> {
    pub hidden: &'a [f32],
    /// The model's stop head on that row: the logit that the step ends after the token.
    pub stop_logit: f32,
}

/// What runs the forwards the driver verifies with.
pub(crate) trait Target {
    fn vocab(&self) -> usize;
    /// Positions its cache holds.
    fn len(&self) -> usize;
    /// Runs `ids` after the cache, one position each; returns the logits of the last `rows`
    /// positions, row-major `rows x vocab`. The last row becomes the selected one.
    fn forward(&mut self, ids: &[u32], rows: usize) -> Result<&mut [f32]>;
    /// Runs the tokens of one trusted step as a single position (`Policy::Trust`).
    fn forward_merged(&mut self, _ids: &[u32]) -> Result<&mut [f32]> {
        Err(Error::Inference("this model does not take merged steps".into()))
    }
    /// Forgets every position after the first `len`.
    fn truncate(&mut self, len: usize) -> Result<()>;
    /// Runs `id` as a one-token step after the first `len` positions and keeps the positions
    /// after them: a near tie inside a verified round, decided as plain decoding decides it,
    /// without losing the rows after it. Returns its logits, or `None` where the target cannot
    /// (the driver then truncates and steps). The last verify's rows stay the selectable ones.
    fn step_inside(&mut self, _len: usize, _id: u32) -> Result<Option<&mut [f32]>> {
        Ok(None)
    }
    /// The gap between a verify row's top two under which a one-token forward decides the row
    /// (`super::tie_margin::TieMargin`, where the target learns its own).
    fn tie_margin(&self) -> f32 {
        TIE_MARGIN
    }
    /// A near tie re-checked: the verify's row and the one-token forward's, as the decision
    /// reads them.
    fn observe_tie(&mut self, _batched: &[f32], _single: &[f32]) {}
    /// Row `row` of the last forward's rows decided the sequence's last token.
    fn select_row(&mut self, _row: usize) {}
    /// The selected row's hidden state, where the target exposes one.
    fn row_state(&self) -> Option<RowState<'_>> {
        None
    }
}

/// A decoder graph with this request's KV cache, as the decode driver's target.
pub(crate) struct DecoderTarget<'d> {
    decoder: &'d Decoder,
    pub(crate) cache: KvCache,
}

impl<'d> DecoderTarget<'d> {
    /// A cache with room for the request's tokens and one proposal past them; its runs are
    /// terminated with `cancel`.
    /// `kept`: a cache from an earlier request, holding a prefix of the prompt.
    pub(crate) fn new(
        decoder: &'d Decoder,
        layout: KvLayout,
        run: &Run,
        lookahead: usize,
        cancel: &CancelToken,
        kept: Option<KvCache>,
    ) -> Result<Self> {
        let extra = if lookahead > 0 { lookahead + 1 } else { 0 };
        let positions = run.prompt_len + run.max_new + extra;
        let cache = match kept {
            Some(mut cache) => {
                cache.renew_run_options()?;
                cache.reserve(positions, decoder.context())?;
                cache
            }
            None => decoder.new_cache(layout, positions)?,
        };
        cancel.attach(cache.run_options());
        Ok(DecoderTarget { decoder, cache })
    }
}

impl Target for DecoderTarget<'_> {
    fn vocab(&self) -> usize {
        self.decoder.vocab()
    }
    fn len(&self) -> usize {
        self.cache.len()
    }
    fn forward(&mut self, ids: &[u32], rows: usize) -> Result<&mut [f32]> {
        // The logits stay in the cache: a one-token step reads them where ONNX Runtime wrote them.
        self.decoder.forward_in_cache(&mut self.cache, ids, rows)
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len)
    }
    fn tie_margin(&self) -> f32 {
        self.decoder.tie_margin()
    }
    fn observe_tie(&mut self, batched: &[f32], single: &[f32]) {
        self.decoder.observe_tie(batched, single);
    }
    fn step_inside(&mut self, len: usize, id: u32) -> Result<Option<&mut [f32]>> {
        self.decoder.step_inside(&mut self.cache, len, id).map(Some)
    }
}
