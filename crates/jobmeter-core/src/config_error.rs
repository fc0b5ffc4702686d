//! Errors of the human-edited files (rate card, plan catalog) and account
//! records, each naming the file position or field that is wrong.

/// One problem found in a configuration document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct Problem {
    /// `line 12, versions[1].models."sdxl-1.0".per_second` or similar.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

/// A document that failed validation, with every problem found (not just the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is invalid:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// Which document (`rate card`, `plan catalog`).
    pub what: String,
    /// Every problem found.
    pub problems: Vec<Problem>,
}

/// The 1-based line of byte offset `pos` in `text`.
pub(crate) fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Collects problems while a document is checked.
#[derive(Debug)]
pub(crate) struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Problems { text, list: Vec::new() }
    }

    /// Records a problem at a byte span of the document.
    pub(crate) fn at(&mut self, span: std::ops::Range<usize>, field: &str, message: impl Into<String>) {
        self.list.push(Problem {
            location: format!("line {}, {field}", line_of(self.text, span.start)),
            message: message.into(),
        });
    }

    /// Records a problem without a position.
    pub(crate) fn field(&mut self, field: &str, message: impl Into<String>) {
        self.list.push(Problem {
            location: field.to_owned(),
            message: message.into(),
        });
    }

    pub(crate) fn finish(self, what: &str) -> Result<(), ConfigError> {
        if self.list.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                what: what.to_owned(),
                problems: self.list,
            })
        }
    }
}

/// Converts a TOML syntax or shape error (which carries its own span).
pub(crate) fn from_toml(what: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let location = match e.span() {
        Some(span) => format!("line {}", line_of(text, span.start)),
        None => "document".to_owned(),
    };
    ConfigError {
        what: what.to_owned(),
        problems: vec![Problem {
            location,
            message: e.message().to_owned(),
        }],
    }
}
