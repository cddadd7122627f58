//! `stepgate replay`: re-decides recorded decisions under a candidate policy (and a baseline, or
//! the recorded answers) and reports what would change. Exit 0 with a report; 2 for a broken
//! policy or an unreadable records file.

use std::{path::PathBuf, process::ExitCode};

use stepgate::replay::{Replayer, report};

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Decision records (JSON lines, docs/records.md); rotated files too.
    #[arg(long, required = true, num_args = 1..)]
    records: Vec<PathBuf>,
    /// The candidate policy.
    #[arg(long)]
    policy: PathBuf,
    /// The policy to compare against; default: the answers the records hold.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the report as a self-contained HTML page (inline SVG charts, nothing fetched).
    #[arg(long)]
    html: Option<PathBuf>,
}

pub fn run(args: ReplayArgs) -> ExitCode {
    let candidate = match super::load_policy(&args.policy) {
        Ok(policy) => policy,
        Err(err) => return super::config_error(&args.policy, &err),
    };
    let baseline = match &args.baseline {
        None => None,
        Some(path) => match super::load_policy(path) {
            Ok(policy) => Some(policy),
            Err(err) => return super::config_error(path, &err),
        },
    };
    let mut replayer = Replayer::new(&candidate, baseline.as_ref());
    for path in &args.records {
        let fed = std::fs::File::open(path).and_then(|f| {
            replayer.feed(
                &path.display().to_string(),
                std::io::BufReader::with_capacity(1 << 20, f),
            )
        });
        match fed {
            Ok(()) => {}
            Err(e) => {
                eprintln!("stepgate replay: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let replay = replayer.finish();
    let baseline_name = args.baseline.as_ref().map_or_else(
        || "the recorded answers".to_owned(),
        |p| p.display().to_string(),
    );
    if let Some(path) = &args.html {
        let page = stepgate::replay::html::page(
            &replay,
            &baseline_name,
            &args.policy.display().to_string(),
        );
        if let Err(e) = std::fs::write(path, page) {
            eprintln!("stepgate replay: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if args.json {
        super::print_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report::json(&replay, &baseline_name))
                .expect("JSON of plain data")
        ));
    } else {
        super::print_stdout(&report::text(&replay, &baseline_name));
    }
    ExitCode::SUCCESS
}
