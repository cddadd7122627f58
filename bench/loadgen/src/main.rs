//! `loadgen`: the benchmark's load generator. Without a subcommand it runs one load against
//! `--target`; the subcommands are the other steps of `bench/run` (minting token files, waiting for
//! readiness, reading memory, timing one verify, writing the report).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use jsonwebtoken::Algorithm;
use loadgen::{
    grpc::{self, Workload},
    http::{self, HttpWorkload},
    parse_duration, procfs, records,
    report::{self, CacheGauges, MemPoint},
    run::{self, Driver, Measured, RunOptions},
    scenario::{self, Rpc, Scenario, TokenPlan},
    stats::{GeneratorStats, Interference, Percentiles, RunReport, ServerCost},
    tokens, verify,
};
use stepgate::demo::TokenSpec;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Load generator for stepgate's benchmark: gRPC Check and Decide, Cerbos CheckResources, \
             HTTP through Envoy; closed and open loop",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mint distinct valid demo tokens into a file, one per line (for b-*, rss-100k and rss-8k).
    Mint(MintArgs),
    /// Wait until a server reports gRPC health SERVING.
    WaitReady(WaitArgs),
    /// Print a process's RSS and peak RSS (from /proc) as JSON.
    Mem(MemArgs),
    /// Time one signature verification as stepgate does it (jsonwebtoken / aws-lc); JSON.
    Verify(VerifyArgs),
    /// Write the Markdown report of a bench/run from its JSON files.
    Report(ReportArgs),
    /// Serve the upstream of the Envoy rows: an empty 200 to every request (HTTP/1.1 keep-alive).
    Upstream(UpstreamArgs),
    /// Wait until a URL answers 200 to GET (e.g. Envoy's admin /ready).
    WaitHttp(WaitHttpArgs),
    /// Print a loopback TCP port that is free now (for peers that need a fixed port).
    FreePort,
    /// Serve an OTLP/gRPC trace receiver that counts the spans it is sent (row a-traced).
    OtlpSink(OtlpSinkArgs),
    /// Write a week of decision records, each request decided by stepgate's engine under a policy
    /// (the replay rows' input); prints what the file holds as JSON.
    Records(RecordsArgs),
    /// Time one `stepgate replay … --json` given after `--` (wall, CPU, peak RSS, records/s); JSON.
    Replay(ReplayArgs),
    /// Write a policy of `--count` rules whose last one decides scenario a (the rule-index rows),
    /// and time its compilation; JSON.
    Rules(RulesArgs),
}

