//! `stepgate test`: runs policy test suites offline against a policy file. Exit 0 when every case
//! passes, 1 when one fails, 2 when the policy or a suite is broken (with the field path).

use std::{path::PathBuf, process::ExitCode};

use stepgate::suite::{self, Runner, report};

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// The policy file under test.
    #[arg(long, short)]
    config: PathBuf,
    /// Suite files (YAML): `cases:` of a request, a caller, a time and the decision expected.
    #[arg(required = true)]
    suites: Vec<PathBuf>,
    /// Also write the results as JUnit XML to this file (for CI systems).
    #[arg(long)]
    junit: Option<PathBuf>,
}

pub fn run(args: TestArgs) -> ExitCode {
    // A report left by an earlier run must not stand for this one if it ends without one. Only
    // a regular file is removed: a link, a FIFO or a device (`/dev/stdout`) is written as before.
    if let Some(path) = &args.junit
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file())
        && let Err(e) = std::fs::remove_file(path)
    {
        eprintln!("stepgate test: removing the old {}: {e}", path.display());
        return ExitCode::from(2);
    }
    let policy = match super::load_policy(&args.config) {
        Ok(policy) => policy,
        Err(err) => return super::config_error(&args.config, &err),
    };
    let mut runner = match Runner::new(policy) {
        Ok(runner) => runner,
        Err(err) => {
            eprintln!("stepgate test: {err}");
            return ExitCode::from(2);
        }
    };
    let mut suites = Vec::new();
    for path in &args.suites {
        let parsed = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|text| suite::parse(path, &text).map_err(|e| e.to_string()))
            .and_then(|s| {
                runner
                    .check(path, &s)
                    .map(|()| s)
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok(s) => suites.push((path, s)),
            Err(err) => {
                eprintln!("stepgate test: invalid suite {err}");
                return ExitCode::from(2);
            }
        }
    }
    let mut results = Vec::new();
    for (path, s) in &suites {
        match runner.run(path, s) {
            Ok(r) => results.extend(r),
            Err(err) => {
                eprintln!("stepgate test: invalid suite {err}");
                return ExitCode::from(2);
            }
        }
    }
    super::print_stdout(&report::text(&results, &runner.uncovered()));
    if let Some(path) = &args.junit
        && let Err(e) = std::fs::write(path, report::junit(&results))
    {
        eprintln!("stepgate test: writing {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if results.iter().all(|r| r.passed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
