//! jinja2 3.1's builtins as transformers' `ImmutableSandboxedEnvironment` has them, where
//! minijinja's own differ or are missing: the filters of `jinja2.filters.FILTERS`, the tests of
//! `jinja2.tests.TESTS`, the globals `cycler`, `joiner`, `lipsum` and `namespace`, the Python
//! `str`, `list` and `dict` methods a template can call (the mutating ones refused, as the
//! immutable sandbox refuses them), and Python's `str()`/`repr()` of values in `{{ }}`.
//!
//! tests/it/jinja_parity.rs renders tests/py/jinja_builtins_cases.json with both and compares.
//!
//! Where it still differs from jinja2 (kept out of the cases): a tuple literal `('x', 1)` prints
//! as a list (minijinja parses it as one); iterators, ranges and dict views print as their
//! items, not as Python's `<list_reverseiterator ...>`, `range(0, 3)`, `dict_keys([...])`; a
//! method named without a call (`'a'.upper`) is not a value; `str.encode`, `translate` and
//! `maketrans` are missing; `batch(0)` is an error; `~` joins none/true as minijinja spells
//! them; `pprint` does not wrap at 80 columns; `lipsum` uses its own word list (only its shape is
//! jinja2's); the Unicode categories of `isdecimal`/`isprintable` are approximate outside the
//! common ranges.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use minijinja::value::{from_args, Enumerator, Kwargs, Object, ObjectRepr, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

type R<T> = std::result::Result<T, Error>;

fn err(kind: &str, message: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{kind}: {message}"))
}

fn type_error(message: impl std::fmt::Display) -> Error {
    err("TypeError", message)
}

fn value_error(message: impl std::fmt::Display) -> Error {
    err("ValueError", message)
}

/// Adds the builtins to an environment made like transformers' (trim_blocks, lstrip_blocks).
pub fn install(env: &mut Environment<'static>) {
    env.set_formatter(formatter);
    env.set_unknown_method_callback(methods);

    env.add_filter("attr", attr);
    env.add_filter("center", |s: String, width: Option<i64>| pad(&chars(&s), width.unwrap_or(80), ' ', Align::Center));
    env.add_filter("dictsort", dictsort);
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("forceescape", |v: Value| Value::from_safe_string(html_escape(&py_str(&v))));
    env.add_filter("filesizeformat", filesizeformat);
    env.add_filter("float", float);
    env.add_filter("format", percent_format_filter);
    env.add_filter("groupby", groupby);
    env.add_filter("indent", indent);
    env.add_filter("int", int);
    env.add_filter("items", items);
    env.add_filter("join", join);
    env.add_filter("max", |s: &State, v: Value, a: Option<Value>, b: Option<Value>, kw: Kwargs| min_max(s, v, a, b, kw, true));
    env.add_filter("min", |s: &State, v: Value, a: Option<Value>, b: Option<Value>, kw: Kwargs| min_max(s, v, a, b, kw, false));
    env.add_filter("pprint", |v: Value| py_repr_sorted(&v));
    env.add_filter("random", random);
    env.add_filter("replace", replace_filter);
    env.add_filter("round", round);
    env.add_filter("string", |v: Value| if v.kind() == ValueKind::String { v } else { Value::from(py_str(&v)) });
    env.add_filter("striptags", |v: Value| striptags(&py_str(&v)));
    env.add_filter("sum", sum);
    env.add_filter("title", |v: Value| title_filter(&py_str(&v)));
    env.add_filter("truncate", truncate);
    env.add_filter("urlencode", urlencode);
    env.add_filter("urlize", urlize);
    env.add_filter("wordcount", |v: Value| word_count(&py_str(&v)));
    env.add_filter("wordwrap", wordwrap);
    env.add_filter("xmlattr", xmlattr);

    env.add_test("callable", |v: Value| v.kind() == ValueKind::Plain && is_callable(&v));
    env.add_test("number", |v: Value| matches!(v.kind(), ValueKind::Number | ValueKind::Bool));
    env.add_test("lower", |v: Value| v.as_str().is_some_and(py_islower));
    env.add_test("upper", |v: Value| v.as_str().is_some_and(py_isupper));
    env.add_test("sequence", |v: Value| {
        matches!(v.kind(), ValueKind::String | ValueKind::Seq | ValueKind::Map) || v.downcast_object_ref::<Tuple>().is_some()
    });

    env.add_function("cycler", |items: Rest<Value>| Value::from_object(Cycler { items: items.0, pos: AtomicU64::new(0) }));
    env.add_function("joiner", minijinja_contrib::globals::joiner);
    env.add_function("lipsum", lipsum);
    env.add_function("namespace", namespace);
}

// ---------------------------------------------------------------------------------------------
// Python's str() and repr()

/// `{{ x }}` writes `str(x)`: strings as they are, anything else as Python's repr.
fn formatter(out: &mut minijinja::Output, state: &State, value: &Value) -> R<()> {
    match value.kind() {
        ValueKind::String | ValueKind::Undefined => minijinja::escape_formatter(out, state, value),
        _ => out.write_str(&py_str(value)).map_err(|_| Error::new(ErrorKind::WriteFailure, "write failed")),
    }
}

/// Python's `str(x)`.
pub fn py_str(value: &Value) -> String {
    match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        _ => py_repr(value),
    }
}

fn py_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, false, &mut out);
    out
}

/// pprint's one-line form: a repr with the dict keys sorted.
fn py_repr_sorted(value: &Value) -> String {
    let mut out = String::new();
    write_repr(value, true, &mut out);
    out
}

fn write_repr(value: &Value, sort: bool, out: &mut String) {
    match value.kind() {
        ValueKind::Undefined => out.push_str("Undefined"),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&py_number(value)),
        ValueKind::String => out.push_str(&py_str_repr(value.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(k, sort, out);
                out.push_str(": ");
                write_repr(&value.get_item(k).unwrap_or_default(), sort, out);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.downcast_object_ref::<Tuple>().is_some();
            let items: Vec<Value> = value.try_iter().map(|i| i.collect()).unwrap_or_default();
            out.push(if tuple { '(' } else { '[' });
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(item, sort, out);
            }
            if tuple && items.len() == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// A number as Python writes it: integers as they are, floats as `repr` does (`1.0`, `1e-05`,
/// `1e+16`, `inf`, `nan`).
pub fn py_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    py_float(f64::try_from(value.clone()).unwrap_or(f64::NAN))
}

pub fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let abs = x.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let e = format!("{x:e}");
        let (mantissa, exponent) = e.split_once('e').unwrap_or((&e, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        return format!("{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs());
    }
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// Characters Python's `str.isprintable()` refuses (and `repr` escapes): controls, separators
/// other than the space, and the common format characters.
fn py_unprintable(c: char) -> bool {
    matches!(c as u32,
        0..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064
        | 0x2066..=0x206f | 0x3000 | 0xd800..=0xf8ff | 0xfeff | 0xfff9..=0xfffb | 0xe0001 | 0xe0020..=0xe007f
        | 0xf0000..=0x10ffff)
}

fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_unprintable(c) => {
                let n = c as u32;
                let _ = if n < 0x100 {
                    write!(out, "\\x{n:02x}")
                } else if n < 0x10000 {
                    write!(out, "\\u{n:04x}")
                } else {
                    write!(out, "\\U{n:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// A Python tuple (what `dictsort`, `items`, `str.partition` give): a sequence whose repr is
/// `(a, b)`.
#[derive(Debug)]
pub struct Tuple(pub Vec<Value>);

impl Object for Tuple {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_usize()?).cloned()
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(self.0.len())
    }
}

fn tuple(items: Vec<Value>) -> Value {
    Value::from_object(Tuple(items))
}

// ---------------------------------------------------------------------------------------------
// Small helpers

fn chars(s: &str) -> Vec<char> {
    s.chars().collect()
}

fn string(c: &[char]) -> String {
    c.iter().collect()
}

fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

fn is_cased(c: char) -> bool {
    c.is_lowercase() || c.is_uppercase() || is_titlecase(c)
}

fn is_titlecase(c: char) -> bool {
    matches!(c, 'ǅ' | 'ǈ' | 'ǋ' | 'ǲ') || ('ᾈ'..='ᾏ').contains(&c) || ('ᾘ'..='ᾟ').contains(&c) || ('ᾨ'..='ᾯ').contains(&c)
}

fn to_titlecase(c: char) -> String {
    match c {
        'Ǆ' | 'ǅ' | 'ǆ' => "ǅ".into(),
        'Ǉ' | 'ǈ' | 'ǉ' => "ǈ".into(),
        'Ǌ' | 'ǋ' | 'ǌ' => "ǋ".into(),
        'Ǳ' | 'ǲ' | 'ǳ' => "ǲ".into(),
        c => c.to_uppercase().collect(),
    }
}

/// Python's `str.islower()` (`upper` false) and `str.isupper()` (true): some cased character,
/// and none of the other case or titlecase.
fn py_is_case(s: &str, upper: bool) -> bool {
    let mut cased = false;
    for c in s.chars() {
        let (this, other) = if upper { (c.is_uppercase(), c.is_lowercase()) } else { (c.is_lowercase(), c.is_uppercase()) };
        if other || is_titlecase(c) {
            return false;
        }
        cased |= this;
    }
    cased
}

fn py_islower(s: &str) -> bool {
    py_is_case(s, false)
}

fn py_isupper(s: &str) -> bool {
    py_is_case(s, true)
}

fn py_istitle(s: &str) -> bool {
    let (mut cased, mut previous_cased) = (false, false);
    for c in s.chars() {
        if c.is_uppercase() || is_titlecase(c) {
            if previous_cased {
                return false;
            }
            previous_cased = true;
            cased = true;
        } else if c.is_lowercase() {
            if !previous_cased {
                return false;
            }
            previous_cased = true;
            cased = true;
        } else {
            previous_cased = false;
        }
    }
    cased
}

/// Python's `str.title()`: a letter after a cased letter is lowered, any other titled.
fn py_title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut previous_cased = false;
    for c in s.chars() {
        if previous_cased {
            out.extend(c.to_lowercase());
        } else {
            out.push_str(&to_titlecase(c));
        }
        previous_cased = is_cased(c);
    }
    out
}

fn py_capitalize(s: &str) -> String {
    let mut it = s.chars();
    match it.next() {
        Some(first) => to_titlecase(first) + &it.as_str().to_lowercase(),
        None => String::new(),
    }
}

fn py_casefold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'ß' | 'ẞ' => out.push_str("ss"),
            'ς' => out.push('σ'),
            'ﬀ' => out.push_str("ff"),
            'ﬁ' => out.push_str("fi"),
            'ﬂ' => out.push_str("fl"),
            'ﬃ' => out.push_str("ffi"),
            'ﬄ' => out.push_str("ffl"),
            'ﬅ' | 'ﬆ' => out.push_str("st"),
            c => out.extend(c.to_lowercase()),
        }
    }
    out
}

