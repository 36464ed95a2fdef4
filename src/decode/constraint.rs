//! A request's output constraint during decoding: llguidance's matcher, advanced with every
//! accepted token, masks the logits of every position the driver decides: the prefill's first
//! token, plain steps, each row a verification judges (a draft model's, prompt lookup's, a
//! micro decoder's) and the micro decoder's own tokens in trust mode.

use llguidance::Matcher;

use crate::error::{Error, Result};

pub(crate) struct Constraint {
    matcher: Matcher,
    /// The request option the grammar came from, for errors.
    option: &'static str,
}

impl Constraint {
    pub(crate) fn new(matcher: Matcher, option: &'static str) -> Constraint {
        Constraint { matcher, option }
    }

    /// llguidance stops on a grammar past its limits (a row of too many items, lexer fuel) while
    /// decoding: the caller's grammar is at fault, so it is the caller's error, with the first
    /// line of llguidance's word (the rest dumps its state).
    fn failed(&self, what: &str, e: impl std::fmt::Display) -> Error {
        let e = e.to_string();
        let first = e.lines().next().unwrap_or_default();
        Error::InvalidArgument { argument: self.option.into(), reason: format!("llguidance stopped on it while decoding ({what}): {first}") }
    }

    /// Sets every token the grammar does not allow next to -inf (only eos once it is complete).
    fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| self.failed("mask", e))?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Masks `logits` for the position after the accepted tokens and then `ahead` (tokens
    /// proposed but not yet accepted); the matcher is left where it was.
    pub(crate) fn mask(&mut self, logits: &mut [f32], ahead: &[u32]) -> Result<()> {
        if ahead.is_empty() {
            return self.apply(logits);
        }
        self.matcher.consume_tokens(ahead).map_err(|e| self.failed("proposed tokens", e))?;
        let masked = self.apply(logits);
        self.matcher.rollback(ahead.len()).map_err(|e| self.failed("rollback", e))?;
        masked
    }

    /// Masks verification rows: row i follows `drafts[..i]`.
    pub(crate) fn mask_rows(&mut self, rows: &mut [Vec<f32>], drafts: &[u32]) -> Result<()> {
        let mut consumed = 0;
        let mut result = Ok(());
        for (i, row) in rows.iter_mut().enumerate() {
            if i > 0 {
                if let Err(e) = self.matcher.consume_token(drafts[i - 1]) {
                    result = Err(self.failed("draft", e));
                    break;
                }
                consumed += 1;
            }
            if let Err(e) = self.apply(row) {
                result = Err(e);
                break;
            }
        }
        if consumed > 0 {
            self.matcher.rollback(consumed).map_err(|e| self.failed("rollback", e))?;
        }
        result
    }

    /// How many of `tokens` the grammar allows in a row from here.
    pub(crate) fn allowed_prefix(&mut self, tokens: &[u32]) -> Result<usize> {
        self.matcher.validate_tokens(tokens).map_err(|e| self.failed("drafts", e))
    }

    /// Advances past an accepted token.
    pub(crate) fn accept(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| self.failed(&format!("token {token}"), e))
    }
}
