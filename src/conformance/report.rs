//! What the kit found: one verdict per check, printed as lines or JSON.

use serde::Serialize;
use std::time::Duration;

/// A check's verdict: `Ok(detail)` passed, `Err(detail)` failed. The
/// detail is one line that says what was seen.
pub type Verdict = Result<String, String>;

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// The check's name (PROTOCOL.md lists them).
    pub name: &'static str,
    /// Whether it passed.
    pub passed: bool,
    /// What was seen, on one line.
    pub detail: String,
    /// How long the check took, in milliseconds.
    pub ms: u64,
}

impl CheckResult {
    /// A result from a verdict; a detail is kept to its first line.
    pub fn new(name: &'static str, verdict: Verdict, took: Duration) -> Self {
        let (passed, detail) = match verdict {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        let detail = one_line(&detail);
        Self {
            name,
            passed,
            detail,
            ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The subject's command and arguments.
    pub subject: Vec<String>,
    /// Workers of the subject under the broker.
    pub workers: u32,
    /// Checks passed.
    pub passed: usize,
    /// Checks run.
    pub total: usize,
    /// Every check, in the order run.
    pub checks: Vec<CheckResult>,
}

impl Report {
    /// A report of `checks`.
    pub fn new(subject: Vec<String>, workers: u32, checks: Vec<CheckResult>) -> Self {
        Self {
            subject,
            workers,
            passed: checks.iter().filter(|c| c.passed).count(),
            total: checks.len(),
            checks,
        }
    }

    /// Every check passed (and there was at least one).
    pub fn all_passed(&self) -> bool {
        self.total > 0 && self.passed == self.total
    }

    /// One `PASS|FAIL name detail` line per check (names padded to one
    /// width), then `conformance: N/M checks passed`.
    pub fn lines(&self) -> Vec<String> {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut lines: Vec<String> = self
            .checks
            .iter()
            .map(|c| {
                let mark = if c.passed { "PASS" } else { "FAIL" };
                format!("{mark} {:width$} {}", c.name, c.detail)
                    .trim_end()
                    .to_owned()
            })
            .collect();
        lines.push(self.summary());
        lines
    }

    /// The last line: `conformance: N/M checks passed`.
    pub fn summary(&self) -> String {
        format!("conformance: {}/{} checks passed", self.passed, self.total)
    }
}

/// The text on one line: line breaks and tabs become spaces, runs of
/// spaces one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_padded_and_end_with_the_count() {
        let report = Report::new(
            vec!["x".into()],
            2,
            vec![
                CheckResult::new("ping", Ok("answered".into()), Duration::ZERO),
                CheckResult::new(
                    "stream-final-only",
                    Err("got 3\nthen 4".into()),
                    Duration::from_millis(7),
                ),
            ],
        );
        assert_eq!(
            report.lines(),
            [
                "PASS ping              answered",
                "FAIL stream-final-only got 3 then 4",
                "conformance: 1/2 checks passed",
            ]
        );
        assert!(!report.all_passed());
        assert_eq!(report.checks[1].ms, 7);
    }

    #[test]
    fn no_checks_is_not_a_pass() {
        let report = Report::new(Vec::new(), 1, Vec::new());
        assert!(!report.all_passed());
        assert_eq!(report.summary(), "conformance: 0/0 checks passed");
    }

    #[test]
    fn the_json_names_every_field() {
        let report = Report::new(
            vec!["cmd".into(), "arg".into()],
            1,
            vec![CheckResult::new("ping", Ok("ok".into()), Duration::ZERO)],
        );
        let json = serde_json::to_value(&report).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "subject": ["cmd", "arg"], "workers": 1, "passed": 1, "total": 1,
                "checks": [{"name": "ping", "passed": true, "detail": "ok", "ms": 0}]
            })
        );
    }
}
