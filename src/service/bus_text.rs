//! What the daemon sends on the bus, in types that cannot carry what the bus refuses.
//!
//! A D-Bus string may not contain a NUL byte, and dbus-daemon drops a connection that sends one:
//! every caller's pending call then fails and the daemon is off the bus. Model output, token
//! texts, file names in errors and config strings can all hold a NUL, so every string the
//! daemon sends goes through [`BusText`], which has no way to be built without replacing each
//! NUL with U+FFFD (as undecodable bytes already are). Rust strings are valid UTF-8, the other
//! half of what the bus demands. Apps that need the exact output ask for `return_token_ids`.
//!
//! Dictionaries (`a{sv}`: stats, `ListModels`, `Status`) are [`BusDict`]s, whose only string
//! values are `BusText`s and whose keys are names written in this crate.

use std::collections::HashMap;

use serde::{Serialize, Serializer};
use zbus::zvariant::{OwnedValue, Signature, Type, Value};

/// What a NUL becomes on the bus.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// A string the bus can carry: NUL bytes replaced by U+FFFD at construction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusText(String);

impl BusText {
    pub fn new(text: impl Into<String>) -> BusText {
        let text = text.into();
        if text.contains('\0') {
            BusText(text.replace('\0', &NUL_REPLACEMENT.to_string()))
        } else {
            BusText(text)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl From<String> for BusText {
    fn from(text: String) -> BusText {
        BusText::new(text)
    }
}

impl From<&str> for BusText {
    fn from(text: &str) -> BusText {
        BusText::new(text)
    }
}

impl std::ops::Deref for BusText {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BusText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for BusText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl Type for BusText {
    const SIGNATURE: &'static Signature = &Signature::Str;
}

impl From<BusText> for Value<'static> {
    fn from(text: BusText) -> Value<'static> {
        Value::from(text.0)
    }
}

/// An `a{sv}` the daemon sends: keys are this crate's own names, strings are `BusText`s.
#[derive(Debug, Clone, Default)]
pub struct BusDict(HashMap<String, OwnedValue>);

impl BusDict {
    pub fn new() -> BusDict {
        BusDict::default()
    }

    fn put(&mut self, key: &'static str, value: Value<'static>) {
        self.0.insert(key.to_string(), OwnedValue::try_from(value).expect("values without file descriptors convert"));
    }

    pub fn text(&mut self, key: &'static str, text: impl Into<BusText>) {
        self.put(key, Value::from(text.into()));
    }

    pub fn u32(&mut self, key: &'static str, n: u32) {
        self.put(key, Value::U32(n));
    }

    pub fn u64(&mut self, key: &'static str, n: u64) {
        self.put(key, Value::U64(n));
    }

    pub fn f64(&mut self, key: &'static str, x: f64) {
        self.put(key, Value::F64(x));
    }

    pub fn ids(&mut self, key: &'static str, ids: &[u32]) {
        self.put(key, Value::from(ids.to_vec()));
    }

    /// A `a{s(tt)}` keyed by text (model names).
    pub fn counts(&mut self, key: &'static str, counts: impl IntoIterator<Item = (BusText, (u64, u64))>) {
        let map: HashMap<String, (u64, u64)> = counts.into_iter().map(|(k, v)| (k.into_string(), v)).collect();
        self.put(key, Value::from(map));
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
}

impl Serialize for BusDict {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl Type for BusDict {
    const SIGNATURE: &'static Signature = <HashMap<String, OwnedValue> as Type>::SIGNATURE;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_nul_survives_construction() {
        for text in ["\0", "a\0b", "\0\0", "plain", ""] {
            let bus = BusText::new(text);
            assert!(!bus.contains('\0'), "{bus:?}");
            assert_eq!(bus.chars().count(), text.chars().count(), "one character for one");
        }
        assert_eq!(BusText::from("a\0b".to_string()).as_str(), "a\u{FFFD}b");
    }

    #[test]
    fn a_dict_of_text_holds_no_nul() {
        let mut d = BusDict::new();
        d.text("error", "model file x\0y: missing");
        d.counts("speculative", [(BusText::new("m\0"), (1, 2))]);
        let encoded = zbus::zvariant::to_bytes(zbus::zvariant::serialized::Context::new_dbus(zbus::zvariant::LE, 0), &d).unwrap();
        // Strings are written with their length and a terminating NUL: the only NULs left are
        // terminators and the zero bytes of lengths and padding, never inside a string's text.
        let bytes: &[u8] = &encoded;
        let text = String::from_utf8_lossy(bytes);
        assert!(text.contains("x\u{FFFD}y") && text.contains("m\u{FFFD}"), "{text:?}");
    }
}