fn py_swapcase(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_uppercase() {
            out.extend(c.to_lowercase());
        } else if c.is_lowercase() {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn is_decimal(c: char) -> bool {
    c.is_numeric() && !is_digit_only(c) && !is_numeric_only(c)
}

/// Numeric_Type=Digit: superscripts, subscripts, circled digits.
fn is_digit_only(c: char) -> bool {
    matches!(c as u32, 0xb2 | 0xb3 | 0xb9 | 0x2070 | 0x2074..=0x2079 | 0x2080..=0x2089 | 0x2460..=0x2468 | 0x2474..=0x247c
        | 0x2488..=0x2490 | 0x24ea | 0x24f5..=0x24fd | 0x24ff | 0x2776..=0x277e | 0x2780..=0x2788 | 0x278a..=0x2792)
}

/// Numeric_Type=Numeric: fractions, roman numerals, circled numbers above nine.
fn is_numeric_only(c: char) -> bool {
    matches!(c as u32, 0xbc..=0xbe | 0x2150..=0x2189 | 0x2469..=0x2473 | 0x247d..=0x2487 | 0x2491..=0x249b
        | 0x24eb..=0x24f4 | 0x24fe | 0x277f | 0x2789 | 0x2793 | 0x3007 | 0x3021..=0x3029)
}

/// Python's slice bounds for `start`/`end` arguments, as `str.find` and friends take them.
fn bounds(len: usize, start: Option<&Value>, end: Option<&Value>) -> R<(usize, usize)> {
    let index = |v: Option<&Value>, default: i64| -> R<i64> {
        match v {
            None => Ok(default),
            Some(v) if v.is_none() => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| type_error("slice indices must be integers or None")),
        }
    };
    let n = len as i64;
    let fix = |i: i64| if i < 0 { (i + n).max(0) } else { i.min(n) };
    let s = fix(index(start, 0)?);
    let e = fix(index(end, n)?);
    Ok((s as usize, e as usize))
}

fn find_chars(hay: &[char], needle: &[char], from: usize, to: usize) -> Option<usize> {
    if to < from || to - from < needle.len() {
        return None;
    }
    (from..=to - needle.len()).find(|&i| hay[i..i + needle.len()] == *needle)
}

fn rfind_chars(hay: &[char], needle: &[char], from: usize, to: usize) -> Option<usize> {
    if to < from || to - from < needle.len() {
        return None;
    }
    (from..=to - needle.len()).rev().find(|&i| hay[i..i + needle.len()] == *needle)
}

fn count_chars(hay: &[char], needle: &[char], from: usize, to: usize) -> usize {
    if to < from || to - from < needle.len() {
        return 0;
    }
    if needle.is_empty() {
        return to - from + 1;
    }
    let (mut i, mut n) = (from, 0);
    while i + needle.len() <= to {
        if hay[i..i + needle.len()] == *needle {
            n += 1;
            i += needle.len();
        } else {
            i += 1;
        }
    }
    n
}

fn py_replace(s: &str, old: &str, new: &str, count: i64) -> String {
    if count < 0 {
        if old.is_empty() {
            let mut out = String::from(new);
            for c in s.chars() {
                out.push(c);
                out.push_str(new);
            }
            return out;
        }
        return s.replace(old, new);
    }
    if old.is_empty() {
        let mut out = String::new();
        let mut left = count;
        for c in s.chars() {
            if left > 0 {
                out.push_str(new);
                left -= 1;
            }
            out.push(c);
        }
        if left > 0 {
            out.push_str(new);
        }
        return out;
    }
    s.replacen(old, new, count as usize)
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
    Center,
}

fn pad(s: &[char], width: i64, fill: char, align: Align) -> String {
    let len = s.len() as i64;
    if width <= len {
        return string(s);
    }
    let marg = width - len;
    let left = match align {
        Align::Left => 0,
        Align::Right => marg,
        Align::Center => marg / 2 + (marg & width & 1),
    };
    let mut out = String::new();
    out.extend(std::iter::repeat_n(fill, left as usize));
    out.extend(s.iter());
    out.extend(std::iter::repeat_n(fill, (marg - left) as usize));
    out
}

fn py_split(s: &str, sep: Option<&str>, maxsplit: i64) -> R<Vec<String>> {
    let max = if maxsplit < 0 { usize::MAX } else { maxsplit as usize };
    let mut out = Vec::new();
    match sep {
        Some("") => return Err(value_error("empty separator")),
        Some(sep) => {
            let mut rest = s;
            while out.len() < max {
                match rest.find(sep) {
                    Some(i) => {
                        out.push(rest[..i].to_string());
                        rest = &rest[i + sep.len()..];
                    }
                    None => break,
                }
            }
            out.push(rest.to_string());
        }
        None => {
            let mut rest = s.trim_start_matches(py_isspace);
            while !rest.is_empty() {
                if out.len() >= max {
                    out.push(rest.to_string());
                    break;
                }
                let end = rest.find(py_isspace).unwrap_or(rest.len());
                out.push(rest[..end].to_string());
                rest = rest[end..].trim_start_matches(py_isspace);
            }
        }
    }
    Ok(out)
}

/// `str.rsplit`: `split` of the string and separator read backwards, each part read back.
fn py_rsplit(s: &str, sep: Option<&str>, maxsplit: i64) -> R<Vec<String>> {
    let backwards = |t: &str| t.chars().rev().collect::<String>();
    let mut parts = py_split(&backwards(s), sep.map(backwards).as_deref(), maxsplit)?;
    parts.reverse();
    Ok(parts.iter().map(|p| backwards(p)).collect())
}

fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let c = chars(s);
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < c.len() {
        let brk = matches!(c[i], '\n' | '\r' | '\x0b' | '\x0c' | '\x1c' | '\x1d' | '\x1e' | '\u{85}' | '\u{2028}' | '\u{2029}');
        if brk {
            let mut end = i + 1;
            if c[i] == '\r' && c.get(i + 1) == Some(&'\n') {
                end += 1;
            }
            out.push(string(&c[start..if keepends { end } else { i }]));
            start = end;
            i = end;
        } else {
            i += 1;
        }
    }
    if start < c.len() {
        out.push(string(&c[start..]));
    }
    out
}

fn py_strip(s: &str, chars: Option<&str>, left: bool, right: bool) -> String {
    let set: Option<Vec<char>> = chars.map(|c| c.chars().collect());
    let strip = |c: char| match &set {
        Some(set) => set.contains(&c),
        None => py_isspace(c),
    };
    let mut s = s;
    if left {
        s = s.trim_start_matches(strip);
    }
    if right {
        s = s.trim_end_matches(strip);
    }
    s.to_string()
}

fn expandtabs(s: &str, tabsize: i64) -> String {
    let mut out = String::new();
    let mut col = 0i64;
    for c in s.chars() {
        match c {
            '\t' => {
                if tabsize > 0 {
                    let n = tabsize - col % tabsize;
                    out.extend(std::iter::repeat_n(' ', n as usize));
                    col += n;
                }
            }
            '\n' | '\r' => {
                out.push(c);
                col = 0;
            }
            c => {
                out.push(c);
                col += 1;
            }
        }
    }
    out
}

fn strs(v: Vec<String>) -> Value {
    Value::from(v)
}

/// The positional arguments and the keyword arguments of a call, looked up Python's way.
struct Args {
    pos: Vec<Value>,
    kw: Option<Kwargs>,
}

impl Args {
    fn new(args: &[Value]) -> R<Args> {
        let mut pos = args.to_vec();
        let kw = match pos.last() {
            Some(last) if last.is_kwargs() => {
                let last = pos.pop().unwrap();
                let (kw,): (Kwargs,) = from_args(&[last])?;
                Some(kw)
            }
            _ => None,
        };
        Ok(Args { pos, kw })
    }

    fn get(&self, i: usize, name: &str) -> R<Option<Value>> {
        if let Some(v) = self.pos.get(i) {
            return Ok(Some(v.clone()));
        }
        match &self.kw {
            Some(kw) => Ok(kw.get::<Option<Value>>(name)?),
            None => Ok(None),
        }
    }

    fn str(&self, i: usize, name: &str) -> R<Option<String>> {
        match self.get(i, name)? {
            None => Ok(None),
            Some(v) if v.is_none() => Ok(None),
            Some(v) => match v.as_str() {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(type_error(format!("must be str, not {}", py_type(&v)))),
            },
        }
    }

    fn req_str(&self, i: usize, name: &str) -> R<String> {
        self.str(i, name)?.ok_or_else(|| type_error(format!("missing required argument '{name}'")))
    }

    fn int(&self, i: usize, name: &str, default: i64) -> R<i64> {
        match self.get(i, name)? {
            None => Ok(default),
            Some(v) if v.kind() == ValueKind::Number && v.is_integer() => Ok(v.as_i64().unwrap_or(default)),
            Some(v) if v.kind() == ValueKind::Bool => Ok(v.is_true() as i64),
            Some(v) => Err(type_error(format!("'{}' object cannot be interpreted as an integer", py_type(&v)))),
        }
    }

    fn at_most(&self, n: usize) -> R<()> {
        if self.pos.len() > n {
            return Err(type_error(format!("takes at most {n} arguments ({} given)", self.pos.len())));
        }
        Ok(())
    }
}

fn py_type(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if v.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq if v.downcast_object_ref::<Tuple>().is_some() => "tuple",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

// ---------------------------------------------------------------------------------------------
// Methods

/// What the immutable sandbox refuses: the methods that change a list or a dict.
fn unsafe_method(value: &Value, method: &str) -> bool {
    match value.kind() {
        ValueKind::Seq => {
            matches!(method, "append" | "clear" | "extend" | "insert" | "pop" | "remove" | "reverse" | "sort")
        }
        ValueKind::Map => matches!(method, "clear" | "pop" | "popitem" | "setdefault" | "update"),
        _ => false,
    }
}

fn methods(state: &State, value: &Value, method: &str, args: &[Value]) -> R<Value> {
    if unsafe_method(value, method) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("access to attribute '{method}' of '{}' object is unsafe.", py_type(value)),
        ));
    }
    let result = match value.kind() {
        ValueKind::String => str_method(value.as_str().unwrap_or_default(), method, args)?,
        ValueKind::Seq => seq_method(value, method, args)?,
        ValueKind::Map => map_method(value, method, args)?,
        _ => None,
    };
    match result {
        Some(v) => Ok(v),
        None => minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args),
    }
}

fn str_method(s: &str, method: &str, args: &[Value]) -> R<Option<Value>> {
    let a = Args::new(args)?;
    if let Some(v) = str_test_or_case(s, method) {
        return Ok(Some(v));
    }
    if let Some(v) = str_layout_method(s, method, &a)? {
        return Ok(Some(v));
    }
    str_search_method(s, method, &a)
}

