//! The markdown report: medians, each also as a ratio to direct routing,
//! reasons for missing numbers as footnotes, and the project's targets.
use std::fmt::Write;

use super::measure::{Figure, Note, Samples};
use super::stats::median;

/// One contender's summarised figures.
pub struct Row {
    /// The contender's `--only` name, which the targets refer to.
    pub name: &'static str,
    pub label: &'static str,
    pub samples: Samples,
}

impl Row {
    /// The median, if any run gave a number.
    pub fn value(&self, figure: Figure) -> Option<f64> {
        median(self.samples.values.get(&figure).map_or(&[], Vec::as_slice))
    }
}

fn format_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

/// A value with its ratio to the baseline's, when there is one.
fn format_with_ratio(v: f64, baseline: Option<f64>, decimals: usize) -> String {
    match baseline {
        Some(b) if b > 0.0 => format!("{} ({:.2}×)", format_value(v, decimals), v / b),
        _ => format_value(v, decimals),
    }
}

/// Footnotes: each distinct reason once, numbered in order of appearance.
#[derive(Default)]
struct Footnotes(Vec<String>);

impl Footnotes {
    fn mark(&mut self, text: String) -> usize {
        if let Some(i) = self.0.iter().position(|t| *t == text) {
            return i + 1;
        }
        self.0.push(text);
        self.0.len()
    }
}

/// The table; `baseline` is the row every ratio is to.
pub fn table(rows: &[Row], figures: &[Figure], baseline: Option<&Row>) -> String {
    let mut notes = Footnotes::default();
    let mut out = String::from("| contender |");
    for f in figures {
        let _ = write!(out, " {} |", f.header());
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(figures.len()));
    out.push('\n');
    for row in rows {
        let _ = write!(out, "| {} |", row.label);
        for &f in figures {
            let cell = match (row.value(f), row.samples.notes.get(&f)) {
                (Some(v), note) => {
                    let mut text =
                        format_with_ratio(v, baseline.and_then(|b| b.value(f)), f.decimals());
                    // Some runs gave a number, others did not: say why.
                    if let Some(note) = note {
                        let n = notes.mark(format!("some runs: {}", note.text()));
                        let _ = write!(text, " [{n}]");
                    }
                    text
                }
                (None, Some(note)) => {
                    let short = match note {
                        Note::NotApplicable(_) => "n/a",
                        Note::Failed(_) => "failed",
                    };
                    format!("{short} [{}]", notes.mark(note.text()))
                }
                (None, None) => "–".to_string(),
            };
            let _ = write!(out, " {} |", cell.replace('|', "\\|"));
        }
        out.push('\n');
    }
    if !notes.0.is_empty() {
        out.push('\n');
        for (i, text) in notes.0.iter().enumerate() {
            let _ = writeln!(out, "[{}] {}  ", i + 1, text.replace('\n', " "));
        }
    }
    out
}

/// A goal of the project: `contender`'s `figure` against `reference`'s.
struct Target {
    what: &'static str,
    figure: Figure,
    contender: &'static str,
    reference: &'static str,
    /// The ratio must be at least this (or at most, for `lower_is_better`).
    bound: f64,
    lower_is_better: bool,
}

const TARGETS: &[Target] = &[
    Target {
        what: "relay TCP ≥ 1.1× nginx stream",
        figure: Figure::TcpGbps,
        contender: "relay",
        reference: "nginx",
        bound: 1.1,
        lower_is_better: false,
    },
    Target {
        what: "TC+XDP TCP ≥ 1.0× direct",
        figure: Figure::TcpGbps,
        contender: "xdp",
        reference: "direct",
        bound: 1.0,
        lower_is_better: false,
    },
    Target {
        what: "TC+XDP UDP pps ≥ 1.0× direct",
        figure: Figure::UdpKpps,
        contender: "xdp",
        reference: "direct",
        bound: 1.0,
        lower_is_better: false,
    },
    Target {
        what: "TC+XDP CPU per UDP packet ≤ 0.8× nftables",
        figure: Figure::UdpCpu,
        contender: "xdp",
        reference: "nftables",
        bound: 0.8,
        lower_is_better: true,
    },
];

