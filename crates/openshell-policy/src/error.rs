//! Errors of policy loading and comparison.

use std::fmt;

/// A policy that could not be loaded: where (source, 1-based line and column,
/// field path) and why.
///
/// Display: `<source_name>:<line>:<column>: <field.path>: <message>`; the
/// `<field.path>: ` part is left out when the problem is not inside a field
/// (YAML syntax errors, an empty document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    source_name: String,
    line: usize,
    column: usize,
    field_path: String,
    message: String,
}

impl PolicyError {
    pub(crate) fn new(
        source_name: &str,
        line: usize,
        column: usize,
        field_path: &str,
        message: &str,
    ) -> Self {
        Self {
            source_name: source_name.to_string(),
            line,
            column,
            field_path: field_path.to_string(),
            message: message.to_string(),
        }
    }

    /// The name the caller gave the policy text (usually its file name).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// 1-based line of the offending YAML node.
    pub fn line(&self) -> usize {
        self.line
    }

    /// 1-based column of the offending YAML node.
    pub fn column(&self) -> usize {
        self.column
    }

    /// Dotted field path such as `network_policies.pypi.endpoints[0].port`;
    /// empty when the error is not inside a field.
    pub fn field_path(&self) -> &str {
        &self.field_path
    }

    /// What is wrong, without position or path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.source_name, self.line, self.column)?;
        if !self.field_path.is_empty() {
            write!(f, "{}: ", self.field_path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for PolicyError {}

/// A live policy update tried to change a section that is fixed at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{section} changed; static sections are fixed at start")]
pub struct StaticSectionChanged {
    /// The YAML name of the first section that differs (`filesystem_policy`,
    /// `landlock`, `process`, `resources` or `credentials`).
    pub section: &'static str,
}
