//! Validation errors: every one names the file, line, column and field path, and says how to fix
//! the problem.

use std::fmt;

use serde::Serialize;

/// A position in the policy source, 1-based. `line == 0` means "unknown" (the error is about the
/// file as a whole, such as its size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SourcePos {
    pub line: u64,
    pub column: u64,
}

impl SourcePos {
    pub(crate) fn from_location(location: serde_saphyr::Location) -> Self {
        Self {
            line: location.line(),
            column: location.column(),
        }
    }
}

/// One problem found in a policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", self.render())]
pub struct PolicyError {
    /// The source name given to [`crate::policy::parse`] (usually the file path).
    pub file: String,
    pub line: u64,
    pub column: u64,
    /// Dotted field path, e.g. `network_policies.github.endpoints[0].port`; empty for the root.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl PolicyError {
    fn render(&self) -> String {
        let mut out = format!(
            "{}:{}:{}: error: {}",
            self.file, self.line, self.column, self.message
        );
        if let Some(hint) = &self.hint {
            out.push_str("; ");
            out.push_str(hint);
        }
        if !self.path.is_empty() {
            out.push_str(" (at ");
            out.push_str(&self.path);
            out.push(')');
        }
        out
    }
}

/// Every error found in one policy file, in source order. Never empty.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(transparent)]
pub struct PolicyErrors {
    errors: Vec<PolicyError>,
}

impl PolicyErrors {
    /// One error about the file as a whole (unreadable, too large, not UTF-8): no position, no
    /// field path.
    pub fn whole_file(file: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::new(vec![PolicyError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message: message.into(),
            hint: Some(hint.into()),
        }])
    }

    pub(crate) fn new(mut errors: Vec<PolicyError>) -> Self {
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        Self { errors }
    }

    pub fn errors(&self) -> &[PolicyError] {
        &self.errors
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl IntoIterator for PolicyErrors {
    type Item = PolicyError;
    type IntoIter = std::vec::IntoIter<PolicyError>;

    fn into_iter(self) -> Self::IntoIter {
        self.errors.into_iter()
    }
}

/// One `FILE:LINE:COL: error: MESSAGE; HINT (at FIELD.PATH)` line per error.
impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// Collects errors while validation walks the raw policy.
pub(crate) struct Collector<'a> {
    file: &'a str,
    errors: Vec<PolicyError>,
}

impl<'a> Collector<'a> {
    pub(crate) fn new(file: &'a str) -> Self {
        Self {
            file,
            errors: Vec::new(),
        }
    }

    pub(crate) fn push(
        &mut self,
        pos: SourcePos,
        path: impl Into<String>,
        message: impl Into<String>,
        hint: Option<&str>,
    ) {
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            path: path.into(),
            message: message.into(),
            hint: hint.map(str::to_owned),
        });
    }

    pub(crate) fn finish(self) -> Result<(), PolicyErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyErrors::new(self.errors))
        }
    }
}