/// The `str` methods that take no argument: the `is*` tests and the case changes.
fn str_test_or_case(s: &str, method: &str) -> Option<Value> {
    let v = match method {
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "casefold" => Value::from(py_casefold(s)),
        "swapcase" => Value::from(py_swapcase(s)),
        "title" => Value::from(py_title(s)),
        "capitalize" => Value::from(py_capitalize(s)),
        "islower" => Value::from(py_islower(s)),
        "isupper" => Value::from(py_isupper(s)),
        "istitle" => Value::from(py_istitle(s)),
        "isspace" => Value::from(!s.is_empty() && s.chars().all(py_isspace)),
        "isdecimal" => Value::from(!s.is_empty() && s.chars().all(is_decimal)),
        "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| is_decimal(c) || is_digit_only(c))),
        "isnumeric" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_numeric())),
        "isalpha" => Value::from(!s.is_empty() && s.chars().all(char::is_alphabetic)),
        "isalnum" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_alphabetic() || c.is_numeric())),
        "isascii" => Value::from(s.is_ascii()),
        "isprintable" => Value::from(!s.chars().any(|c| py_unprintable(c) && c != ' ')),
        "isidentifier" => {
            let mut it = s.chars();
            Value::from(it.next().is_some_and(|c| c == '_' || c.is_alphabetic()) && it.all(|c| c == '_' || c.is_alphanumeric()))
        }
        _ => return None,
    };
    Some(v)
}

/// The `str` methods that cut, split or pad a string.
fn str_layout_method(s: &str, method: &str, a: &Args) -> R<Option<Value>> {
    let none = |n: usize| a.at_most(n);
    let v = match method {
        "strip" | "lstrip" | "rstrip" => {
            none(1)?;
            let chars = a.str(0, "chars")?;
            Value::from(py_strip(s, chars.as_deref(), method != "rstrip", method != "lstrip"))
        }
        "split" | "rsplit" => {
            none(2)?;
            let sep = a.str(0, "sep")?;
            let max = a.int(1, "maxsplit", -1)?;
            strs(if method == "split" { py_split(s, sep.as_deref(), max)? } else { py_rsplit(s, sep.as_deref(), max)? })
        }
        "splitlines" => {
            let keep = a.get(0, "keepends")?.is_some_and(|v| v.is_true());
            strs(py_splitlines(s, keep))
        }
        "partition" | "rpartition" => {
            let sep = a.req_str(0, "sep")?;
            if sep.is_empty() {
                return Err(value_error("empty separator"));
            }
            let found = if method == "partition" { s.find(&sep) } else { s.rfind(&sep) };
            let parts = match found {
                Some(i) => [&s[..i], sep.as_str(), &s[i + sep.len()..]],
                None if method == "partition" => [s, "", ""],
                None => ["", "", s],
            };
            tuple(parts.iter().map(|p| Value::from(*p)).collect())
        }
        "center" | "ljust" | "rjust" => {
            let width = a.int(0, "width", i64::MIN)?;
            if width == i64::MIN {
                return Err(type_error(format!("{method}() takes at least 1 argument (0 given)")));
            }
            let fill = a.str(1, "fillchar")?.unwrap_or_else(|| " ".into());
            let mut fc = fill.chars();
            let (Some(fill), None) = (fc.next(), fc.next()) else {
                return Err(type_error("The fill character must be exactly one character long"));
            };
            let align = match method {
                "center" => Align::Center,
                "ljust" => Align::Left,
                _ => Align::Right,
            };
            Value::from(pad(&chars(s), width, fill, align))
        }
        "zfill" => {
            let width = a.int(0, "width", 0)?;
            let c = chars(s);
            if width <= c.len() as i64 {
                Value::from(s)
            } else {
                let zeros = "0".repeat(width as usize - c.len());
                match c.first() {
                    Some(&sign @ ('+' | '-')) => Value::from(format!("{sign}{zeros}{}", string(&c[1..]))),
                    _ => Value::from(format!("{zeros}{s}")),
                }
            }
        }
        "expandtabs" => Value::from(expandtabs(s, a.int(0, "tabsize", 8)?)),
        _ => return Ok(None),
    };
    Ok(Some(v))
}

/// The `str` methods that search a string, replace in it, join with it or format it.
fn str_search_method(s: &str, method: &str, a: &Args) -> R<Option<Value>> {
    let v = match method {
        "count" | "find" | "rfind" | "index" | "rindex" => {
            let sub = chars(&a.req_str(0, "sub")?);
            let c = chars(s);
            let (from, to) = bounds(c.len(), a.pos.get(1), a.pos.get(2))?;
            if method == "count" {
                // An empty needle counts the places between characters, even past the end.
                let (from, to) = if sub.is_empty() && from > c.len() { (1, 0) } else { (from, to) };
                Value::from(count_chars(&c, &sub, from, to))
            } else {
                let hit = if method.contains("rfind") || method == "rindex" {
                    rfind_chars(&c, &sub, from, to)
                } else {
                    find_chars(&c, &sub, from, to)
                };
                match hit {
                    Some(i) => Value::from(i),
                    None if method.ends_with("index") => return Err(value_error("substring not found")),
                    None => Value::from(-1),
                }
            }
        }
        "replace" => {
            let old = a.req_str(0, "old")?;
            let new = a.req_str(1, "new")?;
            let count = a.int(2, "count", -1)?;
            Value::from(py_replace(s, &old, &new, count))
        }
        "removeprefix" => {
            let p = a.req_str(0, "prefix")?;
            Value::from(s.strip_prefix(p.as_str()).unwrap_or(s))
        }
        "removesuffix" => {
            let p = a.req_str(0, "suffix")?;
            Value::from(s.strip_suffix(p.as_str()).unwrap_or(s))
        }
        "startswith" | "endswith" => Value::from(affix_test(s, method, a)?),
        "join" => {
            let items = a.get(0, "iterable")?.ok_or_else(|| type_error("join() takes exactly one argument (0 given)"))?;
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                let Some(item) = item.as_str() else {
                    return Err(type_error(format!("sequence item {i}: expected str instance, {} found", py_type(&item))));
                };
                if i > 0 {
                    out.push_str(s);
                }
                out.push_str(item);
            }
            Value::from(out)
        }
        "format" => Value::from(str_format(s, a)?),
        _ => return Ok(None),
    };
    Ok(Some(v))
}

/// `str.startswith` or `str.endswith` (`method`): a prefix, or a tuple of them, within the
/// optional start and end.
fn affix_test(s: &str, method: &str, a: &Args) -> R<bool> {
    let what = a.get(0, "prefix")?.ok_or_else(|| type_error(format!("{method}() takes at least 1 argument")))?;
    let c = chars(s);
    let (from, to) = bounds(c.len(), a.pos.get(1), a.pos.get(2))?;
    let part = if from <= to { string(&c[from..to]) } else { String::new() };
    let test = |p: &Value| -> R<bool> {
        let p = p.as_str().ok_or_else(|| type_error(format!("{method} first arg must be str or a tuple of str, not {}", py_type(p))))?;
        if from > c.len() {
            return Ok(false);
        }
        Ok(if method == "startswith" { part.starts_with(p) } else { part.ends_with(p) })
    };
    let hit = if what.kind() == ValueKind::String {
        test(&what)?
    } else if what.kind() == ValueKind::Seq {
        let mut hit = false;
        for p in what.try_iter()? {
            hit |= test(&p)?;
        }
        hit
    } else {
        return Err(type_error(format!("{method} first arg must be str or a tuple of str, not {}", py_type(&what))));
    };
    Ok(hit)
}

fn seq_method(value: &Value, method: &str, args: &[Value]) -> R<Option<Value>> {
    let a = Args::new(args)?;
    let items: Vec<Value> = value.try_iter()?.collect();
    let v = match method {
        "count" => {
            let x = a.get(0, "value")?.unwrap_or_default();
            Value::from(items.iter().filter(|i| **i == x).count())
        }
        "index" => {
            let x = a.get(0, "value")?.unwrap_or_default();
            let (from, to) = bounds(items.len(), a.pos.get(1), a.pos.get(2))?;
            match (from..to).find(|&i| items[i] == x) {
                Some(i) => Value::from(i),
                None => return Err(value_error(format!("{} is not in list", py_repr(&x)))),
            }
        }
        "copy" => Value::from(items),
        _ => return Ok(None),
    };
    Ok(Some(v))
}

fn map_method(value: &Value, method: &str, args: &[Value]) -> R<Option<Value>> {
    let a = Args::new(args)?;
    let v = match method {
        "copy" => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            Value::from_iter(keys.into_iter().map(|k| (k.clone(), value.get_item(&k).unwrap_or_default())))
        }
        "items" => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            let pairs: Vec<Value> = keys.into_iter().map(|k| tuple(vec![k.clone(), value.get_item(&k).unwrap_or_default()])).collect();
            Value::from(pairs)
        }
        "get" => {
            let key = a.get(0, "key")?.unwrap_or_default();
            let found = value.get_item(&key).ok().filter(|v| !v.is_undefined());
            found.unwrap_or_else(|| a.pos.get(1).cloned().unwrap_or(Value::from(())))
        }
        _ => return Ok(None),
    };
    Ok(Some(v))
}

// ---------------------------------------------------------------------------------------------
// str.format and %-formatting

#[derive(Default)]
struct Spec {
    fill: Option<char>,
    align: Option<char>,
    sign: Option<char>,
    alternate: bool,
    zero: bool,
    width: usize,
    grouping: Option<char>,
    precision: Option<usize>,
    ty: Option<char>,
}

fn parse_spec(spec: &str) -> R<Spec> {
    let c = chars(spec);
    let mut s = Spec::default();
    let mut i = 0;
    let is_align = |c: char| matches!(c, '<' | '>' | '^' | '=');
    if c.len() >= 2 && is_align(c[1]) {
        s.fill = Some(c[0]);
        s.align = Some(c[1]);
        i = 2;
    } else if !c.is_empty() && is_align(c[0]) {
        s.align = Some(c[0]);
        i = 1;
    }
    if i < c.len() && matches!(c[i], '+' | '-' | ' ') {
        s.sign = Some(c[i]);
        i += 1;
    }
    if i < c.len() && c[i] == '#' {
        s.alternate = true;
        i += 1;
    }
    if i < c.len() && c[i] == '0' {
        s.zero = true;
        i += 1;
    }
    let start = i;
    while i < c.len() && c[i].is_ascii_digit() {
        i += 1;
    }
    s.width = string(&c[start..i]).parse().unwrap_or(0);
    if i < c.len() && matches!(c[i], ',' | '_') {
        s.grouping = Some(c[i]);
        i += 1;
    }
    if i < c.len() && c[i] == '.' {
        i += 1;
        let start = i;
        while i < c.len() && c[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(value_error("Format specifier missing precision"));
        }
        s.precision = string(&c[start..i]).parse().ok();
    }
    if i < c.len() {
        s.ty = Some(c[i]);
        i += 1;
    }
    if i != c.len() {
        return Err(value_error("Invalid format specifier"));
    }
    Ok(s)
}

