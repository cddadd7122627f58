//! The two load shapes.
//!
//! - **Closed loop** (max throughput): `concurrency` workers, each sending its next request as soon
//!   as the previous one is answered.
//! - **Open loop** (fixed rate): requests are sent on an even schedule (`pacing`), each in its own
//!   task whatever the server is doing, and latency is measured from the intended send time.
//!
//! Both measure a window after a warm-up: server CPU and memory from `/proc` at its start and end,
//! latencies and errors of the requests started in it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::{
    sync::Notify,
    task::JoinSet,
    time::{sleep_until, timeout},
};

use crate::{
    pacing::{Schedule, Wait, wait_for},
    procfs::{self, ProcSample},
    stats::{Recorder, new_histogram},
};

/// What sends request number `seq` and checks its answer: gRPC (`grpc::Workload`) or HTTP
/// (`http::HttpWorkload`). The loops below are the same for both.
pub trait Driver: Send + Sync + 'static {
    fn call(&self, seq: u64) -> impl Future<Output = Result<(), String>> + Send;
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop after this many requests in all (warm-up included), e.g. one per distinct token.
    pub max_requests: Option<u64>,
    pub server_pid: Option<u32>,
    /// Processes that serve the load with the server (the upstream and the ext_authz server
    /// behind Envoy): their CPU time is reported apart, not counted as another process's.
    pub peer_pids: Vec<u32>,
    /// Sample the server's RSS this often during the measured window.
    pub rss_every: Option<Duration>,
}

/// What a run measured.
#[derive(Debug)]
pub struct Measured {
    pub recorder: Recorder,
    pub window: Duration,
    pub server_before: Option<ProcSample>,
    pub server_after: Option<ProcSample>,
    pub generator_cpu: Duration,
    /// CPU time of every process but the server, its peers and the generator (kernel threads
    /// included), and the time stolen by the hypervisor over the window: something else running
    /// disturbs the measurement.
    pub others_cpu: Duration,
    pub machine_steal: Duration,
    /// CPU time of the `peer_pids` over the window.
    pub peers_cpu: Duration,
    /// Open loop: send lag against the schedule (ns).
    pub send_lag: Option<Histogram<u64>>,
    pub unsent: u64,
    /// Open loop: times the in-flight cap made the dispatcher wait.
    pub capped: u64,
    pub max_in_flight: u64,
    pub sent_total: u64,
    pub rss_samples_kib: Vec<u64>,
}

fn server_sample(pid: Option<u32>) -> Result<Option<ProcSample>, String> {
    pid.map(procfs::sample).transpose()
}

/// The counters read at the start and the end of the measured window.
#[derive(Debug, Clone, Default)]
struct Mark {
    server: Option<ProcSample>,
    generator: Duration,
    peers: Duration,
    processes: HashMap<u32, u64>,
    machine: procfs::MachineCpu,
}

impl Mark {
    fn take(options: &RunOptions) -> Result<Self, String> {
        let mut peers = Duration::ZERO;
        for &pid in &options.peer_pids {
            peers += procfs::sample(pid)
                .map_err(|e| format!("peer process {pid}: {e}"))?
                .cpu;
        }
        Ok(Self {
            server: server_sample(options.server_pid)?,
            generator: procfs::own_cpu(),
            peers,
            processes: procfs::processes_cpu_ticks(),
            machine: procfs::machine_cpu().unwrap_or_default(),
        })
    }

    /// What everything but the server, its peers and the generator used from `self` to `after`.
    fn others_until(&self, after: &Mark, options: &RunOptions) -> Duration {
        let mut exclude = options.peer_pids.clone();
        exclude.extend(options.server_pid);
        exclude.push(std::process::id());
        let ticks = procfs::others_ticks(&self.processes, &after.processes, &exclude);
        procfs::ticks_to_duration(ticks, procfs::clock_ticks_per_second())
    }
}

struct Shared {
    next: AtomicU64,
    limit: u64,
    stop: AtomicBool,
    measuring: AtomicBool,
}

