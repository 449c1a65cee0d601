//! `procbroker conformance`: the conformance kit against a subject, its
//! verdicts as lines (or one JSON object), and the exit status.

use anyhow::{Result, bail};
use procbroker::conformance::{self, Options};

/// The command's arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct ConformanceArgs {
    /// Workers of the subject under the broker.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,
    /// Print the report as one JSON object ({subject, workers, passed,
    /// total, checks: [{name, passed, detail, ms}]}) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// The subject: its program and arguments, after `--` (`@self` is this
    /// binary: `-- @self worker conformance`).
    #[arg(last = true, required = true, value_name = "CMD ARGS")]
    pub subject: Vec<String>,
}

/// Runs the kit; an error when a check failed (after the report).
pub fn conformance(args: ConformanceArgs) -> Result<()> {
    let mut subject = args.subject.into_iter();
    let Some(command) = subject.next() else {
        bail!("no subject: give its command after `--`");
    };
    let report = conformance::run(&Options {
        command,
        args: subject.collect(),
        workers: args.workers,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    if !report.all_passed() {
        bail!(
            "{} of {} conformance checks failed",
            report.total - report.passed,
            report.total
        );
    }
    Ok(())
}