fn group(digits: &str, sep: char) -> String {
    let (int, frac) = match digits.find('.') {
        Some(i) => (&digits[..i], &digits[i..]),
        None => (digits, ""),
    };
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(sep);
        }
        out.push(c);
    }
    out + frac
}

fn exp_format(x: f64, precision: usize, upper: bool) -> String {
    let e = format!("{:.*e}", precision, x);
    let (m, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let s = format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    if upper {
        s.to_uppercase()
    } else {
        s
    }
}

fn general_format(x: f64, precision: usize, alternate: bool, upper: bool) -> String {
    let p = precision.max(1);
    if x == 0.0 {
        return if alternate { format!("{:.*}", p - 1, 0.0) } else { "0".into() };
    }
    let e = format!("{:.*e}", p - 1, x);
    let exp: i32 = e.split_once('e').map(|(_, e)| e.parse().unwrap_or(0)).unwrap_or(0);
    let mut s =
        if -4 <= exp && exp < p as i32 { format!("{:.*}", (p as i32 - 1 - exp).max(0) as usize, x) } else { exp_format(x, p - 1, upper) };
    if !alternate {
        if let Some(epos) = s.find(['e', 'E']) {
            let (m, e) = s.split_at(epos);
            let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
            s = format!("{m}{e}");
        } else if s.contains('.') {
            s = s.trim_end_matches('0').trim_end_matches('.').to_string();
        }
    }
    s
}

/// Formats `value` with a Python format spec (`format(value, spec)`).
fn format_value(value: &Value, spec: &Spec) -> R<String> {
    let numeric = matches!(value.kind(), ValueKind::Number | ValueKind::Bool);
    let ty = spec.ty;
    let (body, negative) = match ty {
        None | Some('s') if !numeric || ty == Some('s') => (string_body(value, spec)?, false),
        Some('d' | 'x' | 'X' | 'o' | 'b' | 'c') => integer_body(value, spec, numeric)?,
        _ => number_body(value, spec, numeric)?,
    };
    let sign = if negative {
        "-"
    } else if numeric {
        match spec.sign {
            Some('+') => "+",
            Some(' ') => " ",
            _ => "",
        }
    } else {
        ""
    };
    Ok(pad_formatted(sign, &body, spec, numeric))
}

/// A value formatted as a string (`s`, or no type for a non-number), cut to the precision.
fn string_body(value: &Value, spec: &Spec) -> R<String> {
    if spec.ty == Some('s') && value.kind() != ValueKind::String {
        return Err(value_error(format!("Unknown format code 's' for object of type '{}'", py_type(value))));
    }
    let mut body = py_str(value);
    if let Some(p) = spec.precision {
        body = body.chars().take(p).collect();
    }
    Ok(body)
}

/// An integer's digits without a sign, in the spec's base (`d`, `x`, `X`, `o`, `b`) or as a
/// character (`c`), and whether it is negative.
fn integer_body(value: &Value, spec: &Spec, numeric: bool) -> R<(String, bool)> {
    let ty = spec.ty;
    if !numeric || !(value.is_integer() || value.kind() == ValueKind::Bool) {
        return Err(value_error(format!("Unknown format code '{}' for object of type '{}'", ty.unwrap(), py_type(value))));
    }
    let n = if value.kind() == ValueKind::Bool { value.is_true() as i128 } else { i128::try_from(value.clone())? };
    let m = n.unsigned_abs();
    let mut body = match ty {
        Some('x') => format!("{}{m:x}", if spec.alternate { "0x" } else { "" }),
        Some('X') => format!("{}{m:X}", if spec.alternate { "0X" } else { "" }),
        Some('o') => format!("{}{m:o}", if spec.alternate { "0o" } else { "" }),
        Some('b') => format!("{}{m:b}", if spec.alternate { "0b" } else { "" }),
        Some('c') => char::from_u32(n as u32).map(String::from).unwrap_or_default(),
        _ => m.to_string(),
    };
    if let Some(g) = spec.grouping {
        body = group(&body, g);
    }
    Ok((body, n < 0))
}

/// A number's digits without a sign, as a float type asks (`f`, `e`, `g`, `%`, or none), and
/// whether it is negative.
fn number_body(value: &Value, spec: &Spec, numeric: bool) -> R<(String, bool)> {
    let ty = spec.ty;
    if !numeric {
        return Err(value_error(format!("Unknown format code '{}' for object of type '{}'", ty.unwrap_or('?'), py_type(value))));
    }
    let x = f64::try_from(value.clone()).unwrap_or(0.0);
    let mut negative = x.is_sign_negative() && x != 0.0 || (x == 0.0 && x.is_sign_negative());
    let a = x.abs();
    let mut body = match ty {
        None if value.is_integer() || value.kind() == ValueKind::Bool => {
            let n = if value.kind() == ValueKind::Bool { value.is_true() as i128 } else { i128::try_from(value.clone())? };
            negative = n < 0;
            n.unsigned_abs().to_string()
        }
        None => match spec.precision {
            Some(p) => general_format(a, p, spec.alternate, false),
            None => py_float(a),
        },
        Some('f' | 'F') => format!("{:.*}", spec.precision.unwrap_or(6), a),
        Some('e' | 'E') => exp_format(a, spec.precision.unwrap_or(6), ty == Some('E')),
        Some('g' | 'G' | 'n') => general_format(a, spec.precision.unwrap_or(6), spec.alternate, ty == Some('G')),
        Some('%') => format!("{:.*}%", spec.precision.unwrap_or(6), a * 100.0),
        Some(t) => return Err(value_error(format!("Unknown format code '{t}' for object of type '{}'", py_type(value)))),
    };
    if let Some(g) = spec.grouping {
        body = group(&body, g);
    }
    Ok((body, negative))
}

/// `sign` and `body` padded to the spec's width with its fill and alignment.
fn pad_formatted(sign: &str, body: &str, spec: &Spec, numeric: bool) -> String {
    let len = sign.chars().count() + body.chars().count();
    let fill = spec.fill.unwrap_or(if spec.zero && spec.align.is_none() { '0' } else { ' ' });
    let align = spec.align.unwrap_or(if spec.zero && numeric {
        '='
    } else if numeric {
        '>'
    } else {
        '<'
    });
    if spec.width <= len {
        return format!("{sign}{body}");
    }
    let marg = spec.width - len;
    let padding = |n: usize| std::iter::repeat_n(fill, n).collect::<String>();
    match align {
        '<' => format!("{sign}{body}{}", padding(marg)),
        '>' => format!("{}{sign}{body}", padding(marg)),
        '^' => format!("{}{sign}{body}{}", padding(marg / 2), padding(marg - marg / 2)),
        _ => format!("{sign}{}{body}", padding(marg)),
    }
}

/// Python's `str.format`.
fn str_format(s: &str, a: &Args) -> R<String> {
    let c = chars(s);
    let mut out = String::new();
    let mut auto = 0usize;
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '{' if c.get(i + 1) == Some(&'{') => {
                out.push('{');
                i += 2;
            }
            '}' if c.get(i + 1) == Some(&'}') => {
                out.push('}');
                i += 2;
            }
            '}' => return Err(value_error("Single '}' encountered in format string")),
            '{' => {
                let j = closing_brace(&c, i)?;
                let field = string(&c[i + 1..j]);
                i = j + 1;
                out.push_str(&replacement_field(field, a, &mut auto)?);
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    Ok(out)
}

/// The index of the `}` that closes the `{` at `open` (nested fields included).
fn closing_brace(c: &[char], open: usize) -> R<usize> {
    let mut depth = 1;
    let mut j = open + 1;
    while j < c.len() {
        match c[j] {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            _ => {}
        }
        j += 1;
    }
    if j >= c.len() {
        return Err(value_error("expected '}' before end of string"));
    }
    Ok(j)
}

/// A replacement field of `str.format` (`name.attr[key]!conversion:spec`, without its braces)
/// formatted; `auto` is the next automatic positional index.
fn replacement_field(field: String, a: &Args, auto: &mut usize) -> R<String> {
    let (field, spec) = match field.find(':') {
        Some(k) => (field[..k].to_string(), field[k + 1..].to_string()),
        None => (field, String::new()),
    };
    let (field, conversion) = match field.find('!') {
        Some(k) => (field[..k].to_string(), Some(field[k + 1..].to_string())),
        None => (field, None),
    };
    let value = field_value(&field, a, auto)?;
    let value = match conversion.as_deref() {
        None => value,
        Some("s") => Value::from(py_str(&value)),
        Some("r") | Some("a") => Value::from(py_repr(&value)),
        Some(other) => return Err(value_error(format!("Unknown conversion specifier {other}"))),
    };
    // A spec may hold nested fields (`{:{width}}`).
    let spec = if spec.contains('{') { str_format(&spec, a)? } else { spec };
    format_value(&value, &parse_spec(&spec)?)
}

/// The value a field name picks: an argument (automatic, by index or by keyword), then its
/// attributes (`.name`) and items (`[key]`).
fn field_value(field: &str, a: &Args, auto: &mut usize) -> R<Value> {
    let name_end = field.find(['.', '[']).unwrap_or(field.len());
    let (name, mut rest) = field.split_at(name_end);
    let mut value = if name.is_empty() {
        let v = a
            .pos
            .get(*auto)
            .cloned()
            .ok_or_else(|| err("IndexError", format!("Replacement index {auto} out of range for positional args tuple")))?;
        *auto += 1;
        v
    } else if let Ok(n) = name.parse::<usize>() {
        a.pos.get(n).cloned().ok_or_else(|| err("IndexError", format!("Replacement index {n} out of range for positional args tuple")))?
    } else {
        match &a.kw {
            Some(kw) if kw.has(name) => kw.get::<Value>(name)?,
            _ => return Err(err("KeyError", py_str_repr(name))),
        }
    };
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            value = value.get_attr(&r[..end])?;
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| value_error("Missing ']' in format string"))?;
            let key = &r[..end];
            value = match key.parse::<i64>() {
                Ok(n) => value.get_item(&Value::from(n))?,
                Err(_) => value.get_item(&Value::from(key))?,
            };
            rest = &r[end + 1..];
        } else {
            return Err(value_error("Only '.' or '[' may follow ']' in format field specifier"));
        }
    }
    if value.is_undefined() {
        return Err(err("KeyError", py_str_repr(field)));
    }
    Ok(value)
}