/// Closed loop with `concurrency` workers.
pub async fn closed_loop<W: Driver>(
    workload: Arc<W>,
    concurrency: usize,
    options: &RunOptions,
) -> Result<Measured, String> {
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        limit: options.max_requests.unwrap_or(u64::MAX),
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
    });
    let mut recorder = Recorder::default();
    let warm_end = Instant::now() + options.warmup;
    let mut finished = false;
    let mut before = Mark::default();
    let mut window_start = Instant::now();
    if options.warmup.is_zero() {
        // Measure from the very first request (the workers have not run yet).
        before = Mark::take(options)?;
        window_start = Instant::now();
        shared.measuring.store(true, Ordering::Relaxed);
    }
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        workers.spawn(worker(Arc::clone(&workload), Arc::clone(&shared)));
    }
    while !finished && !options.warmup.is_zero() {
        tokio::select! {
            _ = sleep_until(warm_end.into()) => break,
            joined = workers.join_next() => match joined {
                Some(r) => { r.map_err(|e| format!("worker failed: {e}"))?; }
                None => finished = true,
            },
        }
    }
    if !options.warmup.is_zero() {
        before = Mark::take(options)?;
        window_start = Instant::now();
        shared.measuring.store(true, Ordering::Relaxed);
    }

    let end = window_start + options.duration;
    let mut rss_samples_kib = Vec::new();
    let mut next_rss = options.rss_every.map(|every| window_start + every);
    let mut stopped = false;
    while !finished {
        tokio::select! {
            _ = sleep_until(end.into()), if !stopped => {
                stopped = true;
                shared.stop.store(true, Ordering::Relaxed);
            }
            _ = sleep_until(next_rss.unwrap_or(end).into()), if next_rss.is_some() && !stopped => {
                if let Some(s) = server_sample(options.server_pid)? {
                    rss_samples_kib.push(s.rss_kib);
                }
                next_rss = next_rss.zip(options.rss_every).map(|(t, every)| t + every);
            }
            joined = workers.join_next() => match joined {
                Some(r) => recorder.merge(&r.map_err(|e| format!("worker failed: {e}"))?),
                None => finished = true,
            },
        }
    }
    closed(
        recorder,
        window_start,
        &before,
        &shared,
        concurrency,
        rss_samples_kib,
        options,
    )
}

/// What a closed loop measured, its window ending now.
fn closed(
    recorder: Recorder,
    window_start: Instant,
    before: &Mark,
    shared: &Shared,
    concurrency: usize,
    rss_samples_kib: Vec<u64>,
    options: &RunOptions,
) -> Result<Measured, String> {
    let window = window_start.elapsed();
    let after = Mark::take(options)?;
    Ok(Measured {
        recorder,
        window,
        server_before: before.server,
        server_after: after.server,
        generator_cpu: after.generator.saturating_sub(before.generator),
        others_cpu: before.others_until(&after, options),
        machine_steal: after.machine.steal.saturating_sub(before.machine.steal),
        peers_cpu: after.peers.saturating_sub(before.peers),
        send_lag: None,
        unsent: 0,
        capped: 0,
        max_in_flight: concurrency as u64,
        sent_total: shared.next.load(Ordering::Relaxed).min(shared.limit),
        rss_samples_kib,
    })
}

