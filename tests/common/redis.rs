//! A real `redis-server` (Debian package `redis-server`, installed by `scripts/setup-peers`) on a
//! loopback port, without persistence, killed on drop. It can be killed and started again on the
//! same port, as an outage. A [`Relay`] stands between a replica and it, as the network does: it
//! can silence the subscriptions crossing it, or cut the replica off altogether.
//!
//! Also what the randomized tests share (`tests/redis_convergence.rs`, `tests/redis_chaos.rs`):
//! their replicas with an admin client, each subject's block as a replica lists it and as Redis
//! holds it, the last-writer-wins oracle, and a `Decide` call that a step-up signal counts.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use stepgate::{
    api::v1::{
        BlockKind, BlockTarget, DecideRequest, ListBlocksRequest, ListBlocksResponse,
        admin_service_client::AdminServiceClient, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};
use tonic::transport::{Channel, Endpoint};

use super::common::{
    self, ADMIN_ROLE, Server, TempPolicy, demo_policy_without_risk, mint, operator_token,
};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// Its folder (a replica's copy of the primary's data, a sentinel's configuration, which it
    /// rewrites), removed on drop: another test's server must not load what this one wrote.
    dir: PathBuf,
}

/// The `redis-server` binary, or a failure saying how to install it.
pub fn redis_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    let usual = PathBuf::from("/usr/bin/redis-server");
    assert!(
        usual.is_file(),
        "redis-server is not installed: run scripts/setup-peers (it installs the Debian package \
         redis-server), or `apt-get install redis-server`"
    );
    usual
}

