//! The code's shape, as issue 34 set it: no function in `src/` (its tests aside) is over 80
//! lines of code (comments and blank lines not counted, as clippy's `too_many_lines` counts) or
//! takes over 6 parameters (`self` counted, as clippy's `too_many_arguments` counts it). `clippy.toml`
//! holds the same limits for `cargo clippy`; this test keeps them without clippy installed.

use std::path::Path;

const MAX_LINES: usize = 80;
const MAX_PARAMETERS: usize = 6;

/// A function of a source file: its name, first line, code lines and parameters.
struct Function {
    name: String,
    line: usize,
    code_lines: usize,
    parameters: usize,
}

/// Functions of rustfmt-formatted `source`, up to its `#[cfg(test)]` module: each begins at a
/// line holding `fn NAME(` and ends at the first line after it that is its indentation and `}`.
fn functions(source: &str) -> Vec<Function> {
    let lines: Vec<&str> = source.lines().take_while(|l| !l.starts_with("#[cfg(test)]")).collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ").filter(|&at| is_definition(&trimmed[..at])) else { continue };
        let name: String = trimmed[at + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let indent = line.len() - trimmed.len();
        let closing = format!("{}}}", " ".repeat(indent));
        let Some(end) = (i..lines.len()).find(|&j| lines[j] == closing || (j == i && trimmed.ends_with('}'))) else { continue };
        if lines[i..=end].iter().all(|l| !l.contains('{')) {
            continue; // a trait method without a body
        }
        let code_lines = lines[i..=end].iter().filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("//")).count();
        let signature: String = lines[i..=end].iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
        let signature = &signature[signature.find("fn ").expect("found above")..];
        found.push(Function { name, line: i + 1, code_lines, parameters: parameters(signature) });
    }
    found
}

/// Whether the text before `fn ` on a line makes it a definition (`pub(crate) async unsafe`...).
fn is_definition(before: &str) -> bool {
    before.split_whitespace().all(|w| w.starts_with("pub") || ["async", "unsafe", "const", "extern", "\"C\""].contains(&w))
}

/// Parameters of the signature that `text` begins with, `self` included: the top-level
/// comma-separated items between its parentheses (`->` is not a closing bracket).
fn parameters(text: &str) -> usize {
    let open = text.find('(').expect("a signature");
    let (mut depth, mut items, mut item, mut prev) = (0, Vec::new(), String::new(), ' ');
    for c in text[open..].chars() {
        match c {
            '(' | '<' | '[' | '{' => depth += 1,
            '>' if prev == '-' => {}
            ')' if depth == 1 => break,
            ')' | '>' | ']' | '}' => depth -= 1,
            ',' if depth == 1 => items.push(std::mem::take(&mut item)),
            _ => {}
        }
        if depth >= 1 && !(c == '(' && depth == 1) && !(c == ',' && depth == 1) {
            item.push(c);
        }
        prev = c;
    }
    items.push(item);
    let items: Vec<String> = items.into_iter().map(|i| i.trim().to_string()).filter(|i| !i.is_empty()).collect();
    items.len()
}

fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_function_in_src_is_over_80_lines_or_6_parameters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut over = Vec::new();
    for file in &files {
        let source = std::fs::read_to_string(file).unwrap();
        for f in functions(&source) {
            if f.code_lines > MAX_LINES || f.parameters > MAX_PARAMETERS {
                let path = file.strip_prefix(root).unwrap().display();
                over.push(format!("{path}:{} `{}`: {} lines, {} parameters", f.line, f.name, f.code_lines, f.parameters));
            }
        }
    }
    assert!(over.is_empty(), "over {MAX_LINES} lines or {MAX_PARAMETERS} parameters:\n{}", over.join("\n"));
}

/// The counter itself, on functions of known shape.
#[test]
fn the_counter_counts_code_lines_and_parameters() {
    let source = "impl X {\n    pub(crate) fn a(&self, b: u32, c: Vec<(u8, u8)>) -> u32 {\n        // why\n\n        b\n    }\n}\nfn d(\n    e: u8,\n    f: &mut dyn FnMut(&str) -> bool,\n) {\n    let g = 1;\n}\nfn h() {}\n";
    let found = functions(source);
    let shape: Vec<(&str, usize, usize)> = found.iter().map(|f| (f.name.as_str(), f.code_lines, f.parameters)).collect();
    assert_eq!(shape, [("a", 3, 3), ("d", 6, 2), ("h", 1, 0)]);
}