/// Closed loop with one generator thread per CPU of `cpus`, each pinned to its CPU and running a
/// single-threaded runtime over connections of its own (`open(i, share)` opens thread `i`'s
/// `share` of `connections`) with its share of the `concurrency` requests in flight: on each
/// core, the generator of the one-core rows. A multi-threaded runtime instead moves connections
/// and calls between its threads, and the server then reads fewer requests per wake-up than with
/// one generator per core (bench/README.md, `a-2core`).
pub fn closed_loop_pinned<W, F, Fut>(
    cpus: &[usize],
    connections: usize,
    open: F,
    concurrency: usize,
    options: &RunOptions,
) -> Result<Measured, String>
where
    W: Driver,
    F: Fn(usize, usize) -> Fut + Sync,
    Fut: Future<Output = Result<W, String>>,
{
    let threads = cpus.len();
    if threads == 0 || threads > concurrency || threads > connections {
        return Err(format!(
            "--pin-threads lists {threads} CPU(s): at least one, and no more than the \
             connections ({connections}) or the requests in flight ({concurrency})"
        ));
    }
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        limit: options.max_requests.unwrap_or(u64::MAX),
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
    });
    // Threads whose connections are open: the warm-up starts once all are.
    let connected = Arc::new(AtomicU64::new(0));
    let share = |total: usize, i: usize| total / threads + usize::from(i < total % threads);
    std::thread::scope(|scope| {
        let open = &open;
        let handles: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(i, &cpu)| {
                let (shared, connected) = (Arc::clone(&shared), Arc::clone(&connected));
                let (conns, in_flight) = (share(connections, i), share(concurrency, i));
                scope.spawn(move || -> Result<Recorder, String> {
                    pin_to(cpu)?;
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot start the runtime: {e}"))?;
                    rt.block_on(async {
                        let workload = Arc::new(open(i, conns).await?);
                        connected.fetch_add(1, Ordering::Relaxed);
                        let mut workers = JoinSet::new();
                        for _ in 0..in_flight {
                            workers.spawn(worker(Arc::clone(&workload), Arc::clone(&shared)));
                        }
                        let mut recorder = Recorder::default();
                        while let Some(joined) = workers.join_next().await {
                            recorder.merge(&joined.map_err(|e| format!("worker failed: {e}"))?);
                        }
                        Ok(recorder)
                    })
                })
            })
            .collect();
        // Whatever ends the run (its end, a thread that failed or reached the request limit, an
        // error reading /proc here), the threads are told to stop before they are joined.
        let measured = (|| {
            let any_done = || {
                handles
                    .iter()
                    .any(std::thread::ScopedJoinHandle::is_finished)
            };
            // Sleeps until `until`, or until a thread has finished (a request limit, an error).
            let nap_until = |until: Instant| {
                while Instant::now() < until && !any_done() {
                    std::thread::sleep((until - Instant::now()).min(Duration::from_millis(10)));
                }
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while (connected.load(Ordering::Relaxed) as usize) < threads && !any_done() {
                if Instant::now() > deadline {
                    return Err("the generator threads did not connect within 30 s".to_owned());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            nap_until(Instant::now() + options.warmup);
            let before = Mark::take(options)?;
            let window_start = Instant::now();
            shared.measuring.store(true, Ordering::Relaxed);
            let end = window_start + options.duration;
            let mut rss_samples_kib = Vec::new();
            let mut next_rss = options.rss_every.map(|every| window_start + every);
            while Instant::now() < end && !any_done() {
                nap_until(next_rss.map_or(end, |at| at.min(end)));
                if let Some(at) = next_rss.filter(|at| Instant::now() >= *at) {
                    if let Some(s) = server_sample(options.server_pid)? {
                        rss_samples_kib.push(s.rss_kib);
                    }
                    next_rss = options.rss_every.map(|every| at + every);
                }
            }
            Ok((before, window_start, rss_samples_kib))
        })();
        shared.stop.store(true, Ordering::Relaxed);
        let mut recorder = Recorder::default();
        let mut failed = None;
        for handle in handles {
            match handle.join() {
                Ok(Ok(thread)) => recorder.merge(&thread),
                Ok(Err(error)) => failed = failed.or(Some(error)),
                Err(_) => failed = failed.or(Some("a generator thread panicked".to_owned())),
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }
        let (before, window_start, rss_samples_kib) = measured?;
        closed(
            recorder,
            window_start,
            &before,
            &shared,
            concurrency,
            rss_samples_kib,
            options,
        )
    })
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: `set` is a plain bit set owned here; `sched_setaffinity` reads `size_of` bytes of
    // it and changes only the calling thread's (pid 0's) affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "cannot pin a generator thread to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

async fn worker<W: Driver>(workload: Arc<W>, shared: Arc<Shared>) -> Recorder {
    let mut recorder = Recorder::default();
    while !shared.stop.load(Ordering::Relaxed) {
        let seq = shared.next.fetch_add(1, Ordering::Relaxed);
        if seq >= shared.limit {
            break;
        }
        let measured = shared.measuring.load(Ordering::Relaxed);
        let sent = Instant::now();
        let result = workload.call(seq).await;
        if measured {
            recorder.record(sent.elapsed(), result);
        }
    }
    recorder
}

/// Open loop at `rate` requests per second, at most `max_in_flight` unanswered at once.
pub async fn open_loop<W: Driver>(
    workload: Arc<W>,
    rate: f64,
    max_in_flight: u64,
    options: &RunOptions,
) -> Result<Measured, String> {
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(Notify::new());
    let limit = options.max_requests.unwrap_or(u64::MAX);

    // Start a little in the future so that the first sends are not already late.
    let start = Instant::now() + Duration::from_millis(5);
    let schedule = Schedule::new(start, rate);
    let warm_end = start + options.warmup;
    let end = warm_end + options.duration;
    // A generator this far behind its schedule gives up sending (and reports what it did not send).
    let give_up = end + Duration::from_secs(1);

    let mut send_lag = new_histogram();
    let mut measuring: Option<(Instant, Mark)> = None;
    let mut rss_samples_kib = Vec::new();
    let mut next_rss: Option<Instant> = None;
    let mut max_seen = 0u64;
    let mut capped = 0u64;
    let mut k = 0u64;
    let mut gave_up = false;
    while k < limit {
        let due = schedule.intended(k);
        if due >= end {
            break;
        }
        let now = Instant::now();
        match wait_for(due, now) {
            Wait::Send => {}
            Wait::Sleep(until) => {
                sleep_until(until.into()).await;
                continue;
            }
            Wait::Spin => {
                tokio::task::yield_now().await;
                continue;
            }
        }
        if now > give_up {
            gave_up = true;
            break;
        }
        if measuring.is_none() && due >= warm_end {
            measuring = Some((Instant::now(), Mark::take(options)?));
            next_rss = options.rss_every.map(|every| Instant::now() + every);
        }
        if let (Some(at), Some(every)) = (next_rss, options.rss_every)
            && now >= at
        {
            if let Some(s) = server_sample(options.server_pid)? {
                rss_samples_kib.push(s.rss_kib);
            }
            next_rss = Some(at + every);
        }
        while in_flight.load(Ordering::Relaxed) >= max_in_flight {
            capped += 1;
            let _ = timeout(Duration::from_millis(10), answered.notified()).await;
        }
        let measured = measuring.is_some();
        if measured {
            send_lag.saturating_record((Instant::now() - due).as_nanos() as u64);
        }
        let current = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        max_seen = max_seen.max(current);
        let (workload, recorder, in_flight, answered) = (
            Arc::clone(&workload),
            Arc::clone(&recorder),
            Arc::clone(&in_flight),
            Arc::clone(&answered),
        );
        tokio::spawn(async move {
            let result = workload.call(k).await;
            // From the intended send time: a stall delays every request due during it.
            let latency = Instant::now() - due;
            if measured {
                recorder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(latency, result);
            }
            in_flight.fetch_sub(1, Ordering::Relaxed);
            answered.notify_one();
        });
        k += 1;
    }
    let due_total = schedule.due_by(end - start).min(limit);
    let unsent = if gave_up {
        due_total.saturating_sub(k)
    } else {
        0
    };
    // Let the requests in flight finish (a stalled server gets 30 s).
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_deadline {
        let _ = timeout(Duration::from_millis(5), answered.notified()).await;
    }
    let still = in_flight.load(Ordering::Relaxed);
    let mut recorder = Arc::try_unwrap(recorder)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_else(|shared| shared.lock().unwrap_or_else(|p| p.into_inner()).clone());
    for _ in 0..still {
        recorder.error("no answer within 30 s after the run".into());
    }
    let Some((window_start, before)) = measuring else {
        return Err("the run ended before the warm-up did: nothing was measured".into());
    };
    let window = window_start.elapsed();
    let after = Mark::take(options)?;
    Ok(Measured {
        recorder,
        window,
        server_before: before.server,
        server_after: after.server,
        generator_cpu: after.generator.saturating_sub(before.generator),
        others_cpu: before.others_until(&after, options),
        machine_steal: after.machine.steal.saturating_sub(before.machine.steal),
        peers_cpu: after.peers.saturating_sub(before.peers),
        send_lag: Some(send_lag),
        unsent,
        capped,
        max_in_flight: max_seen,
        sent_total: k,
        rss_samples_kib,
    })
}

#[cfg(test)]
mod tests {
    //! The engine against an in-process ext_authz server that answers OK: short runs that check
    //! the mechanics (counting, pacing, validation, /proc sampling), not performance.

    use envoy_types::{
        ext_authz::v3::pb::{
            Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse,
            OkHttpResponse,
        },
        pb::google::rpc,
    };
    use tokio::net::TcpListener;
    use tonic::{
        Request, Response, Status,
        transport::{Server, server::TcpIncoming},
    };

    use super::*;
    use crate::{
        grpc::{self, Workload},
        scenario::{self, Rpc, Scenario},
    };

    struct Ok200;

    #[tonic::async_trait]
    impl Authorization for Ok200 {
        async fn check(
            &self,
            _request: Request<CheckRequest>,
        ) -> Result<Response<CheckResponse>, Status> {
            Ok(Response::new(CheckResponse {
                status: Some(rpc::Status::default()),
                dynamic_metadata: None,
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            }))
        }
    }

    async fn serve() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_service(AuthorizationServer::new(Ok200))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        format!("http://{addr}")
    }

    async fn workload(target: &str, scenario: Scenario, payloads: usize) -> Arc<Workload> {
        let channels = grpc::connect(target, 2).await.unwrap();
        let payloads = (0..payloads)
            .map(|i| scenario::encode(Rpc::Check, &scenario.call(), &format!("tok{i}")))
            .collect();
        Arc::new(Workload::new(
            channels,
            Rpc::Check,
            payloads,
            scenario.expect(),
        ))
    }

    fn options(duration_ms: u64) -> RunOptions {
        RunOptions {
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(duration_ms),
            max_requests: None,
            server_pid: Some(std::process::id()),
            peer_pids: Vec::new(),
            rss_every: Some(Duration::from_millis(50)),
        }
    }

    #[tokio::test]
    async fn closed_loop_counts_answers_and_samples_the_server() {
        let target = serve().await;
        let m = closed_loop(workload(&target, Scenario::A, 1).await, 4, &options(200))
            .await
            .unwrap();
        assert!(m.recorder.ok > 0, "{m:?}");
        assert_eq!(m.recorder.errors, 0, "{:?}", m.recorder.error_samples);
        assert!(m.window >= Duration::from_millis(200));
        let (before, after) = (m.server_before.unwrap(), m.server_after.unwrap());
        assert!(after.cpu >= before.cpu);
        assert!(!m.rss_samples_kib.is_empty());
    }

    #[tokio::test]
    async fn peer_processes_are_measured_apart() {
        let target = serve().await;
        // The server under test runs in this process: as a peer, its CPU is the peers'.
        let mut with_peer = options(300);
        with_peer.peer_pids = vec![std::process::id()];
        let m = closed_loop(workload(&target, Scenario::A, 1).await, 4, &with_peer)
            .await
            .unwrap();
        assert!(m.peers_cpu > Duration::ZERO, "{m:?}");
        assert_eq!(
            closed_loop(workload(&target, Scenario::A, 1).await, 4, &options(300))
                .await
                .unwrap()
                .peers_cpu,
            Duration::ZERO
        );
        // A peer that is gone fails the run rather than counting as idle.
        let mut gone = options(100);
        gone.peer_pids = vec![u32::MAX];
        let err = closed_loop(workload(&target, Scenario::A, 1).await, 4, &gone)
            .await
            .unwrap_err();
        assert!(err.contains(&format!("peer process {}", u32::MAX)), "{err}");
    }

    /// The CPUs this thread may run on.
    fn allowed_cpus() -> Vec<usize> {
        // SAFETY: `set` is a plain bit set owned here, filled by `sched_getaffinity`.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
                .collect()
        }
    }

    /// Scenario a's workload on `connections` connections of its own.
    async fn scenario_a(target: &str, connections: usize) -> Result<Workload, String> {
        let channels = grpc::connect(target, connections).await?;
        let payload = scenario::encode(Rpc::Check, &Scenario::A.call(), "tok");
        Ok(Workload::new(
            channels,
            Rpc::Check,
            vec![payload],
            Scenario::A.expect(),
        ))
    }

    /// One thread per CPU listed, pinned to it, each on connections of its own: every thread
    /// sends, the answers are counted once each, a request limit stops them all, and a CPU that
    /// does not exist is an error, not a thread left unpinned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn pinned_threads_each_send_on_their_own_connections() {
        let target = serve().await;
        let cpu = allowed_cpus()[0];
        let opened = Mutex::new(Vec::new());
        let open = |i: usize, connections: usize| {
            let (target, opened) = (&target, &opened);
            async move {
                let pinned = allowed_cpus();
                opened.lock().unwrap().push((i, connections, pinned));
                scenario_a(target, connections).await
            }
        };
        let cpus = [cpu, cpu, cpu];
        let m =
            tokio::task::block_in_place(|| closed_loop_pinned(&cpus, 4, open, 5, &options(200)))
                .unwrap();
        assert!(m.recorder.ok > 0, "{m:?}");
        assert_eq!(m.recorder.errors, 0, "{:?}", m.recorder.error_samples);
        // The warm-up's requests are sent, not recorded.
        assert!(m.sent_total > m.recorder.ok, "{m:?}");
        let mut opened = opened.into_inner().unwrap();
        opened.sort();
        assert_eq!(
            opened,
            vec![(0, 2, vec![cpu]), (1, 1, vec![cpu]), (2, 1, vec![cpu])],
            "each thread pinned, the connections shared out"
        );

        let mut limited = options(60_000);
        limited.max_requests = Some(50);
        let open = |_: usize, connections: usize| scenario_a(&target, connections);
        let started = Instant::now();
        let m =
            tokio::task::block_in_place(|| closed_loop_pinned(&[cpu, cpu], 2, open, 4, &limited))
                .unwrap();
        assert_eq!(m.sent_total, 50);
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the limit ended the run"
        );

        // A server gone while the generator runs (its /proc entry unreadable) ends the run with
        // the error, the threads stopped rather than left sending.
        let mut gone = options(60_000);
        gone.server_pid = Some(u32::MAX);
        let open = |_: usize, connections: usize| scenario_a(&target, connections);
        let started = Instant::now();
        let err = tokio::task::block_in_place(|| closed_loop_pinned(&[cpu], 1, open, 2, &gone))
            .unwrap_err();
        assert!(err.contains(&u32::MAX.to_string()), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not left running"
        );
        // More threads than requests in flight is refused, not rounded up.
        let none = |_: usize, _: usize| async { Err::<Workload, _>("unused".to_owned()) };
        let err =
            tokio::task::block_in_place(|| closed_loop_pinned(&[cpu, cpu], 2, none, 1, &gone))
                .unwrap_err();
        assert!(err.contains("no more than"), "{err}");
        let none = |_: usize, _: usize| async { Err::<Workload, _>("unused".to_owned()) };
        let err = tokio::task::block_in_place(|| {
            closed_loop_pinned(&[libc::CPU_SETSIZE as usize - 1], 1, none, 1, &options(10))
        })
        .unwrap_err();
        assert!(err.contains("cannot pin a generator thread"), "{err}");
    }

    #[tokio::test]
    async fn wrong_answers_are_errors() {
        let target = serve().await;
        // Scenario c expects a STEP_UP; an OK answer is wrong.
        let m = closed_loop(workload(&target, Scenario::C, 1).await, 2, &options(100))
            .await
            .unwrap();
        assert_eq!(m.recorder.ok, 0);
        assert!(m.recorder.errors > 0);
        assert!(m.recorder.error_samples[0].contains("expected a denied response"));
    }

    #[tokio::test]
    async fn max_requests_sends_each_payload_once() {
        let target = serve().await;
        let mut opts = options(5_000);
        opts.max_requests = Some(300);
        opts.warmup = Duration::ZERO;
        let m = closed_loop(workload(&target, Scenario::A, 300).await, 8, &opts)
            .await
            .unwrap();
        assert_eq!(m.sent_total, 300);
        assert_eq!(m.recorder.requests(), 300);
        // It stopped when the payloads ran out, long before the duration.
        assert!(m.window < Duration::from_secs(4));
    }

    #[tokio::test]
    async fn open_loop_holds_its_rate() {
        let target = serve().await;
        let m = open_loop(
            workload(&target, Scenario::A, 1).await,
            2_000.0,
            1_000,
            &options(500),
        )
        .await
        .unwrap();
        assert_eq!(m.recorder.errors, 0, "{:?}", m.recorder.error_samples);
        // 2 000/s over 0.5 s: about 1 000 measured requests, however fast the server answers.
        let n = m.recorder.requests();
        assert!((900..=1_100).contains(&n), "{n} requests");
        assert_eq!(m.unsent, 0);
        assert!(m.send_lag.is_some());
    }
}
