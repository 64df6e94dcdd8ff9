//! Spec errors: one [`SpecError`] per problem, located by a JSON pointer.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a spec: where (JSON pointer like "/layers/1/alpha", "" for the root) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecError {
    /// JSON pointer (RFC 6901) of the offending spot; "" for the whole document.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
    /// 1-based line in the source text, when known (malformed JSON).
    pub line: Option<usize>,
    /// 1-based column in the source text, when known (malformed JSON).
    pub column: Option<usize>,
}

impl SpecError {
    /// A problem at `pointer` without a source position.
    pub fn new(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            pointer: pointer.into(),
            message: message.into(),
            line: None,
            column: None,
        }
    }

    /// A malformed-JSON error, with the line and column serde_json reports.
    pub(crate) fn from_json(e: &serde_json::Error) -> Self {
        let full = e.to_string();
        // serde_json's Display appends " at line L column C"; keep it in the fields instead.
        let message = match full.rsplit_once(" at line ") {
            Some((msg, _)) if e.line() > 0 => msg.to_string(),
            _ => full,
        };
        SpecError {
            pointer: String::new(),
            message: format!("malformed JSON: {message}"),
            line: (e.line() > 0).then_some(e.line()),
            column: (e.line() > 0).then_some(e.column()),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let position = match (self.line, self.column) {
            (Some(l), Some(c)) => Some(format!("line {l} column {c}")),
            (Some(l), None) => Some(format!("line {l}")),
            _ => None,
        };
        match (self.pointer.is_empty(), position) {
            (false, Some(pos)) => write!(f, "{} ({pos}): {}", self.pointer, self.message),
            (false, None) => write!(f, "{}: {}", self.pointer, self.message),
            (true, Some(pos)) => write!(f, "{pos}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// All problems found, optionally with the file they came from. Display prints one line per problem:
/// "specs/x.json: /layers/1/alpha: alpha must be in (0, 1), got 1.5" (file prefix only when known;
/// for malformed JSON "line L column C" takes the pointer's place).
#[derive(Debug, Clone)]
pub struct SpecErrors {
    /// The spec file, when the spec was loaded from one.
    pub file: Option<PathBuf>,
    /// The problems, at least one.
    pub errors: Vec<SpecError>,
}

impl SpecErrors {
    /// Errors not tied to a file.
    pub fn new(errors: Vec<SpecError>) -> Self {
        SpecErrors { file: None, errors }
    }

    /// The same errors, attributed to `file`.
    pub fn with_file(mut self, file: &Path) -> Self {
        self.file = Some(file.to_path_buf());
        self
    }

    /// Whether some error is located at exactly `pointer`.
    pub fn has(&self, pointer: &str) -> bool {
        self.errors.iter().any(|e| e.pointer == pointer)
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if let Some(file) = &self.file {
                write!(f, "{}: ", file.display())?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// Appends semantic errors, dropping those at or below a spot that already has a
/// structural error (the value there is a placeholder, so a range error would be noise).
pub(crate) fn merge_semantic(structural: &mut Vec<SpecError>, semantic: Vec<SpecError>) {
    let bad: Vec<String> = structural.iter().map(|e| e.pointer.clone()).collect();
    for e in semantic {
        // A layer of a `repeat` block is written once: report its problem once.
        let seen = structural
            .iter()
            .any(|s| s.pointer == e.pointer && s.message == e.message);
        if !seen && !bad.iter().any(|b| is_at_or_below(&e.pointer, b)) {
            structural.push(e);
        }
    }
}

/// Whether JSON pointer `p` equals `ancestor` or lies below it.
fn is_at_or_below(p: &str, ancestor: &str) -> bool {
    p == ancestor || (p.starts_with(ancestor) && p[ancestor.len()..].starts_with('/'))
}

/// Escapes one reference token of a JSON pointer (RFC 6901).
pub(crate) fn escape_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_or_below() {
        assert!(is_at_or_below("/a/b", "/a"));
        assert!(is_at_or_below("/a", "/a"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(is_at_or_below("/a", ""));
    }

    #[test]
    fn escapes() {
        assert_eq!(escape_token("a/b~c"), "a~1b~0c");
    }
}