/// Python's `%` formatting (jinja2's `format` filter: `value % args`, or `% kwargs`).
fn percent_format(s: &str, args: &[Value], kwargs: Option<&Value>) -> R<String> {
    let c = chars(s);
    let mut out = String::new();
    let mut next = 0usize;
    let mut i = 0;
    let take = |next: &mut usize| -> R<Value> {
        let v = args.get(*next).cloned().ok_or_else(|| type_error("not enough arguments for format string"))?;
        *next += 1;
        Ok(v)
    };
    while i < c.len() {
        if c[i] != '%' {
            out.push(c[i]);
            i += 1;
            continue;
        }
        i += 1;
        let mut key = None;
        if c.get(i) == Some(&'(') {
            let end = (i..c.len()).find(|&j| c[j] == ')').ok_or_else(|| value_error("incomplete format key"))?;
            key = Some(string(&c[i + 1..end]));
            i = end + 1;
        }
        let mut spec = percent_flags(&c, &mut i);
        if c.get(i) == Some(&'*') {
            spec.width = take(&mut next)?.as_usize().unwrap_or(0);
            i += 1;
        } else {
            spec.width = digits(&c, &mut i).parse().unwrap_or(0);
        }
        if c.get(i) == Some(&'.') {
            i += 1;
            spec.precision = Some(digits(&c, &mut i).parse().unwrap_or(0));
        }
        let Some(&ty) = c.get(i) else {
            return Err(value_error("incomplete format"));
        };
        i += 1;
        if ty == '%' {
            out.push('%');
            continue;
        }
        let value = match &key {
            Some(k) => kwargs
                .map(|m| m.get_item(&Value::from(k.as_str())))
                .transpose()?
                .filter(|v| !v.is_undefined())
                .ok_or_else(|| err("KeyError", py_str_repr(k)))?,
            None => take(&mut next)?,
        };
        out.push_str(&percent_conversion(ty, &value, spec)?);
    }
    if kwargs.is_none() && next < args.len() {
        return Err(type_error("not all arguments converted during string formatting"));
    }
    Ok(out)
}

/// The flags of a `%` conversion (`-`, `+`, space, `#`, `0`) from `c[*i]` on, as a spec.
fn percent_flags(c: &[char], i: &mut usize) -> Spec {
    let mut spec = Spec::default();
    while *i < c.len() && matches!(c[*i], '-' | '+' | ' ' | '#' | '0') {
        match c[*i] {
            '-' => spec.align = Some('<'),
            '+' => spec.sign = Some('+'),
            ' ' => {
                if spec.sign.is_none() {
                    spec.sign = Some(' ')
                }
            }
            '#' => spec.alternate = true,
            _ => spec.zero = true,
        }
        *i += 1;
    }
    spec
}

/// The ASCII digits from `c[*i]` on (maybe none), `*i` moved past them.
fn digits(c: &[char], i: &mut usize) -> String {
    let start = *i;
    while *i < c.len() && c[*i].is_ascii_digit() {
        *i += 1;
    }
    string(&c[start..*i])
}

/// `value` formatted by the `%` conversion `ty` with the flags, width and precision of `spec`.
fn percent_conversion(ty: char, value: &Value, mut spec: Spec) -> R<String> {
    if spec.align == Some('<') {
        spec.zero = false;
    }
    let numeric = matches!(value.kind(), ValueKind::Number | ValueKind::Bool);
    Ok(match ty {
        's' | 'r' | 'a' => {
            let text = if ty == 's' { py_str(value) } else { py_repr(value) };
            spec.zero = false;
            spec.ty = None;
            spec.align = Some(spec.align.unwrap_or('>'));
            format_value(&Value::from(text), &spec)?
        }
        'd' | 'i' | 'u' => {
            if !numeric {
                return Err(type_error(format!("%{ty} format: a real number is required, not {}", py_type(value))));
            }
            let n = f64::try_from(value.clone()).unwrap_or(0.0).trunc();
            let v = if value.is_integer() { value.clone() } else { Value::from(n as i64) };
            spec.ty = Some('d');
            spec.precision = None;
            format_value(&v, &spec)?
        }
        'x' | 'X' | 'o' => {
            if !value.is_integer() {
                return Err(type_error(format!("%{ty} format: an integer is required, not {}", py_type(value))));
            }
            spec.ty = Some(ty);
            spec.precision = None;
            format_value(value, &spec)?
        }
        'f' | 'F' | 'e' | 'E' | 'g' | 'G' => {
            if !numeric {
                return Err(type_error(format!("must be real number, not {}", py_type(value))));
            }
            spec.ty = Some(ty);
            let x = Value::from(f64::try_from(value.clone()).unwrap_or(0.0));
            format_value(&x, &spec)?
        }
        'c' => py_str(value),
        other => return Err(value_error(format!("unsupported format character '{other}'"))),
    })
}

// ---------------------------------------------------------------------------------------------
// Filters

fn attr(value: Value, name: String) -> R<Value> {
    // jinja2's `attr` is getattr(): a dict's keys are not its attributes.
    let namespace = value.as_object().is_some_and(|o| o.type_name().ends_with("Namespace"));
    if value.kind() == ValueKind::Map && !namespace {
        return Ok(Value::UNDEFINED);
    }
    value.get_attr(&name)
}

fn sort_key(v: &Value, case_sensitive: bool) -> Value {
    match v.as_str() {
        Some(s) if !case_sensitive => Value::from(s.to_lowercase()),
        _ => v.clone(),
    }
}

fn dictsort(value: Value, case_sensitive: Option<bool>, by: Option<String>, reverse: Option<bool>, kw: Kwargs) -> R<Value> {
    let case_sensitive = match kw.get::<Option<bool>>("case_sensitive")? {
        Some(c) => c,
        None => case_sensitive.unwrap_or(false),
    };
    let by = kw.get::<Option<String>>("by")?.or(by).unwrap_or_else(|| "key".into());
    let reverse = kw.get::<Option<bool>>("reverse")?.or(reverse).unwrap_or(false);
    kw.assert_all_used()?;
    let pos = match by.as_str() {
        "key" => 0,
        "value" => 1,
        _ => return Err(err("FilterArgumentError", "You can only sort by either \"key\" or \"value\"")),
    };
    if value.kind() != ValueKind::Map {
        return Err(err("AttributeError", format!("'{}' object has no attribute 'items'", py_type(&value))));
    }
    let keys: Vec<Value> = value.try_iter()?.collect();
    let mut pairs: Vec<[Value; 2]> = keys.into_iter().map(|k| [k.clone(), value.get_item(&k).unwrap_or_default()]).collect();
    pairs.sort_by(|a, b| sort_key(&a[pos], case_sensitive).cmp(&sort_key(&b[pos], case_sensitive)));
    if reverse {
        pairs.reverse();
    }
    Ok(Value::from(pairs.into_iter().map(|p| tuple(p.to_vec())).collect::<Vec<_>>()))
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn escape(v: Value) -> Value {
    if v.is_safe() {
        return v;
    }
    Value::from_safe_string(html_escape(&py_str(&v)))
}

fn filesizeformat(value: Value, binary: Option<bool>, kw: Kwargs) -> R<String> {
    let binary = kw.get::<Option<bool>>("binary")?.or(binary);
    kw.assert_all_used()?;
    let bytes = f64::try_from(value.clone()).map_err(|_| value_error(format!("could not convert {} to float", py_type(&value))))?;
    let binary = binary.unwrap_or(false);
    let base: f64 = if binary { 1024.0 } else { 1000.0 };
    let prefixes =
        if binary { ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"] } else { ["kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"] };
    if bytes == 1.0 {
        return Ok("1 Byte".into());
    }
    if bytes < base {
        let n = if value.is_integer() { value.to_string() } else { format!("{}", bytes as i64) };
        return Ok(format!("{n} Bytes"));
    }
    let mut unit = base;
    for (i, prefix) in prefixes.iter().enumerate() {
        unit = base.powi(i as i32 + 2);
        if bytes < unit {
            return Ok(format!("{:.1} {prefix}", base * bytes / unit));
        }
    }
    Ok(format!("{:.1} {}", base * bytes / unit, prefixes[7]))
}

/// Python's `float(str)`.
fn parse_py_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(py_isspace);
    let lower = t.to_ascii_lowercase();
    let body = lower.trim_start_matches(['+', '-']);
    if matches!(body, "inf" | "infinity" | "nan") {
        return lower.parse::<f64>().ok().or(Some(if lower.starts_with('-') {
            f64::NEG_INFINITY
        } else if body == "nan" {
            f64::NAN
        } else {
            f64::INFINITY
        }));
    }
    if t.is_empty() || t.contains("__") || t.starts_with('_') || t.ends_with('_') || t.contains("_.") || t.contains("._") {
        return None;
    }
    let cleaned: String = t.chars().filter(|&c| c != '_').collect();
    if !cleaned.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) {
        return None;
    }
    cleaned.parse::<f64>().ok()
}

fn float(value: Value, default: Option<Value>) -> Value {
    let default = default.unwrap_or(Value::from(0.0));
    match value.kind() {
        ValueKind::Number => Value::from(f64::try_from(value).unwrap_or(0.0)),
        ValueKind::Bool => Value::from(value.is_true() as i64 as f64),
        ValueKind::String => parse_py_float(value.as_str().unwrap_or_default()).map(Value::from).unwrap_or(default),
        _ => default,
    }
}

/// Python's `int(str, base)`.
fn parse_py_int(s: &str, base: u32) -> Option<i128> {
    let t = s.trim_matches(py_isspace);
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let lower = t.to_ascii_lowercase();
    let (base, digits) = match (base, lower.get(..2)) {
        (0 | 16, Some("0x")) => (16, &lower[2..]),
        (0 | 8, Some("0o")) => (8, &lower[2..]),
        (0 | 2, Some("0b")) => (2, &lower[2..]),
        (0, _) => {
            if lower.len() > 1 && lower.starts_with('0') && !lower.trim_start_matches(['0', '_']).is_empty() {
                return None;
            }
            (10, lower.as_str())
        }
        (b, _) => (b, lower.as_str()),
    };
    let digits = digits.strip_prefix('_').filter(|_| lower.len() > digits.len()).unwrap_or(digits);
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let cleaned: String = digits.chars().filter(|&c| c != '_').collect();
    let n = i128::from_str_radix(&cleaned, base).ok()?;
    Some(if neg { -n } else { n })
}

fn int(value: Value, default: Option<Value>, base: Option<Value>, kw: Kwargs) -> R<Value> {
    let default = kw.get::<Option<Value>>("default")?.or(default).unwrap_or(Value::from(0));
    let base = kw.get::<Option<Value>>("base")?.or(base).and_then(|b| b.as_i64()).unwrap_or(10);
    kw.assert_all_used()?;
    Ok(match value.kind() {
        ValueKind::Number if value.is_integer() => value,
        ValueKind::Number => {
            let x = f64::try_from(value).unwrap_or(0.0);
            if x.is_finite() {
                Value::from(x.trunc() as i64)
            } else {
                default
            }
        }
        ValueKind::Bool => Value::from(value.is_true() as i64),
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            match parse_py_int(s, base as u32) {
                Some(n) => Value::from(n),
                None => match parse_py_float(s) {
                    Some(x) if x.is_finite() => Value::from(x.trunc() as i64),
                    _ => default,
                },
            }
        }
        _ => default,
    })
}