impl Redis {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_on(super::envoy::free_port())
    }

    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// A replica of the server on `primary`, on a free port.
    pub fn replica_of(primary: u16) -> Self {
        Self::start_with(
            super::envoy::free_port(),
            &["--replicaof", "127.0.0.1", &primary.to_string()],
        )
    }

    /// A Redis Sentinel on a free port, watching the primary on `primary` under the name
    /// `primary`: it takes a primary for down after 1 s without an answer, and fails over alone
    /// (a quorum of one).
    pub fn sentinel_of(primary: u16) -> Self {
        let dir = common::temp_dir("sentinel");
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "sentinel monitor primary 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds primary 1000\n\
                 sentinel failover-timeout primary 3000\n"
            ),
        )
        .expect("writing sentinel.conf");
        let config = config.to_string_lossy().into_owned();
        Self::spawn(dir, super::envoy::free_port(), &[&config, "--sentinel"])
    }

    fn start_with(port: u16, extra: &[&str]) -> Self {
        let mut args = extra.to_vec();
        args.extend(["--save", "", "--appendonly", "no"]);
        Self::spawn(common::temp_dir("redis"), port, &args)
    }

    /// `redis-server` with `args`, on `port` of the loopback, working in `dir` (its own: a
    /// replica's copy of its primary's data must not be loaded by another test's server).
    fn spawn(dir: PathBuf, port: u16, args: &[&str]) -> Self {
        let child = Command::new(redis_binary())
            .args(args)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let redis = Self {
            child: Some(child),
            port,
            dir,
        };
        redis.wait_for_ping();
        redis
    }

    fn wait_for_ping(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether the server answers PING.
    pub fn ping(&self) -> bool {
        self.command("PING\r\n")
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one inline command; the raw reply.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(line.as_bytes()).ok()?;
        let mut buf = [0u8; 64 * 1024];
        let n = stream.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Stops the server without ending it (SIGSTOP): a primary that hangs, and keeps its port
    /// (no other server may take it while a sentinel still knows it).
    pub fn freeze(&self) {
        let pid = self.child.as_ref().expect("a server started here").id();
        let stopped = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(stopped.success(), "kill -STOP {pid}");
    }

    /// Kills the server at once (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command in Redis's protocol (RESP), whatever its arguments hold.
pub fn resp(args: &[&str]) -> String {
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    out
}

/// The field `field` of stepgate's blocks hash as `redis` holds it: (write time in ms, record).
pub fn stored_block(redis: &Redis, field: &str) -> Option<(i64, serde_json::Value)> {
    let reply = redis.command(&resp(&["HGET", "stepgate:blocks", field]))?;
    // A bulk string: `$<length>\r\n<ms>|<record>\r\n`, or `$-1` when there is none.
    let value = reply.split_once("\r\n")?.1.trim_end_matches("\r\n");
    let (at, record) = value.split_once('|')?;
    Some((at.parse().ok()?, serde_json::from_str(record).ok()?))
}

/// The revocation of `subject` as `redis` holds it (its record).
pub fn stored_revocation(redis: &Redis, subject: &str) -> Option<serde_json::Value> {
    let reply = redis.command(&resp(&["HGET", "stepgate:revocations", subject]))?;
    let value = reply.split_once("\r\n")?.1.trim_end_matches("\r\n");
    serde_json::from_str(value.split_once('|')?.1).ok()
}

/// A TCP relay to Redis, standing for the network between one replica and it. It can go silent
/// on the subscriptions passing through it: their connections stay open, but nothing more crosses
/// them either way, as when a load balancer or a NAT on the way drops an idle connection without
/// a word. And it can be cut: every connection through it is closed at once, and a new one is
/// closed as soon as it is accepted, until it is restored (a partition, as the replica sees it).
/// A connection is closed both ways as soon as either end closes it, so that a Redis killed
/// behind the relay is seen as gone at once.
pub struct Relay {
    pub port: u16,
    subscriptions: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    links: Arc<Mutex<Links>>,
}

/// The connections open through a relay, and whether it is cut.
#[derive(Default)]
struct Links {
    cut: bool,
    open: Vec<Link>,
}

/// One connection through a relay: the client's end and Redis's, and whether it has closed.
struct Link {
    client: TcpStream,
    server: TcpStream,
    closed: Arc<AtomicBool>,
}

impl Link {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }
}

impl Relay {
    pub fn start(redis_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let subscriptions: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let links: Arc<Mutex<Links>> = Arc::default();
        let (registry, all) = (Arc::clone(&subscriptions), Arc::clone(&links));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                // Cut: accepted, and closed at once.
                if all.lock().unwrap().cut {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let closed = Arc::new(AtomicBool::new(false));
                let link = Link {
                    client: client.try_clone().unwrap(),
                    server: server.try_clone().unwrap(),
                    closed: Arc::clone(&closed),
                };
                // Noted under the lock `cut` takes: a connection is either closed by the cut or
                // made after it, and then refused.
                {
                    let mut all = all.lock().unwrap();
                    if all.cut {
                        link.close();
                        continue;
                    }
                    all.open.retain(|l| !l.closed.load(Ordering::SeqCst));
                    all.open.push(link);
                }
                let silent = Arc::new(AtomicBool::new(false));
                // Copies `from` to `to` until either closes, then closes both; nothing once
                // `silent`. Client to server, a subscription is told apart by its command.
                let pipe = |mut from: TcpStream, mut to: TcpStream, watch: bool| {
                    let (silent, registry) = (Arc::clone(&silent), Arc::clone(&registry));
                    let closed = Arc::clone(&closed);
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        let mut seen = false;
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if watch && !seen {
                                let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                                if text.contains("\r\nSUBSCRIBE\r\n") {
                                    seen = true;
                                    registry.lock().unwrap().push(Arc::clone(&silent));
                                }
                            }
                            if !silent.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        closed.store(true, Ordering::SeqCst);
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    true,
                );
                pipe(server, client, false);
            }
        });
        Self {
            port,
            subscriptions,
            links,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The subscriptions open now go silent (those made after are not).
    pub fn silence_subscriptions(&self) -> usize {
        let subscriptions = self.subscriptions.lock().unwrap();
        for silent in subscriptions.iter() {
            silent.store(true, Ordering::SeqCst);
        }
        subscriptions.len()
    }

    /// Cuts the replica off: closes every connection open through the relay, and each new one as
    /// soon as it is accepted, until [`Relay::restore`].
    pub fn cut(&self) {
        let mut links = self.links.lock().unwrap();
        links.cut = true;
        for link in links.open.drain(..) {
            link.close();
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.links.lock().unwrap().cut = false;
    }

    pub fn is_cut(&self) -> bool {
        self.links.lock().unwrap().cut
    }
}

// ---------------------------------------------------------------------------------------------
// What the randomized tests share
// ---------------------------------------------------------------------------------------------

/// The demo policy, with the admin API open to the operator, sharing its risk state through the
/// Redis at `url` (directly, or through a relay).
pub fn policy_through(name: &str, url: &str) -> TempPolicy {
    policy_with_signals_through(name, url, "")
}

/// [`policy_through`], with `signals` (the lines of a `risk.signals` section, indented by four
/// spaces) as its risk signals.
pub fn policy_with_signals_through(name: &str, url: &str, signals: &str) -> TempPolicy {
    let mut text = demo_policy_without_risk()
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
        + &format!("risk:\n  store: {url}\n");
    if !signals.is_empty() {
        text += "  signals:\n";
        text += signals;
    }
    TempPolicy::new(name, &text)
}

/// A small, seeded pseudo-random source (SplitMix64).
pub struct Random(pub u64);

impl Random {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The seeds a randomized test runs: the fixed ones, else `<prefix>_SEED=<n>` alone, or
/// `<prefix>_RUNS=<n>` fresh ones.
pub fn seeds(prefix: &str, fixed: &[u64]) -> Vec<u64> {
    if let Ok(seed) = std::env::var(format!("{prefix}_SEED")) {
        return vec![
            seed.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{prefix}_SEED: a number")),
        ];
    }
    if let Ok(runs) = std::env::var(format!("{prefix}_RUNS")) {
        let runs: u64 = runs
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{prefix}_RUNS: a number"));
        let mut random = Random(now_ms() as u64);
        return (0..runs).map(|_| random.below(1 << 48)).collect();
    }
    fixed.to_vec()
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A request to the admin API as the operator.
pub fn as_operator<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", operator_token()).parse().unwrap(),
    );
    request
}

pub fn target(subject: &str) -> Option<BlockTarget> {
    Some(BlockTarget {
        kind: BlockKind::Subject as i32,
        value: subject.to_owned(),
    })
}

/// One replica: its server, admin client and decision client.
pub struct Replica {
    pub server: Server,
    pub admin: AdminServiceClient<Channel>,
    pub decide: DecisionServiceClient<Channel>,
}

/// A replica on `policy`, with an admin listener and metrics.
pub async fn replica(policy: &TempPolicy) -> Replica {
    let (server, admin_url) = common::serve_with_admin(&policy.path, true).await;
    let admin = Endpoint::from_shared(admin_url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let decide = DecisionServiceClient::new(server.channel().await);
    Replica {
        server,
        admin: AdminServiceClient::new(admin),
        decide,
    }
}

/// What holds a subject: the reason id and end of its block, or none.
pub type Held = Option<(String, i64)>;

/// A replica's blocks and revocations, from its admin API's list.
pub async fn listed(replica: &Replica) -> ListBlocksResponse {
    replica
        .admin
        .clone()
        .list_blocks(as_operator(ListBlocksRequest {}))
        .await
        .expect("ListBlocks answers")
        .into_inner()
}

/// Each subject's block in a list.
pub fn blocks_listed(listed: &ListBlocksResponse, subjects: &[String]) -> Vec<Held> {
    subjects
        .iter()
        .map(|subject| {
            listed
                .blocks
                .iter()
                .find(|b| {
                    b.target
                        .as_ref()
                        .is_some_and(|t| t.kind == BlockKind::Subject as i32 && t.value == *subject)
                })
                .map(|b| (b.reason_id.clone(), b.expires_at))
        })
        .collect()
}

/// Each subject's block in a replica's view, from its admin API's list.
pub async fn replica_view(replica: &Replica, subjects: &[String]) -> Vec<Held> {
    blocks_listed(&listed(replica).await, subjects)
}

/// Each subject's block as Redis holds it: a lift, or a block over, holds none.
pub fn store_view(redis: &Redis, subjects: &[String]) -> Vec<Held> {
    let now = now_ms() / 1000;
    subjects
        .iter()
        .map(|subject| {
            let (_, record) = stored_block(redis, &format!("subject|{subject}"))?;
            let expires_at = record["expires_at"].as_i64()?;
            (record["removed"] != true && expires_at > now).then(|| {
                (
                    record["reason_id"].as_str().unwrap_or("").to_owned(),
                    expires_at,
                )
            })
        })
        .collect()
}

/// Every replica's view and the store's, as said in a failure.
pub fn describe(views: &[Vec<Held>], store: &[Held], subjects: &[String]) -> String {
    let mut said = String::new();
    for (i, subject) in subjects.iter().enumerate() {
        said += &format!("  {subject}: store {:?}", store[i]);
        for (r, view) in views.iter().enumerate() {
            said += &format!(", replica {r} {:?}", view[i]);
        }
        said += "\n";
    }
    said
}

/// The replicas' log lines that name one of `subjects`, each with its replica's number.
pub fn lines_about(replicas: &[Replica], subjects: &[String]) -> Vec<String> {
    replicas
        .iter()
        .enumerate()
        .flat_map(|(r, replica)| {
            replica
                .server
                .logs()
                .into_iter()
                .filter(|l| subjects.iter().any(|s| l.contains(s.as_str())))
                .map(move |l| format!("  replica {r}: {l}"))
        })
        .collect()
}

/// How many replicas have subscribed to the replicas' channel.
pub fn subscribed(redis: &Redis) -> usize {
    // `*2\r\n$16\r\nstepgate:changes\r\n:<subscribers>\r\n`
    redis
        .command(&resp(&["PUBSUB", "NUMSUB", "stepgate:changes"]))
        .and_then(|reply| reply.trim_end().rsplit_once(':')?.1.parse().ok())
        .unwrap_or(0)
}

/// Waits until `count` replicas have subscribed to the replicas' channel; false after `within`.
pub async fn subscribed_within(redis: &Redis, count: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while subscribed(redis) < count {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// Waits until `count` replicas have subscribed to the replicas' channel.
pub async fn until_subscribed(redis: &Redis, count: usize) {
    assert!(
        subscribed_within(redis, count, Duration::from_secs(15)).await,
        "{count} replicas did not reconnect"
    );
}

pub async fn metric(server: &Server, name: &str) -> Option<String> {
    let prefix = format!("{name} ");
    server
        .scrape()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
}

/// Waits until `server` reports the store as up; fails with its log.
pub async fn store_up(server: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    while metric(server, "stepgate_risk_store_up").await.as_deref() != Some("1") {
        assert!(
            Instant::now() < deadline,
            "stepgate_risk_store_up never 1 within {within:?}:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `server` reports the store as down.
pub async fn store_down(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(server, "stepgate_risk_store_up").await.as_deref() != Some("0") {
        assert!(Instant::now() < deadline, "the store never down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `replica`'s `Decide` on a token of `subject` (issued now, or at `iat` with no sign-in time):
/// its outcome and reason.
pub async fn decide_for(replica: &Replica, subject: &str, iat: Option<i64>) -> (i32, String) {
    let mut spec = TokenSpec {
        subject: subject.to_owned(),
        xms_cc: vec!["cp1".into()],
        ..TokenSpec::default()
    };
    if let Some(iat) = iat {
        spec.auth_age = None;
        spec.extra.insert("iat".to_owned(), iat.into());
    }
    let answer = replica
        .decide
        .clone()
        .decide(DecideRequest {
            credential: Some(Credential::Token(mint(&spec))),
            operation: "reports.read".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    (answer.outcome, answer.reason)
}

/// The operation of the demo policy that a token of [`step_up_for`] is asked to step up for: a
/// wire transfer, which needs the authentication context `c1`.
pub const STEP_UP_OPERATION: &str = "payments.wire_transfer";

/// A replica's `Decide` (through its client `decide`) on a wire transfer by `subject`, with a token that lacks the context it
/// needs (and whose client can be asked for it): its outcome, reason, and the reason id of the
/// block that refused it (empty when none did). Unless the subject is blocked, it is a step-up,
/// which a `count: step_up` signal counts. The token is issued half a minute ahead (its `iat`
/// and `auth_time`), so that no revocation, which covers at most the current second, refuses it:
/// a revoked token would count against no subject.
pub async fn step_up_for(
    decide: &DecisionServiceClient<Channel>,
    subject: &str,
) -> (i32, String, String) {
    let mut spec = TokenSpec {
        subject: subject.to_owned(),
        xms_cc: vec!["cp1".into()],
        auth_age: Some(-30),
        ..TokenSpec::default()
    };
    spec.extra
        .insert("iat".to_owned(), (now_ms() / 1000 + 30).into());
    let answer = decide
        .clone()
        .decide(DecideRequest {
            credential: Some(Credential::Token(mint(&spec))),
            operation: STEP_UP_OPERATION.into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    (answer.outcome, answer.reason, answer.block)
}

/// Whether `replica`'s `Decide` refuses `subject` as blocked.
pub async fn blocks(replica: &Replica, subject: &str) -> bool {
    decide_for(replica, subject, None).await.1 == "blocked"
}

/// The last-writer-wins oracle, given each write's call as (sent, answered) in unix ms: the
/// writes (by index) that no other one followed strictly, having started after it was answered
/// (and so been stamped later). What is left of a target is the outcome of one of them, and of
/// the last one when it followed all the others.
pub fn newest_writes(calls: &[(i64, i64)]) -> Vec<usize> {
    (0..calls.len())
        .filter(|&i| !calls.iter().any(|(sent, _)| *sent > calls[i].1))
        .collect()
}