#[derive(Debug, Args)]
struct RulesArgs {
    #[arg(long)]
    count: usize,
    #[arg(long)]
    out: PathBuf,
    /// The key set the policy's issuer reads (default: the demo's).
    #[arg(long)]
    jwks: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RecordsArgs {
    /// The policy that decides the recorded requests.
    #[arg(long, default_value = "examples/stepgate.yaml")]
    policy: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Distinct signed-in users.
    #[arg(long, default_value_t = 20_000)]
    subjects: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[arg(long)]
    label: String,
    #[arg(long)]
    title: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct UpstreamArgs {
    /// Address to listen on (port 0: any free port; the line `upstream listening on ADDR` on
    /// stderr tells which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(Debug, Args)]
struct OtlpSinkArgs {
    /// Address to listen on (port 0: any free port; the line `otlp sink listening on ADDR` on
    /// stderr tells which).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

#[derive(Debug, Args)]
struct WaitHttpArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Alg {
    Rs256,
    Es256,
}

impl From<Alg> for Algorithm {
    fn from(a: Alg) -> Self {
        match a {
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The server, e.g. http://127.0.0.1:50051.
    #[arg(long, required = true)]
    target: Option<String>,
    /// What to send (see bench/README.md).
    #[arg(long, value_enum, default_value = "a")]
    scenario: Scenario,
    /// The RPC (default: check; decide for scenario e; http for scenario f). `cerbos` sends
    /// Cerbos's CheckResources; `http` sends HTTP/1.1 GETs with the bearer token (to Envoy).
    #[arg(long, value_enum)]
    rpc: Option<Rpc>,
    /// HTTP/2 connections; requests go to them in turn (gRPC only: HTTP/1.1 opens keep-alive
    /// connections as the requests in flight need them).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Closed loop: requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Open loop at this many requests per second (evenly paced) instead of a closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: at most this many requests unanswered at once (reaching it is reported).
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: u64,
    /// The measured window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured window (not recorded).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Stop after this many requests in all, warm-up included (e.g. one per distinct token).
    #[arg(long)]
    max_requests: Option<u64>,
    /// Distinct-token scenarios: read the tokens from this file (`loadgen mint`).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Distinct-token scenarios without --tokens: mint this many.
    #[arg(long, default_value_t = 100_000)]
    distinct: usize,
    /// Read the server's CPU time and memory from /proc/PID.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A process that serves the load with the server (repeatable): the upstream or the
    /// ext_authz server behind Envoy. Its CPU time is reported as the peers' rather than as
    /// another process's disturbing the row.
    #[arg(long = "peer-pid")]
    peer_pids: Vec<u32>,
    /// Sample the server's RSS this often during the measured window (needs --server-pid).
    #[arg(long, value_parser = parse_duration)]
    rss_every: Option<Duration>,
    /// Generator threads (default: the CPUs available; 1 uses a single-threaded runtime).
    #[arg(long, conflicts_with = "pin_threads")]
    threads: Option<usize>,
    /// One generator thread per CPU listed (e.g. `0,1`), each pinned to it with a
    /// single-threaded runtime, its own share of the connections and of the requests in flight:
    /// per core, the one-thread generator (closed-loop gRPC runs only).
    #[arg(long, value_delimiter = ',')]
    pin_threads: Vec<usize>,
    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Row label in reports (default: the scenario).
    #[arg(long)]
    label: Option<String>,
    /// Row title in reports (default: the scenario's description).
    #[arg(long)]
    title: Option<String>,
    /// What serves --target, for reports (default: the target URL).
    #[arg(long)]
    server_name: Option<String>,
    /// Folder with the demo keys (default: examples/demo-keys of this repository).
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct MintArgs {
    #[arg(long, value_enum)]
    alg: Alg,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    out: PathBuf,
    /// Token lifetime.
    #[arg(long, default_value = "1440m", value_parser = parse_duration)]
    lifetime: Duration,
    /// Add a claim `profile` of this many characters to every token (8192 for scenario rss-8k).
    #[arg(long, default_value_t = 0)]
    claim_bytes: usize,
    /// Signing threads (default: the CPUs available).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct WaitArgs {
    #[arg(long)]
    target: String,
    /// The health service name ("" is the whole server).
    #[arg(long, default_value = "")]
    service: String,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Args)]
struct MemArgs {
    #[arg(long)]
    pid: u32,
    #[arg(long, default_value = "server")]
    label: String,
    /// Also read stepgate's token-cache gauges from its Prometheus endpoint, e.g.
    /// http://127.0.0.1:9464/metrics (`serve --metrics-listen`).
    #[arg(long)]
    metrics_url: Option<String>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[arg(long, value_enum, default_value = "rs256")]
    alg: Alg,
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// Folder with the run's JSON files.
    #[arg(long)]
    dir: PathBuf,
    /// The Markdown file to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "stepgate benchmark")]
    title: String,
    /// `key=value` lines for the header (repeatable).
    #[arg(long = "meta", value_parser = parse_meta)]
    meta: Vec<(String, String)>,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or("expected key=value")?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run_load(cli.run),
        Some(Command::Mint(a)) => mint(a),
        Some(Command::WaitReady(a)) => runtime(1)
            .and_then(|rt| rt.block_on(grpc::wait_serving(&a.target, &a.service, a.timeout))),
        Some(Command::Mem(a)) => mem_point(a).and_then(|m| print_json(&m)),
        Some(Command::Verify(a)) => {
            let keys = a.keys_dir.unwrap_or_else(tokens::default_keys_dir);
            verify::measure(&keys, a.alg.into(), a.duration).and_then(|c| print_json(&c))
        }
        Some(Command::Report(a)) => report::load(&a.dir).and_then(|mut input| {
            input.title = a.title;
            input.meta = a.meta;
            std::fs::write(&a.out, report::render(&input))
                .map_err(|e| format!("writing {}: {e}", a.out.display()))
        }),
        Some(Command::Upstream(a)) => {
            runtime(1).and_then(|rt| rt.block_on(http::serve_upstream(a.listen)))
        }
        Some(Command::WaitHttp(a)) => {
            runtime(1).and_then(|rt| rt.block_on(http::wait_ok(&a.url, a.timeout)))
        }
        Some(Command::OtlpSink(a)) => {
            runtime(1).and_then(|rt| rt.block_on(loadgen::otlp::serve(a.listen)))
        }
        Some(Command::Records(a)) => write_records(a).and_then(|s| print_json(&s)),
        Some(Command::Replay(a)) => {
            records::time_replay(&a.label, &a.title, &a.command).and_then(|r| print_json(&r))
        }
        Some(Command::Rules(a)) => {
            let jwks = a
                .jwks
                .unwrap_or_else(|| tokens::default_keys_dir().join("jwks.json"));
            loadgen::rules::write(a.count, &jwks, &a.out).and_then(|r| print_json(&r))
        }
        Some(Command::FreePort) => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| println!("{}", a.port()))
            .map_err(|e| format!("binding 127.0.0.1:0: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_records(args: RecordsArgs) -> Result<records::RecordsSummary, String> {
    let file = stepgate::config::load(&args.policy)
        .map_err(|e| format!("{}: {e}", args.policy.display()))?;
    let base = args.policy.parent().unwrap_or(std::path::Path::new("."));
    let policy = stepgate::policy::compile(&file, base)
        .map_err(|e| format!("{}: {e}", args.policy.display()))?;
    let keys = args.keys_dir.unwrap_or_else(tokens::default_keys_dir);
    records::generate(
        &policy,
        &keys,
        &args.out,
        args.count,
        args.subjects,
        args.seed,
    )
}

fn mem_point(args: MemArgs) -> Result<MemPoint, String> {
    let sample = procfs::sample(args.pid)?;
    let token_cache = match &args.metrics_url {
        Some(url) => {
            let text = runtime(1)?.block_on(http::get_text(url, Duration::from_secs(5)))?;
            Some(CacheGauges::parse(&text)?)
        }
        None => None,
    };
    Ok(MemPoint {
        label: args.label,
        rss_mib: procfs::kib_to_mib(sample.rss_kib),
        peak_rss_mib: procfs::kib_to_mib(sample.hwm_kib),
        token_cache,
    })
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn mint(args: MintArgs) -> Result<(), String> {
    let keys = args.keys_dir.unwrap_or_else(tokens::default_keys_dir);
    let spec = TokenSpec {
        lifetime: args.lifetime.as_secs() as i64,
        ..TokenSpec::default()
    };
    let started = Instant::now();
    let threads = args.threads.unwrap_or_else(available_cpus);
    let minted = tokens::mint_distinct(
        &keys,
        &spec,
        args.alg.into(),
        args.count,
        args.claim_bytes,
        threads,
    )?;
    tokens::write_token_file(&args.out, &minted)?;
    eprintln!(
        "minted {} {:?} tokens into {} in {:.1} s",
        minted.len(),
        Algorithm::from(args.alg),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_load(args: RunArgs) -> Result<(), String> {
    let target = args.target.clone().ok_or("--target is required")?;
    let scenario = args.scenario;
    let rpc = args.rpc.unwrap_or(scenario.default_rpc());
    scenario.supports(rpc)?;
    if args.rss_every.is_some() && args.server_pid.is_none() {
        return Err("--rss-every needs --server-pid".into());
    }
    let keys = args
        .keys_dir
        .clone()
        .unwrap_or_else(tokens::default_keys_dir);
    let call = scenario.call();
    let threads = args.threads.unwrap_or_else(available_cpus);

    // Every request body is built and encoded once, before the load starts.
    let payloads: Vec<bytes::Bytes> = match scenario.tokens() {
        TokenPlan::None => vec![scenario::encode_anonymous(rpc, &call)?],
        TokenPlan::NoneFromSources(count) => {
            if rpc != Rpc::Check {
                return Err(format!("scenario {} is Check only", scenario.name()));
            }
            scenario::envoy_check_anonymous_from(&call, count)
        }
        TokenPlan::One { spec, alg, tamper } => {
            let token = tokens::mint(&keys, &spec, alg)?;
            let token = if tamper {
                tokens::tamper_signature(&token)
            } else {
                token
            };
            vec![scenario::encode(rpc, &call, &token)]
        }
        TokenPlan::Distinct {
            spec,
            alg,
            claim_bytes,
        } => {
            let list = match &args.tokens {
                Some(path) => {
                    let list = tokens::read_token_file(path)?;
                    // A file of ordinary tokens would make a fat-token row measure nothing.
                    let payload = tokens::payload_bytes(&list[0]).unwrap_or(0);
                    if payload < claim_bytes {
                        return Err(format!(
                            "{}: its first token carries {payload} bytes of claims; scenario {} \
                             needs over {claim_bytes} (loadgen mint --claim-bytes {claim_bytes})",
                            path.display(),
                            scenario.name()
                        ));
                    }
                    list
                }
                None => {
                    eprintln!("minting {} distinct {alg:?} tokens…", args.distinct);
                    tokens::mint_distinct(&keys, &spec, alg, args.distinct, claim_bytes, threads)?
                }
            };
            // Each token is dropped once encoded: with 8 KiB of claims, the tokens and their
            // requests are over a gigabyte each.
            list.into_iter()
                .map(|t| scenario::encode(rpc, &call, &t))
                .collect()
        }
    };

    let options = RunOptions {
        warmup: args.warmup,
        duration: args.duration,
        max_requests: args.max_requests,
        server_pid: args.server_pid,
        peer_pids: args.peer_pids.clone(),
        rss_every: args.rss_every,
    };
    let measured = if args.pin_threads.is_empty() {
        runtime(threads)?.block_on(async {
            if rpc == Rpc::Http {
                let workload = Arc::new(HttpWorkload::new(&target, &call, payloads)?);
                let distinct = workload.distinct_payloads();
                Ok::<_, String>((drive(workload, &args, &options).await?, distinct))
            } else {
                let channels = grpc::connect(&target, args.connections).await?;
                let workload = Arc::new(Workload::new(channels, rpc, payloads, scenario.expect()));
                let distinct = workload.distinct_payloads();
                Ok((drive(workload, &args, &options).await?, distinct))
            }
        })?
    } else {
        if rpc == Rpc::Http || args.rate.is_some() {
            return Err("--pin-threads is for closed-loop gRPC runs".into());
        }
        // One payload, one frame (`Workload::distinct_payloads`).
        let distinct = payloads.len() as u64;
        let expect = scenario.expect();
        let open = |_: usize, connections: usize| {
            let (target, payloads) = (&target, payloads.clone());
            async move {
                let channels = grpc::connect(target, connections).await?;
                Ok(Workload::new(channels, rpc, payloads, expect))
            }
        };
        let measured = run::closed_loop_pinned(
            &args.pin_threads,
            args.connections,
            open,
            args.concurrency,
            &options,
        )?;
        (measured, distinct)
    };
    let report = build_report(&args, &target, scenario, rpc, measured.0, measured.1);
    eprintln!("{}", report.summary());
    if let Some(path) = &args.out {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if args.json {
        print_json(&report)?;
    }
    if report.requests == 0 {
        return Err("no request was measured".into());
    }
    Ok(())
}

/// The closed or the open loop, whatever carries the requests.
async fn drive<W: Driver>(
    workload: Arc<W>,
    args: &RunArgs,
    options: &RunOptions,
) -> Result<Measured, String> {
    match args.rate {
        Some(rate) => run::open_loop(workload, rate, args.max_in_flight, options).await,
        None => run::closed_loop(workload, args.concurrency, options).await,
    }
}

fn build_report(
    args: &RunArgs,
    target: &str,
    scenario: Scenario,
    rpc: Rpc,
    m: Measured,
    distinct: u64,
) -> RunReport {
    let seconds = m.window.as_secs_f64();
    let requests = m.recorder.requests();
    let server = match (args.server_pid, m.server_before, m.server_after) {
        (Some(pid), Some(before), Some(after)) => {
            let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64();
            Some(ServerCost {
                pid,
                cpu_seconds: cpu,
                cpu_us_per_request: if requests > 0 {
                    cpu * 1e6 / requests as f64
                } else {
                    0.0
                },
                cpu_utilization: cpu / seconds.max(1e-9),
                rss_mib_before: procfs::kib_to_mib(before.rss_kib),
                rss_mib_after: procfs::kib_to_mib(after.rss_kib),
                peak_rss_mib: procfs::kib_to_mib(after.hwm_kib),
            })
        }
        _ => None,
    };
    let (lag_p99, lag_max) = m.send_lag.as_ref().map_or((0.0, 0.0), |h| {
        let p = Percentiles::of(h);
        (p.p99, p.max)
    });
    // Behind: requests never sent, or sends late by more than half a millisecond at p99 (the
    // latencies still count from the intended times, but part of them is then the generator's).
    let fell_behind = m.unsent > 0 || m.capped > 0 || lag_p99 > 0.5;
    RunReport {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| scenario.name().to_owned()),
        title: args
            .title
            .clone()
            .unwrap_or_else(|| scenario.description().to_owned()),
        target: args
            .server_name
            .clone()
            .unwrap_or_else(|| target.to_owned()),
        url: target.to_owned(),
        rpc: rpc.as_str().to_owned(),
        scenario: scenario.name().to_owned(),
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .to_owned(),
        connections: args.connections,
        concurrency: args.concurrency,
        rate: args.rate,
        warmup_seconds: args.warmup.as_secs_f64(),
        seconds,
        requests,
        errors: m.recorder.errors,
        error_samples: m.recorder.error_samples.clone(),
        throughput_rps: requests as f64 / seconds.max(1e-9),
        latency_ms: Percentiles::of(&m.recorder.latency),
        server,
        generator: GeneratorStats {
            cpu_seconds: m.generator_cpu.as_secs_f64(),
            cpu_utilization: m.generator_cpu.as_secs_f64() / seconds.max(1e-9),
            send_lag_p99_ms: lag_p99,
            send_lag_max_ms: lag_max,
            unsent: m.unsent,
            max_in_flight: m.max_in_flight,
            in_flight_cap_hits: m.capped,
            fell_behind,
            distinct_payloads: distinct,
            payloads_repeated: distinct > 1 && m.sent_total > distinct,
            sent_total: m.sent_total,
        },
        interference: {
            let other = m.others_cpu.as_secs_f64();
            Interference {
                other_cpu_seconds: other,
                other_cpu_utilization: other / seconds.max(1e-9),
                steal_seconds: m.machine_steal.as_secs_f64(),
                peers_cpu_seconds: m.peers_cpu.as_secs_f64(),
            }
        },
        rss_samples_mib: m
            .rss_samples_kib
            .iter()
            .map(|&k| procfs::kib_to_mib(k))
            .collect(),
    }
}