fn items(value: Value) -> R<Value> {
    match value.kind() {
        ValueKind::Undefined => Ok(Value::from(Vec::<Value>::new())),
        ValueKind::Map => {
            let keys: Vec<Value> = value.try_iter()?.collect();
            Ok(Value::from(keys.into_iter().map(|k| tuple(vec![k.clone(), value.get_item(&k).unwrap_or_default()])).collect::<Vec<_>>()))
        }
        _ => Err(type_error("Can only get item pairs from a mapping.")),
    }
}

fn lookup(value: &Value, attribute: &str) -> R<Value> {
    let mut v = value.clone();
    for part in attribute.split('.') {
        v = match part.parse::<i64>() {
            Ok(n) if v.kind() == ValueKind::Seq => v.get_item(&Value::from(n))?,
            _ => v.get_item(&Value::from(part))?,
        };
    }
    Ok(v)
}

fn join(value: Value, sep: Option<Value>, attribute: Option<Value>, kw: Kwargs) -> R<String> {
    let sep = sep.map(|s| py_str(&s)).unwrap_or_default();
    let attribute = kw.get::<Option<Value>>("attribute")?.or(attribute);
    kw.assert_all_used()?;
    if value.kind() == ValueKind::Undefined || value.is_none() {
        return if value.is_none() { Err(type_error("'NoneType' object is not iterable")) } else { Ok(String::new()) };
    }
    let mut out = String::new();
    for (i, item) in value.try_iter()?.enumerate() {
        if i > 0 {
            out.push_str(&sep);
        }
        let item = match &attribute {
            Some(a) => lookup(&item, &py_str(a))?,
            None => item,
        };
        out.push_str(&py_str(&item));
    }
    Ok(out)
}

fn min_max(_state: &State, value: Value, case_sensitive: Option<Value>, attribute: Option<Value>, kw: Kwargs, max: bool) -> R<Value> {
    let case_sensitive = kw.get::<Option<bool>>("case_sensitive")?.or(case_sensitive.map(|v| v.is_true())).unwrap_or(false);
    let attribute = kw.get::<Option<Value>>("attribute")?.or(attribute);
    kw.assert_all_used()?;
    let mut best: Option<(Value, Value)> = None;
    for item in value.try_iter()? {
        let key = match &attribute {
            Some(a) => lookup(&item, &py_str(a))?,
            None => item.clone(),
        };
        let key = sort_key(&key, case_sensitive);
        let better = match &best {
            None => true,
            Some((k, _)) => {
                if max {
                    key > *k
                } else {
                    key < *k
                }
            }
        };
        if better {
            best = Some((key, item));
        }
    }
    Ok(best.map(|(_, v)| v).unwrap_or(Value::UNDEFINED))
}

static SEED: AtomicU64 = AtomicU64::new(0);

/// A pseudo-random number (templates' `random` and `lipsum` need no better).
fn next_random() -> u64 {
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x, Ordering::Relaxed);
    x
}

fn randrange(lo: i64, hi: i64) -> R<i64> {
    if hi <= lo {
        return Err(value_error(format!("empty range in randrange({lo}, {hi})")));
    }
    Ok(lo + (next_random() % (hi - lo) as u64) as i64)
}

fn random(value: Value) -> R<Value> {
    let items: Vec<Value> = value.try_iter()?.collect();
    if items.is_empty() {
        return Ok(Value::UNDEFINED);
    }
    Ok(items[(next_random() % items.len() as u64) as usize].clone())
}

fn replace_filter(value: Value, old: Value, new: Value, count: Option<i64>, kw: Kwargs) -> R<Value> {
    let count = kw.get::<Option<i64>>("count")?.or(count).unwrap_or(-1);
    kw.assert_all_used()?;
    Ok(Value::from(py_replace(&py_str(&value), &py_str(&old), &py_str(&new), count)))
}

fn round(value: Value, precision: Option<i64>, method: Option<String>, kw: Kwargs) -> R<Value> {
    let precision = kw.get::<Option<i64>>("precision")?.or(precision).unwrap_or(0);
    let method = kw.get::<Option<String>>("method")?.or(method).unwrap_or_else(|| "common".into());
    kw.assert_all_used()?;
    if !matches!(value.kind(), ValueKind::Number | ValueKind::Bool) {
        return Err(type_error(format!("type {} doesn't define __round__ method", py_type(&value))));
    }
    let integer = value.is_integer() || value.kind() == ValueKind::Bool;
    let x = f64::try_from(value.clone()).unwrap_or(0.0);
    match method.as_str() {
        "common" if integer => {
            let n = i64::try_from(value.clone()).unwrap_or(value.is_true() as i64);
            if precision >= 0 {
                return Ok(Value::from(n));
            }
            let m = 10i64.saturating_pow((-precision) as u32);
            let q = n.div_euclid(m);
            let r = n.rem_euclid(m);
            let q = if r * 2 > m || (r * 2 == m && q % 2 != 0) { q + 1 } else { q };
            Ok(Value::from(q * m))
        }
        "common" => {
            if precision >= 0 {
                let s = format!("{:.*}", precision as usize, x);
                Ok(Value::from(s.parse::<f64>().unwrap_or(x)))
            } else {
                let m = 10f64.powi((-precision) as i32);
                let y = x / m;
                let r = y.round();
                let r = if (y - y.trunc()).abs() == 0.5 { 2.0 * (y / 2.0).round() } else { r };
                Ok(Value::from(r * m))
            }
        }
        "floor" | "ceil" => {
            let m = 10f64.powi(precision as i32);
            let y = if method == "floor" { (x * m).floor() } else { (x * m).ceil() };
            Ok(Value::from(y / m))
        }
        _ => Err(err("FilterArgumentError", "method must be common, ceil or floor")),
    }
}

