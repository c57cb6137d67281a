//! Secrets: loaded from the environment or a file, never from source, never printed.
//!
//! ```
//! use sagaflow_steps::secrets::{Secret, Secrets};
//!
//! let s = Secret::new("sk_live_123");
//! assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
//! assert_eq!(s.to_string(), "<redacted>");
//! assert_eq!(s.expose(), "sk_live_123");
//!
//! let file = Secrets::parse("# payments\nPAYMENTS_KEY=sk_test_1\nEMPTY=\n")?;
//! assert_eq!(file.get("PAYMENTS_KEY")?.expose(), "sk_test_1");
//! assert!(file.get("MISSING").is_err());
//! # Ok::<(), sagaflow_steps::secrets::Error>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Errors loading secrets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The secret is not set (or is empty).
    #[error("secret `{0}` is not set")]
    Missing(String),
    /// The secrets file cannot be read.
    #[error("secrets file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the secrets file is not `NAME=value`.
    #[error("secrets file line {line}: expected NAME=value")]
    Malformed {
        /// The line number, from 1.
        line: usize,
    },
}

/// A secret value. `Debug` and `Display` print `<redacted>`; only [`Secret::expose`]
/// gives the value, so a secret cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret from environment variable `name`.
    ///
    /// # Errors
    ///
    /// [`Error::Missing`] if it is unset or empty.
    pub fn from_env(name: &str) -> Result<Self, Error> {
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Secret(v)),
            _ => Err(Error::Missing(name.to_string())),
        }
    }

    /// The value. Call it where the secret is used, nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Secrets from a file of `NAME=value` lines (blank lines and `#` comments allowed),
/// with the environment taking precedence: a deployment can override a file entry.
#[derive(Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, Secret>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl Secrets {
    /// Reads `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] or [`Error::Malformed`].
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
        Secrets::parse(&text)
    }

    /// Parses `NAME=value` lines.
    ///
    /// # Errors
    ///
    /// [`Error::Malformed`] for a line without `=` or with an empty name.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut values = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .ok_or(Error::Malformed { line: i + 1 })?;
            let name = name.trim();
            if name.is_empty() {
                return Err(Error::Malformed { line: i + 1 });
            }
            let value = value.trim().trim_matches('"');
            if !value.is_empty() {
                values.insert(name.to_string(), Secret::new(value));
            }
        }
        Ok(Secrets { values })
    }

    /// The secret `name`: from the environment if set there, else from the file.
    ///
    /// # Errors
    ///
    /// [`Error::Missing`] if neither has it.
    pub fn get(&self, name: &str) -> Result<Secret, Error> {
        Secret::from_env(name).or_else(|_| {
            self.values
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Missing(name.to_string()))
        })
    }
}
