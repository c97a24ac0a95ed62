//! Where a mistake is, what was found and what is allowed.
//!
//! Every problem in a rule file becomes one [`ConfigError`]; a load collects
//! all of them into [`Errors`] so that one run of `forwarder check` shows
//! every mistake, not only the first.

use std::fmt;
use std::sync::Arc;

/// A place in a file: 1-based line and column (columns count characters).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub fn new(file: &Arc<str>, line: u32, col: u32) -> Pos {
        Pos {
            file: file.clone(),
            line,
            col,
        }
    }

    /// The same line, `cols` characters further right.
    pub fn shifted(&self, cols: usize) -> Pos {
        Pos {
            file: self.file.clone(),
            line: self.line,
            col: self
                .col
                .saturating_add(u32::try_from(cols).unwrap_or(u32::MAX)),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// One mistake in a rule file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub pos: Pos,
    /// The route the mistake belongs to, if any.
    pub alias: Option<String>,
    /// The field, dotted for nested ones (`timeouts.udp_idle`).
    pub field: Option<String>,
    /// What was found, ready to print (values are in backticks).
    pub found: String,
    /// What would have been accepted.
    pub allowed: String,
    /// More help: a "did you mean", or where the other half of a conflict is.
    pub hint: Option<String>,
}

impl ConfigError {
    pub fn new(pos: &Pos, found: impl Into<String>, allowed: impl Into<String>) -> ConfigError {
        ConfigError {
            pos: pos.clone(),
            alias: None,
            field: None,
            found: found.into(),
            allowed: allowed.into(),
            hint: None,
        }
    }

    pub fn alias(mut self, alias: Option<&str>) -> ConfigError {
        self.alias = alias.map(str::to_owned);
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> ConfigError {
        self.field = Some(field.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> ConfigError {
        self.hint = Some(hint.into());
        self
    }

    pub fn maybe_hint(mut self, hint: Option<String>) -> ConfigError {
        self.hint = hint;
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.pos)?;
        match (&self.alias, &self.field) {
            (Some(a), Some(field)) => write!(f, "alias `{a}`, field `{field}`: ")?,
            (Some(a), None) => write!(f, "alias `{a}`: ")?,
            (None, Some(field)) => write!(f, "`{field}`: ")?,
            (None, None) => {}
        }
        write!(f, "found {}; allowed {}", self.found, self.allowed)?;
        if let Some(hint) = &self.hint {
            write!(f, "; {hint}")?;
        }
        Ok(())
    }
}

/// Every mistake found in a rule file and the files it includes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Errors {
    list: Vec<ConfigError>,
}

impl Errors {
    pub(crate) fn from_vec(list: Vec<ConfigError>) -> Errors {
        Errors { list }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.list.iter()
    }
}

impl<'a> IntoIterator for &'a Errors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;
    fn into_iter(self) -> Self::IntoIter {
        self.list.iter()
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.list.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

/// Something accepted but not used: a Godoxy field that does not apply to
/// streams, an http route, a label for another tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub pos: Pos,
    pub alias: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.pos)?;
        match (&self.alias, &self.field) {
            (Some(a), Some(field)) => write!(f, "alias `{a}`, field `{field}`: ")?,
            (Some(a), None) => write!(f, "alias `{a}`: ")?,
            (None, Some(field)) => write!(f, "`{field}`: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// Errors and warnings gathered while a file is read.
#[derive(Debug, Default)]
pub(crate) struct Diag {
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<Warning>,
}

impl Diag {
    pub fn error(&mut self, e: ConfigError) {
        self.errors.push(e);
    }

    pub fn warn(&mut self, pos: &Pos, alias: Option<&str>, field: Option<&str>, message: String) {
        self.warnings.push(Warning {
            pos: pos.clone(),
            alias: alias.map(str::to_owned),
            field: field.map(str::to_owned),
            message,
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The errors, each file's in order of line and column; files in the
    /// order they were first named.
    pub fn into_errors(self) -> Errors {
        let mut order: Vec<Arc<str>> = Vec::new();
        for e in &self.errors {
            if !order.contains(&e.pos.file) {
                order.push(e.pos.file.clone());
            }
        }
        let mut list = self.errors;
        list.sort_by_key(|e| {
            let file = order.iter().position(|f| *f == e.pos.file).unwrap_or(0);
            (file, e.pos.line, e.pos.col)
        });
        list.dedup();
        Errors::from_vec(list)
    }
}

/// A value as printed in messages: in backticks, on one line, not too long.
pub(crate) fn quoted(value: &str) -> String {
    const MAX: usize = 60;
    let mut out = String::with_capacity(value.len().min(MAX) + 2);
    out.push('`');
    for (n, c) in value.chars().enumerate() {
        if n == MAX {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('`');
    out
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub(crate) fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    let near = candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c);
    // A cut-short name (`alias` for `aliases`) is a typo too.
    let lower = word.to_ascii_lowercase();
    near.or_else(|| {
        candidates
            .iter()
            .find(|c| lower.len() >= 3 && c.starts_with(lower.as_str()))
            .copied()
    })
}

/// "did you mean `x`?" for the closest candidate, if any.
pub(crate) fn did_you_mean(word: &str, candidates: &[&str]) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// Edit distance counting insertions, deletions, substitutions and swaps of
/// neighbours (optimal string alignment), ASCII case folded.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_lowercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        d[i * w] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = best;
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("port", "port"), 0);
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("scheem", "scheme"), 1);
        assert_eq!(edit_distance("hst", "host"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn edit_distance_known_answers() {
        // Textbook pairs, both ways round: the distance is symmetric.
        for (a, b, d) in [
            ("kitten", "sitting", 3),
            ("abcdef", "ab", 4),
            ("flaw", "lawn", 2),
            ("ca", "abc", 3), // optimal string alignment, not Damerau's 2
            ("PORT", "port", 0),
            ("backends", "bakcend", 2),
            // Swaps late in the word, where `j - 2` and `j / 2` differ.
            ("abced", "abcde", 1),
            ("scheme", "schmee", 1),
        ] {
            assert_eq!(edit_distance(a, b), d, "{a} -> {b}");
            assert_eq!(edit_distance(b, a), d, "{b} -> {a}");
        }
    }

    #[test]
    fn quoted_shows_controls_and_cuts_long_values() {
        assert_eq!(quoted("a\nb\tc\u{7}d"), "`a\\nb\\tc?d`");
        let long = "x".repeat(61);
        assert_eq!(quoted(&long), format!("`{}…`", "x".repeat(60)));
        assert_eq!(quoted(&long[..60]), format!("`{}`", "x".repeat(60)));
    }

    #[test]
    fn closest_ignores_far_words() {
        let fields = ["scheme", "host", "port", "bind"];
        assert_eq!(closest("hots", &fields), Some("host"));
        assert_eq!(closest("shceme", &fields), Some("scheme"));
        assert_eq!(closest("colour", &fields), None);
        // Six letters allow two edits; four allow one.
        assert_eq!(closest("shceem", &fields), Some("scheme"));
        assert_eq!(closest("hsot", &fields), Some("host"));
        assert_eq!(closest("hzzt", &fields), None);
    }

    #[test]
    fn errors_come_by_file_in_the_order_first_named_then_by_line_and_once() {
        let (main, include): (Arc<str>, Arc<str>) = (Arc::from("main.yaml"), Arc::from("inc.yaml"));
        let at =
            |file: &Arc<str>, line, col| ConfigError::new(&Pos::new(file, line, col), "x", "y");
        let mut diag = Diag::default();
        for e in [
            at(&main, 9, 1),
            at(&include, 1, 4),
            at(&main, 2, 7),
            at(&include, 1, 2),
            at(&main, 9, 1),
        ] {
            diag.error(e);
        }
        let got: Vec<String> = diag
            .into_errors()
            .iter()
            .map(|e| e.pos.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "main.yaml:2:7",
                "main.yaml:9:1",
                "inc.yaml:1:2",
                "inc.yaml:1:4"
            ]
        );
    }

    #[test]
    fn error_display_names_everything() {
        let file: Arc<str> = Arc::from("f.yaml");
        let e = ConfigError::new(&Pos::new(&file, 3, 9), quoted("70000"), "0–65535")
            .alias(Some("game"))
            .field("port")
            .hint("see the docs");
        assert_eq!(
            e.to_string(),
            "f.yaml:3:9: alias `game`, field `port`: found `70000`; allowed 0–65535; see the docs"
        );
    }

    #[test]
    fn quoted_escapes_and_truncates() {
        assert_eq!(quoted("a\nb"), "`a\\nb`");
        assert!(quoted(&"x".repeat(100)).ends_with("…`"));
    }
}
