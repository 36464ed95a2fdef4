//! The text a request streams: pieces from the detokenizer go through the stop strings, and a
//! tail that might be the start of a stop string is held back until it is decided, so the
//! streamed pieces always concatenate to the final text (which never contains the stop string).

#[derive(Debug, Default)]
pub struct StopText {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text that is final, to stream now (may be empty).
    Text(String),
    /// A stop string was found: this is the last text before it.
    Stopped(String),
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        StopText { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    pub fn push(&mut self, piece: &str) -> Piece {
        let search_from = self.emitted;
        self.text.push_str(piece);
        // A stop string may straddle what was held back, never what was already emitted.
        let hit = self.stops.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| search_from + p)).min();
        if let Some(at) = hit {
            let out = self.text[self.emitted..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return Piece::Stopped(out);
        }
        let hold = self.held_suffix_len();
        let until = self.text.len() - hold;
        let out = self.text[self.emitted..until].to_string();
        self.emitted = until;
        Piece::Text(out)
    }

    /// The longest suffix of the text that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (len, _) in stop.char_indices().skip(1) {
                if len > best && self.text.len() - self.emitted >= len && self.text.ends_with(&stop[..len]) {
                    best = len;
                }
            }
        }
        best
    }

    /// At the end of generation nothing more can complete a stop string: release what is held.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            match s.push(p) {
                Piece::Text(t) => out.push(t),
                Piece::Stopped(t) => {
                    out.push(t);
                    return (out, true, s.text().to_string());
                }
            }
        }
        out.push(s.finish());
        (out, false, s.text().to_string())
    }

    #[test]
    fn stop_string_split_across_pieces_is_not_streamed() {
        let (out, stopped, text) = run(&["\n\n"], &["And God", " said\n", "\nLet"]);
        assert!(stopped);
        assert_eq!(out.concat(), "And God said");
        assert_eq!(text, "And God said");
        assert_eq!(out[1], " said", "the newline is held back until decided");
    }

    #[test]
    fn held_text_is_released_when_it_does_not_complete() {
        let (out, stopped, text) = run(&["END"], &["the E", "N", "d of it"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "the ENd of it");
        assert_eq!(text, "the ENd of it");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let (out, stopped, _) = run(&["é!", "b"], &["aé", "!xb"]);
        assert!(stopped);
        assert_eq!(out.concat(), "a");
    }
}