/// One line per target: met, missed, or why it was not measured.
pub fn targets(rows: &[Row]) -> String {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let mut out = String::new();
    for t in TARGETS {
        let value = |name: &str| find(name).and_then(|r| r.value(t.figure));
        let verdict = match (value(t.contender), value(t.reference)) {
            (Some(v), Some(r)) if r > 0.0 => {
                let ratio = v / r;
                let met = if t.lower_is_better {
                    ratio <= t.bound
                } else {
                    ratio >= t.bound
                };
                format!("{} ({ratio:.2}×)", if met { "met" } else { "missed" })
            }
            _ => {
                let missing = [t.contender, t.reference]
                    .into_iter()
                    .filter(|n| value(n).is_none())
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("not measured (no figure for {missing})")
            }
        };
        let _ = writeln!(out, "- {}: {verdict}", t.what);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &'static str, figures: &[(Figure, &[f64])]) -> Row {
        let mut samples = Samples::default();
        for (f, values) in figures {
            for v in *values {
                samples.record(*f, Ok(*v));
            }
        }
        Row {
            name,
            label: name,
            samples,
        }
    }

    #[test]
    fn renders_medians_ratios_and_footnotes() {
        let direct = row("direct", &[(Figure::TcpGbps, &[10.0, 9.0, 11.0])]);
        let mut nginx = row("nginx", &[(Figure::TcpGbps, &[5.0])]);
        nginx
            .samples
            .record(Figure::UdpKpps, Err(Note::Failed("iperf3: timeout".into())));
        let mut haproxy = row("haproxy", &[(Figure::TcpGbps, &[4.0, 6.0])]);
        haproxy.samples.record(
            Figure::UdpKpps,
            Err(Note::NotApplicable("HAProxy has no UDP proxy".into())),
        );
        let rows = [direct, nginx, haproxy];
        let text = table(&rows, &[Figure::TcpGbps, Figure::UdpKpps], Some(&rows[0]));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "| contender | TCP Gbit/s | UDP 64 B kpps |");
        assert_eq!(lines[1], "|---|---:|---:|");
        assert_eq!(lines[2], "| direct | 10.00 (1.00×) | – |");
        assert_eq!(lines[3], "| nginx | 5.00 (0.50×) | failed [1] |");
        assert_eq!(lines[4], "| haproxy | 5.00 (0.50×) | n/a [2] |");
        assert_eq!(lines[6], "[1] failed: iperf3: timeout  ");
        assert_eq!(lines[7], "[2] n/a (HAProxy has no UDP proxy)  ");
    }

    #[test]
    fn a_partly_failed_figure_shows_its_median_and_the_reason() {
        let mut r = row("relay", &[(Figure::ConnPerSec, &[1000.0])]);
        r.samples
            .record(Figure::ConnPerSec, Err(Note::Failed("reset | x".into())));
        let text = table(&[r], &[Figure::ConnPerSec], None);
        assert!(text.contains("| relay | 1000 [1] |"), "{text}");
        assert!(text.contains("[1] some runs: failed: reset | x"), "{text}");
    }

    #[test]
    fn targets_say_met_missed_or_not_measured() {
        let rows = [
            row(
                "direct",
                &[(Figure::TcpGbps, &[10.0]), (Figure::UdpKpps, &[100.0])],
            ),
            row("nftables", &[(Figure::UdpCpu, &[1000.0])]),
            row("nginx", &[(Figure::TcpGbps, &[5.0])]),
            row("relay", &[(Figure::TcpGbps, &[6.0])]),
            row(
                "xdp",
                &[(Figure::TcpGbps, &[9.0]), (Figure::UdpCpu, &[700.0])],
            ),
        ];
        let text = targets(&rows);
        assert!(
            text.contains("- relay TCP ≥ 1.1× nginx stream: met (1.20×)"),
            "{text}"
        );
        assert!(
            text.contains("- TC+XDP TCP ≥ 1.0× direct: missed (0.90×)"),
            "{text}"
        );
        assert!(
            text.contains("UDP pps ≥ 1.0× direct: not measured (no figure for xdp)"),
            "{text}"
        );
        assert!(text.contains("≤ 0.8× nftables: met (0.70×)"), "{text}");
    }
}