fn striptags(s: &str) -> String {
    let mut text = String::new();
    let mut rest = s;
    // comments first, then tags, as markupsafe does
    let mut no_comments = String::new();
    while let Some(i) = rest.find("<!--") {
        no_comments.push_str(&rest[..i]);
        match rest[i..].find("-->") {
            Some(j) => rest = &rest[i + j + 3..],
            None => {
                no_comments.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    no_comments.push_str(rest);
    let mut rest = no_comments.as_str();
    while let Some(i) = rest.find('<') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        match after.find('>') {
            Some(j) if j > 0 => {
                rest = &after[j + 1..];
            }
            _ => {
                text.push('<');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    let collapsed = text.split(py_isspace).filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ");
    html_unescape(&collapsed)
}

fn html_unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after.find(';').filter(|&j| j <= 32);
        let decoded = end.and_then(|j| {
            let name = &after[..j];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some('\u{a0}'),
                _ => match name.strip_prefix('#') {
                    Some(n) => match n.strip_prefix(['x', 'X']) {
                        Some(h) => u32::from_str_radix(h, 16).ok().and_then(char::from_u32),
                        None => n.parse::<u32>().ok().and_then(char::from_u32),
                    },
                    None => None,
                },
            };
            c.map(|c| (c, j))
        });
        match decoded {
            Some((c, j)) => {
                out.push(c);
                rest = &after[j + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn sum(value: Value, attribute: Option<Value>, start: Option<Value>, kw: Kwargs) -> R<Value> {
    let attribute = kw.get::<Option<Value>>("attribute")?.or(attribute);
    let start = kw.get::<Option<Value>>("start")?.or(start).unwrap_or(Value::from(0));
    kw.assert_all_used()?;
    let mut total = start;
    for item in value.try_iter()? {
        let item = match &attribute {
            Some(a) => lookup(&item, &py_str(a))?,
            None => item,
        };
        total = py_add(&total, &item)?;
    }
    Ok(total)
}

fn py_add(a: &Value, b: &Value) -> R<Value> {
    let number = |v: &Value| matches!(v.kind(), ValueKind::Number | ValueKind::Bool);
    if !number(a) || !number(b) {
        return Err(type_error(format!("unsupported operand type(s) for +: '{}' and '{}'", py_type(a), py_type(b))));
    }
    let int = |v: &Value| {
        if v.kind() == ValueKind::Bool {
            Some(v.is_true() as i128)
        } else if v.is_integer() {
            i128::try_from(v.clone()).ok()
        } else {
            None
        }
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Ok(Value::from(x + y)),
        _ => Ok(Value::from(f64::try_from(a.clone()).unwrap_or(0.0) + f64::try_from(b.clone()).unwrap_or(0.0))),
    }
}

/// jinja2's `title`: each word's first letter upper, the rest lower, words begin after
/// whitespace, `-`, and opening brackets.
fn title_filter(s: &str) -> String {
    let mut out = String::new();
    let mut start = true;
    for c in s.chars() {
        if py_isspace(c) || matches!(c, '-' | '(' | '{' | '[' | '<') {
            out.push(c);
            start = true;
        } else if start {
            out.extend(c.to_uppercase());
            start = false;
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

fn truncate(value: Value, pos: Rest<Value>, kw: Kwargs) -> R<String> {
    let a = Args { pos: pos.0, kw: Some(kw) };
    let length = a.int(0, "length", 255)?;
    let killwords = a.get(1, "killwords")?.is_some_and(|v| v.is_true());
    let end = a.str(2, "end")?.unwrap_or_else(|| "...".into());
    let leeway = a.int(3, "leeway", 5)?;
    let kw = a.kw.unwrap();
    kw.assert_all_used()?;
    let s = chars(&py_str(&value));
    let end_len = end.chars().count() as i64;
    if length < end_len {
        return Err(err("AssertionError", "expected length >= len(end)"));
    }
    if leeway < 0 {
        return Err(err("AssertionError", "expected leeway >= 0"));
    }
    if s.len() as i64 <= length + leeway {
        return Ok(string(&s));
    }
    let cut = string(&s[..(length - end_len) as usize]);
    if killwords {
        return Ok(cut + &end);
    }
    let kept = match cut.rfind(' ') {
        Some(i) => cut[..i].to_string(),
        None => cut,
    };
    Ok(kept + &end)
}

fn url_quote(s: &str, for_qs: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => out.push(b as char),
            b'/' if !for_qs => out.push('/'),
            b' ' if for_qs => out.push('+'),
            b => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

fn urlencode(value: Value) -> R<String> {
    match value.kind() {
        ValueKind::String => Ok(url_quote(value.as_str().unwrap_or_default(), false)),
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable => {
            let pairs: Vec<(Value, Value)> = if value.kind() == ValueKind::Map {
                let keys: Vec<Value> = value.try_iter()?.collect();
                keys.into_iter().map(|k| (k.clone(), value.get_item(&k).unwrap_or_default())).collect()
            } else {
                let mut pairs = Vec::new();
                for item in value.try_iter()? {
                    pairs.push((item.get_item(&Value::from(0))?, item.get_item(&Value::from(1))?));
                }
                pairs
            };
            Ok(pairs
                .iter()
                .map(|(k, v)| format!("{}={}", url_quote(&py_str(k), true), url_quote(&py_str(v), true)))
                .collect::<Vec<_>>()
                .join("&"))
        }
        _ => Ok(url_quote(&py_str(&value), false)),
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn word_count(s: &str) -> usize {
    let mut n = 0;
    let mut in_word = false;
    for c in s.chars() {
        if is_word(c) {
            if !in_word {
                n += 1;
            }
            in_word = true;
        } else {
            in_word = false;
        }
    }
    n
}

/// `(https?://|www\.)(([\w%-]+\.)+)?([a-z]{2,63}|xn--[\w%]{2,59})` or a bare domain under a
/// basic TLD, then `(:port)?([/?#]\S*)?`: jinja2's `_http_re`, by hand.
fn is_http(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    let after_scheme = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")).map_or(0, |r| lower.len() - r.len());
    let (host, tail) = match lower[after_scheme..].find(['/', '?', '#']) {
        Some(i) => (&lower[..after_scheme + i], &lower[after_scheme + i..]),
        None => (lower.as_str(), ""),
    };
    if tail.chars().skip(1).any(py_isspace) {
        return false;
    }
    let (scheme, rest) =
        if let Some(r) = host.strip_prefix("https://").or_else(|| host.strip_prefix("http://")) { (true, r) } else { (false, host) };
    let rest = match rest.rfind(':') {
        Some(i) if !rest[..i].contains(']') || rest[..i].ends_with(']') => {
            let port = &rest[i + 1..];
            if port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()) {
                return false;
            }
            &rest[..i]
        }
        _ => rest,
    };
    let label_ok = |l: &str| !l.is_empty() && l.chars().all(|c| is_word(c) || c == '%' || c == '-');
    let tld_ok = |t: &str| {
        (2..=63).contains(&t.len()) && t.chars().all(|c| c.is_ascii_lowercase())
            || t.strip_prefix("xn--").is_some_and(|r| (2..=59).contains(&r.chars().count()) && r.chars().all(|c| is_word(c) || c == '%'))
    };
    let www = rest.strip_prefix("www.");
    if scheme || www.is_some() {
        let body = if scheme { rest } else { www.unwrap() };
        let labels: Vec<&str> = body.split('.').collect();
        if let Some((tld, subs)) = labels.split_last() {
            if tld_ok(tld) && subs.iter().all(|l| label_ok(l)) {
                return true;
            }
        }
        if scheme {
            let parts: Vec<&str> = body.split('.').collect();
            if parts.len() == 4 && parts.iter().all(|p| (1..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit())) {
                return true;
            }
        }
        return false;
    }
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.split_last() {
        Some((tld, subs)) if !subs.is_empty() => {
            matches!(*tld, "com" | "net" | "int" | "edu" | "gov" | "org" | "info" | "mil")
                && subs.iter().all(|l| (2..=63).contains(&l.chars().count()) && label_ok(l))
        }
        _ => false,
    }
}

fn is_email(s: &str) -> bool {
    // ^\S+@\w[\w.-]*\.\w+$
    let Some(at) = s.rfind('@') else { return false };
    let (user, domain) = (&s[..at], &s[at + 1..]);
    if user.is_empty() || user.chars().any(py_isspace) {
        return false;
    }
    let Some(first) = domain.chars().next() else { return false };
    let Some(dot) = domain.rfind('.') else { return false };
    is_word(first)
        && dot > 0
        && domain[..dot].chars().all(|c| is_word(c) || c == '.' || c == '-')
        && !domain[dot + 1..].is_empty()
        && domain[dot + 1..].chars().all(is_word)
}

fn urlize(value: Value, pos: Rest<Value>, kw: Kwargs) -> R<String> {
    let a = Args { pos: pos.0, kw: Some(kw) };
    let trim = a.get(0, "trim_url_limit")?.and_then(|v| v.as_i64());
    let nofollow = a.get(1, "nofollow")?.is_some_and(|v| v.is_true());
    let target = a.get(2, "target")?.filter(|v| v.is_true()).map(|v| py_str(&v));
    let rel = a.get(3, "rel")?.filter(|v| v.is_true()).map(|v| py_str(&v));
    let _ = a.get(4, "extra_schemes")?;
    let kw = a.kw.unwrap();
    kw.assert_all_used()?;
    let mut rel_parts: Vec<String> = rel.map(|r| r.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
    if nofollow {
        rel_parts.push("nofollow".into());
    }
    rel_parts.push("noopener".into());
    rel_parts.sort();
    rel_parts.dedup();
    let links = Links {
        rel_attr: format!(" rel=\"{}\"", html_escape(&rel_parts.join(" "))),
        target_attr: target.map(|t| format!(" target=\"{}\"", html_escape(&t))).unwrap_or_default(),
        trim,
    };
    let text = html_escape(&py_str(&value));
    let mut out = String::new();
    for word in words_and_spaces(&text) {
        if word.chars().next().is_some_and(py_isspace) {
            out.push_str(&word);
            continue;
        }
        let (head, middle, tail) = strip_punctuation(&word);
        out.push_str(head);
        out.push_str(&links.link(&middle));
        out.push_str(&tail);
    }
    Ok(out)
}

/// `re.split(r"(\s+)", text)`: the words and the whitespace between them.
fn words_and_spaces(text: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_space = false;
    for c in text.chars() {
        let space = py_isspace(c);
        if space != in_space && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        in_space = space;
        current.push(c);
    }
    if !current.is_empty() || words.is_empty() {
        words.push(current);
    }
    words
}

/// A word as jinja2's `urlize` splits it: the opening brackets before it, the word, and the
/// closing brackets and punctuation after it (a closing bracket that an opening one in the word
/// needs stays in the word).
fn strip_punctuation(word: &str) -> (&str, String, String) {
    let mut head_len = 0;
    loop {
        let m = &word[head_len..];
        if m.starts_with('(') || m.starts_with('<') {
            head_len += 1;
        } else if m.starts_with("&lt;") {
            head_len += 4;
        } else {
            break;
        }
    }
    let (head, middle) = word.split_at(head_len);
    let mut tail_start = middle.len();
    loop {
        let m = &middle[..tail_start];
        if m.ends_with([')', '>', '.', ',', '\n']) {
            tail_start -= 1;
        } else if m.ends_with("&gt;") {
            tail_start -= 4;
        } else {
            break;
        }
    }
    let mut middle_s = middle[..tail_start].to_string();
    let mut tail = middle[tail_start..].to_string();
    for (open, close) in [("(", ")"), ("<", ">"), ("&lt;", "&gt;")] {
        let start_count = middle_s.matches(open).count();
        if start_count <= middle_s.matches(close).count() {
            continue;
        }
        for _ in 0..start_count.min(tail.matches(close).count()) {
            let end_index = tail.find(close).unwrap() + close.len();
            middle_s.push_str(&tail[..end_index]);
            tail = tail[end_index..].to_string();
        }
    }
    (head, middle_s, tail)
}

/// How `urlize` writes a link: its `rel` and `target` attributes, and the length its text is
/// cut to.
struct Links {
    rel_attr: String,
    target_attr: String,
    trim: Option<i64>,
}

impl Links {
    /// `m` as a link if it is a web address or an email address, else as it is.
    fn link(&self, m: &str) -> String {
        let Links { rel_attr, target_attr, .. } = self;
        if is_http(m) {
            if m.starts_with("https://") || m.starts_with("http://") {
                format!("<a href=\"{m}\"{rel_attr}{target_attr}>{}</a>", self.trim_url(m))
            } else {
                format!("<a href=\"https://{m}\"{rel_attr}{target_attr}>{}</a>", self.trim_url(m))
            }
        } else if m.starts_with("mailto:") && is_email(&m[7..]) {
            format!("<a href=\"{m}\">{}</a>", &m[7..])
        } else if m.contains('@') && !m.starts_with("www.") && !m.starts_with('@') && !m.contains(':') && is_email(m) {
            format!("<a href=\"mailto:{m}\">{m}</a>")
        } else {
            m.to_string()
        }
    }

    fn trim_url(&self, x: &str) -> String {
        match self.trim {
            Some(n) if x.chars().count() as i64 > n => format!("{}...", x.chars().take(n.max(0) as usize).collect::<String>()),
            _ => x.to_string(),
        }
    }
}

/// Python's textwrap chunks: whitespace runs and words, words split after hyphens between
/// letters when `break_on_hyphens`.
fn wrap_chunks(text: &str, break_on_hyphens: bool) -> Vec<String> {
    let mut chunks = Vec::new();
    let c = chars(text);
    let mut i = 0;
    while i < c.len() {
        let space = py_isspace(c[i]);
        let start = i;
        while i < c.len() && py_isspace(c[i]) == space {
            i += 1;
        }
        if space || !break_on_hyphens {
            chunks.push(string(&c[start..i]));
            continue;
        }
        let word = &c[start..i];
        let mut from = 0;
        for j in 1..word.len().saturating_sub(1) {
            if word[j] == '-'
                && word[j - 1].is_alphabetic()
                && is_word(word[j + 1])
                && word[from..j].iter().any(|c| c.is_alphabetic() || c.is_numeric())
            {
                chunks.push(string(&word[from..=j]));
                from = j + 1;
            }
        }
        chunks.push(string(&word[from..]));
    }
    chunks
}

fn textwrap(text: &str, width: usize, break_long_words: bool, break_on_hyphens: bool) -> R<Vec<String>> {
    if width == 0 {
        return Err(value_error(format!("invalid width {width} (must be > 0)")));
    }
    let mut chunks: Vec<Vec<char>> = wrap_chunks(text, break_on_hyphens).iter().map(|c| chars(c)).collect();
    chunks.reverse();
    let mut lines = Vec::new();
    while !chunks.is_empty() {
        let mut line: Vec<Vec<char>> = Vec::new();
        let mut len = 0;
        if !lines.is_empty() && chunks.last().is_some_and(|c| c.iter().all(|&ch| py_isspace(ch))) {
            chunks.pop();
        }
        while let Some(chunk) = chunks.last() {
            if len + chunk.len() <= width {
                len += chunk.len();
                line.push(chunks.pop().unwrap());
            } else {
                break;
            }
        }
        if let Some(chunk) = chunks.last() {
            if chunk.len() > width {
                let space_left = if width < 1 { 1 } else { width - len };
                if break_long_words {
                    let mut end = space_left;
                    if break_on_hyphens && chunk.len() > space_left {
                        if let Some(h) = chunk[..space_left].iter().rposition(|&c| c == '-') {
                            if h > 0 && chunk[..h].iter().any(|&c| c != '-') {
                                end = h + 1;
                            }
                        }
                    }
                    let chunk = chunks.pop().unwrap();
                    line.push(chunk[..end].to_vec());
                    chunks.push(chunk[end..].to_vec());
                } else if line.is_empty() {
                    line.push(chunks.pop().unwrap());
                }
            }
        }
        while line.last().is_some_and(|c| c.iter().all(|&ch| py_isspace(ch))) {
            line.pop();
        }
        if !line.is_empty() {
            lines.push(line.iter().map(|c| string(c)).collect::<String>());
        }
    }
    Ok(lines)
}

fn wordwrap(value: Value, pos: Rest<Value>, kw: Kwargs) -> R<String> {
    let a = Args { pos: pos.0, kw: Some(kw) };
    let width = a.int(0, "width", 79)?;
    let break_long_words = a.get(1, "break_long_words")?.is_none_or(|v| v.is_true());
    let wrapstring = a.str(2, "wrapstring")?.unwrap_or_else(|| "\n".into());
    let break_on_hyphens = a.get(3, "break_on_hyphens")?.is_none_or(|v| v.is_true());
    let kw = a.kw.unwrap();
    kw.assert_all_used()?;
    let s = py_str(&value);
    let mut out = Vec::new();
    for line in py_splitlines(&s, false) {
        out.extend(textwrap(&line, width.max(0) as usize, break_long_words, break_on_hyphens)?);
    }
    Ok(out.join(&wrapstring))
}

fn xmlattr(value: Value, autospace: Option<bool>) -> R<Value> {
    let mut parts = Vec::new();
    for key in value.try_iter()? {
        let v = value.get_item(&key)?;
        if v.is_none() || v.is_undefined() {
            continue;
        }
        let k = py_str(&key);
        if k.chars().any(|c| py_isspace(c) || matches!(c, '/' | '>' | '=')) {
            return Err(value_error(format!("Invalid character in attribute name: {}", py_str_repr(&k))));
        }
        parts.push(format!("{}=\"{}\"", html_escape(&k), html_escape(&py_str(&v))));
    }
    let mut rv = parts.join(" ");
    if autospace.unwrap_or(true) && !rv.is_empty() {
        rv.insert(0, ' ');
    }
    Ok(Value::from_safe_string(rv))
}

fn groupby(value: Value, attribute: Value, default: Option<Value>, case_sensitive: Option<bool>, kw: Kwargs) -> R<Value> {
    let default = kw.get::<Option<Value>>("default")?.or(default);
    let case_sensitive = kw.get::<Option<bool>>("case_sensitive")?.or(case_sensitive).unwrap_or(false);
    kw.assert_all_used()?;
    let key_of = |item: &Value| -> R<Value> {
        let k = match attribute.as_i64() {
            Some(n) => item.get_item(&Value::from(n))?,
            None => lookup(item, &py_str(&attribute))?,
        };
        Ok(if k.is_undefined() { default.clone().unwrap_or(k) } else { k })
    };
    let mut keyed: Vec<(Value, Value)> = Vec::new();
    for item in value.try_iter()? {
        let k = key_of(&item)?;
        keyed.push((sort_key(&k, case_sensitive), item));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups: Vec<(Value, Vec<Value>)> = Vec::new();
    for (k, item) in keyed {
        match groups.last_mut() {
            Some((gk, items)) if *gk == k => items.push(item),
            _ => groups.push((k, vec![item])),
        }
    }
    let mut out = Vec::new();
    for (k, items) in groups {
        let grouper = if case_sensitive { k } else { key_of(&items[0])? };
        out.push(Value::from_object(Group { grouper, list: Value::from(items) }));
    }
    Ok(Value::from(out))
}

/// jinja2's `_GroupTuple(grouper, list)`: a pair with named fields.
#[derive(Debug)]
struct Group {
    grouper: Value,
    list: Value,
}

impl Object for Group {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Seq
    }
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match (key.as_str(), key.as_i64()) {
            (Some("grouper"), _) | (_, Some(0)) => Some(self.grouper.clone()),
            (Some("list"), _) | (_, Some(1)) => Some(self.list.clone()),
            _ => None,
        }
    }
    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Seq(2)
    }
}

fn indent(value: Value, width: Option<Value>, first: Option<bool>, blank: Option<bool>, kw: Kwargs) -> R<String> {
    let width = kw.get::<Option<Value>>("width")?.or(width).unwrap_or(Value::from(4));
    let first = kw.get::<Option<bool>>("first")?.or(first).unwrap_or(false);
    let blank = kw.get::<Option<bool>>("blank")?.or(blank).unwrap_or(false);
    kw.assert_all_used()?;
    let prefix = match width.as_str() {
        Some(s) => s.to_string(),
        None => " ".repeat(width.as_i64().unwrap_or(0).max(0) as usize),
    };
    let s = py_str(&value) + "\n";
    let lines = py_splitlines(&s, false);
    let mut rv = if blank {
        lines.join(&format!("\n{prefix}"))
    } else {
        let mut rest = lines.into_iter();
        let mut rv = rest.next().unwrap_or_default();
        let others: Vec<String> = rest.map(|l| if l.is_empty() { l } else { format!("{prefix}{l}") }).collect();
        if !others.is_empty() {
            rv.push('\n');
            rv.push_str(&others.join("\n"));
        }
        rv
    };
    if first {
        rv = format!("{prefix}{rv}");
    }
    Ok(rv)
}

fn percent_format_filter(value: Value, args: Rest<Value>, kw: Kwargs) -> R<String> {
    let mut names = Vec::new();
    for k in kw.args() {
        names.push(k.to_string());
    }
    if !args.is_empty() && !names.is_empty() {
        return Err(err("FilterArgumentError", "can't handle positional and keyword arguments at the same time"));
    }
    let s = py_str(&value);
    if names.is_empty() {
        percent_format(&s, &args, None)
    } else {
        let map: Value = Value::from_iter(names.iter().map(|n| (n.clone(), kw.get::<Value>(n).unwrap_or_default())));
        percent_format(&s, &[], Some(&map))
    }
}

// ---------------------------------------------------------------------------------------------
// Tests and globals

fn is_callable(v: &Value) -> bool {
    // minijinja's functions, macros and joiners are plain objects that can be called; its
    // namespaces, cyclers and loops are plain objects that cannot.
    let debug = format!("{v:?}");
    !(debug.starts_with('{') || debug.starts_with("<loop") || debug.contains("Cycler") || debug.starts_with("Namespace"))
}

fn namespace(args: Rest<Value>, kw: Kwargs) -> R<Value> {
    if args.len() > 1 {
        return Err(type_error(format!("namespace expected at most 1 argument, got {}", args.len())));
    }
    let mut pairs: Vec<(Value, Value)> = Vec::new();
    if let Some(d) = args.first() {
        if d.kind() != ValueKind::Map {
            return Err(type_error(format!("'{}' object is not iterable as a mapping", py_type(d))));
        }
        for k in d.try_iter()? {
            pairs.push((k.clone(), d.get_item(&k)?));
        }
    }
    for k in kw.args() {
        pairs.push((Value::from(k), kw.get::<Value>(k)?));
    }
    minijinja::functions::namespace(Some(Value::from_iter(pairs)))
}

/// jinja2's `cycler(*items)`: `next()` gives the current item and moves on, `current`, `reset()`.
#[derive(Debug)]
struct Cycler {
    items: Vec<Value>,
    pos: AtomicU64,
}

impl Object for Cycler {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "current" => self.items.get(self.pos.load(Ordering::Relaxed) as usize).cloned(),
            "items" => Some(Value::from(self.items.clone())),
            _ => None,
        }
    }

    fn call_method(self: &Arc<Self>, _state: &State<'_, '_>, method: &str, args: &[Value]) -> R<Value> {
        let () = from_args(args)?;
        match method {
            "next" => {
                if self.items.is_empty() {
                    return Err(type_error("cycler has no items"));
                }
                let pos = self.pos.load(Ordering::Relaxed) as usize;
                self.pos.store(((pos + 1) % self.items.len()) as u64, Ordering::Relaxed);
                Ok(self.items[pos].clone())
            }
            "reset" => {
                self.pos.store(0, Ordering::Relaxed);
                Ok(Value::from(()))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        }
    }
}

const LOREM: &str = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore \
et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo \
consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla pariatur excepteur sint occaecat \
cupidatat non proident sunt culpa qui officia deserunt mollit anim id est laborum";

/// jinja2's `lipsum(n=5, html=True, min=20, max=100)`: `n` paragraphs of `randrange(min, max)`
/// words, capitalized, with commas and full stops at random, each ending with a full stop;
/// separated by a blank line, or each in `<p>`…`</p>` on its own line with `html`.
fn lipsum(n: Option<i64>, html: Option<bool>, min: Option<i64>, max: Option<i64>, kw: Kwargs) -> R<Value> {
    let n = kw.get::<Option<i64>>("n")?.or(n).unwrap_or(5);
    let html = kw.get::<Option<bool>>("html")?.or(html).unwrap_or(true);
    let min = kw.get::<Option<i64>>("min")?.or(min).unwrap_or(20);
    let max = kw.get::<Option<i64>>("max")?.or(max).unwrap_or(100);
    kw.assert_all_used()?;
    let words: Vec<&str> = LOREM.split(' ').collect();
    let mut result = Vec::new();
    for _ in 0..n.max(0) {
        let mut next_capitalized = true;
        let (mut last_comma, mut last_fullstop) = (0i64, 0i64);
        let mut last: Option<&str> = None;
        let mut p: Vec<String> = Vec::new();
        for idx in 0..randrange(min, max)? {
            let word = loop {
                let w = words[(next_random() % words.len() as u64) as usize];
                if Some(w) != last {
                    last = Some(w);
                    break w;
                }
            };
            let mut word = if next_capitalized {
                next_capitalized = false;
                py_capitalize(word)
            } else {
                word.to_string()
            };
            if idx - randrange(3, 8)? > last_comma {
                last_comma = idx;
                last_fullstop += 2;
                word.push(',');
            }
            if idx - randrange(10, 20)? > last_fullstop {
                last_comma = idx;
                last_fullstop = idx;
                word.push('.');
                next_capitalized = true;
            }
            p.push(word);
        }
        let mut p = p.join(" ");
        if let Some(stripped) = p.strip_suffix(',') {
            p = format!("{stripped}.");
        } else if !p.ends_with('.') {
            p.push('.');
        }
        result.push(p);
    }
    if !html {
        return Ok(Value::from(result.join("\n\n")));
    }
    Ok(Value::from_safe_string(result.iter().map(|p| format!("<p>{}</p>", html_escape(p))).collect::<Vec<_>>().join("\n")))
}
