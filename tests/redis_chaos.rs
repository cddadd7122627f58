//! Three stepgate replicas sharing one real `redis-server`, each reaching it through a network of
//! its own (a relay) that the test cuts and restores: cut, a replica loses every connection to
//! Redis at once and cannot open another. A seeded random sequence of operators' blocks, lifts
//! and revocations on three or four subjects, and of trips of a risk signal, goes to random
//! replicas (their admin APIs, their `Decide`), those cut off included (their changes wait, and
//! are written once they are back), with random pauses between them (none at all, often, so that
//! calls on one subject overlap), and random cuts and restores of the replicas' networks. For
//! half the seeds Redis is also killed in the middle and started again, empty, on the same port.
//! A revocation names no time (every token issued up to now) or a time some tens of minutes back
//! (the tokens of before an incident), so that a revocation made later often covers less than one
//! made before it.
//!
//! The replicas' policy has a `block` signal: a subject stepped up twice within a minute is
//! blocked for ten (reason id `risk.step_ups`, created by `risk:step_ups`). A trip steps a
//! subject up through one replica's `Decide` (a wire transfer with a token that lacks the
//! context it needs), one call after the other, until that replica answers `blocked` or four
//! calls were made: from a count of none, the second call reaches the threshold and the third is
//! refused by the signal's block. Counts are this replica's first, and shared through Redis while
//! it is connected. The trip's tokens are issued half a minute ahead, so that no revocation
//! refuses them (a revoked token counts against no subject). Trips never touch the first subject,
//! which only operators write; the sequence ends, on each other subject, with nothing more, a
//! trip, a lift, or both in either order.
//!
//! Once the sequence is over, every network is restored and Redis is up, and once every replica
//! reports the store up again, what the module docs of `src/risk/redis.rs` and `docs/risk.md`
//! promise is checked, within a few seconds: far less than the 30 s periodic re-read, so that
//! only the replicas' messages and their re-reads of the store on reconnecting count. (Each seed
//! starts with every replica reconnected afresh, so that no periodic re-read falls within it.)
//! - **Agreement.** Every replica holds, for each subject, the same block (the same operation's
//!   or the signal's, by its reason id, ending at the same second) or none, and the same
//!   revocation time or none, and so does Redis. Every replica's `Decide` answers `blocked`
//!   exactly for the blocked subjects.
//! - **Revocations: the one that covers most stays.** Of a subject's revocations, the one with the
//!   latest time is what every replica and Redis hold, whichever was made last, on whichever
//!   replica, cut off or not: a token issued the second before that time is refused
//!   (`session_revoked`) by every replica, and one issued the second after it is allowed. A
//!   revocation that names no time covers the current second, and so stands for the next one.
//! - **Blocks: last writer wins.** Each write is stamped in milliseconds inside its admin call,
//!   so an operation that started after another had returned is the newer write, and the older
//!   one cannot be what is left: the final state of a subject that no trip reached is the outcome
//!   of one of its operations that no later-started one followed strictly, and of the last one
//!   when it followed all the others. A replica that was cut off when a newer write was made, and
//!   changes written while it was away, do not change that.
//!   That holds through a Redis started again without persistence, which has lost every block
//!   and lift: the replicas write back the blocks they hold and the lifts they know of, each at
//!   the time it was written, so a replica that had not heard of a lift (cut off when it was
//!   made) and writes back the block it lifted does not bring it back, and an older write of the
//!   same second that waited out the outage does not beat the newest.
//! - **The signal's blocks.** On a subject trips reached, the rules between operators' writes and
//!   a signal's differ (a signal's block never shortens a block in force, an operator's held-up
//!   block replaces a signal's shorter one, a lift holds the signal off while the counts of
//!   before it last), so what is left is the outcome of one of the operators' newest writes (as
//!   above), or the signal's block: never an older operator's block. And:
//!   - a trip whose own step-ups reached the threshold and that its replica then refused by the
//!     signal's block, made after every operator's block and lift of the subject, leaves it
//!     blocked: by the signal, or by the operators' newest block when that lasts longer;
//!   - an operator's lift made after every other block, lift and trip of the subject leaves it
//!     unblocked.
//!
//! The operators' blocks last two minutes at least, half of them less than twice the signal's
//! ten minutes, so that either may outlast the other; none expires while a sequence is checked.
//!
//! The seeds are fixed, for a repeatable run; every failing seed is said with its plan, what each
//! replica and Redis held, whether the replicas agreed once made to reconnect (and so re-read the
//! store), and the replicas' log lines about its subjects. `STEPGATE_CHAOS_SEED=<n>` runs that
//! seed alone, and `STEPGATE_CHAOS_RUNS=<n>` that many fresh ones. A seed repeats the plan
//! (operations, trips, replicas, pauses, cuts, outage), not the interleaving the machine makes of
//! it.

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use redis_server::{
    Held, Random, Redis, Relay, Replica, STEP_UP_OPERATION, as_operator, blocks_listed, decide_for,
    describe, lines_about, listed, newest_writes, now_ms, policy_with_signals_through, replica,
    resp, step_up_for, store_down, store_up, store_view, stored_revocation, subscribed_within,
    target,
};
use stepgate::api::v1::{BlockRequest, Outcome, RevokeRequest, UnblockRequest};

const SEEDS: [u64; 7] = [1, 2, 3, 4, 5, 6, 7];
const REPLICAS: usize = 3;
/// Operations (blocks, lifts, revocations) in one sequence.
const OPERATIONS: usize = 40;
/// How long the replicas have to agree once connected: far less than the 30 s periodic re-read.
const SETTLE: Duration = Duration::from_secs(5);
/// The periodic re-read of the store, which the check must come well before.
const RESYNC: Duration = Duration::from_secs(30);
/// The replicas' risk signal: a subject stepped up twice within a minute is blocked for ten.
const SIGNAL: &str = "step_ups";
const THRESHOLD: usize = 2;
const SIGNAL_BLOCK_SECONDS: u64 = 600;
/// The most `Decide` calls of a trip: from a count of none, the threshold is reached at the
/// second and the third is refused; a fourth tells a key the replica holds off (an operator's
/// lift) from one it blocks.
const TRIP_CALLS: usize = 4;

/// The `risk.signals` section of the replicas' policy.
fn signals() -> String {
    format!(
        "    {SIGNAL}:\n      count: step_up\n      key: subject\n      window: 1m\n      \
         threshold: {THRESHOLD}\n      action: block\n      block_for: {SIGNAL_BLOCK_SECONDS}s\n"
    )
}

/// The reason id of the signal's blocks.
fn signal_id() -> String {
    format!("risk.{SIGNAL}")
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// Blocks a subject for `ttl` seconds through a replica's admin API.
    Block {
        subject: usize,
        replica: usize,
        ttl: i64,
    },
    /// Lifts a subject's block through a replica's admin API.
    Lift { subject: usize, replica: usize },
    /// Revokes a subject's sessions through a replica's admin API: those issued up to now
    /// (`back` none), or before `back` × 10 minutes ago.
    Revoke {
        subject: usize,
        replica: usize,
        back: Option<i64>,
    },
    /// Steps a subject up through a replica's `Decide`, one call after the other, until the
    /// replica answers `blocked` or [`TRIP_CALLS`] were made: each step-up counts one event of
    /// the signal, which blocks the subject once it reaches its threshold there.
    Trip { subject: usize, replica: usize },
    /// Waits this many milliseconds.
    Pause(u64),
    /// Cuts a replica off Redis.
    Cut(usize),
    /// Restores a replica's way to Redis.
    Restore(usize),
    /// Kills Redis.
    Kill,
    /// Starts Redis again, empty, on the same port, and waits (a little) until a replica that is
    /// not cut off has reconnected.
    Restart,
}

/// The plan of a seed: how many subjects, and its steps in the order they are taken. It ends
/// with every replica's way to Redis restored, Redis up.
fn plan(seed: u64) -> (usize, Vec<Step>) {
    let mut random = Random(seed);
    let subjects = 3 + random.below(2) as usize;
    let outage = random.below(2) == 0;
    // In the second half, so that the newest write of some subjects was made before it; Redis
    // back a few operations later, or once they are all made.
    let kill_at = OPERATIONS / 2 + random.below(OPERATIONS as u64 / 2) as usize;
    let restart_at = kill_at + 1 + random.below(8) as usize;
    let mut cut = [false; REPLICAS];
    let mut steps = Vec::new();
    for i in 0..OPERATIONS {
        if outage && i == kill_at {
            steps.push(Step::Kill);
        }
        if outage && i == restart_at {
            steps.push(Step::Pause(random.below(500)));
            steps.push(Step::Restart);
        }
        // A replica cut off, or one back, now and then: a few operations long, at most.
        match random.below(10) {
            0 | 1 => {
                let r = random.below(REPLICAS as u64) as usize;
                if !cut[r] {
                    cut[r] = true;
                    steps.push(Step::Cut(r));
                }
            }
            2 | 3 => {
                let r = random.below(REPLICAS as u64) as usize;
                if cut[r] {
                    cut[r] = false;
                    steps.push(Step::Restore(r));
                }
            }
            _ => {}
        }
        let subject = random.below(subjects as u64) as usize;
        let replica = random.below(REPLICAS as u64) as usize;
        steps.push(match random.below(13) {
            // Half of them within twice the signal's block, so that either may outlast the
            // other.
            0..4 => Step::Block {
                subject,
                replica,
                ttl: 120
                    + if random.below(2) == 0 {
                        random.below(2 * SIGNAL_BLOCK_SECONDS - 120)
                    } else {
                        random.below(86_400 - 120)
                    } as i64,
            },
            4..7 => Step::Lift { subject, replica },
            7..10 => Step::Revoke {
                subject,
                replica,
                back: (random.below(2) == 0).then(|| 1 + random.below(5) as i64),
            },
            // Never the first subject, which only operators write.
            _ => Step::Trip {
                subject: 1 + random.below(subjects as u64 - 1) as usize,
                replica,
            },
        });
        // None a third of the time (calls in flight together), else up to 150 ms.
        let pause = if random.below(3) == 0 {
            0
        } else {
            random.below(151)
        };
        steps.push(Step::Pause(pause));
    }
    // Last, on each subject trips may reach, one of: nothing more, a trip, a lift, a lift then
    // a trip, or a trip then a lift (each through a random replica): what a subject's last
    // writes leave is checked (a trip the threshold crossed, or a lift).
    for subject in 1..subjects {
        let trip = |random: &mut Random| Step::Trip {
            subject,
            replica: random.below(REPLICAS as u64) as usize,
        };
        let lift = |random: &mut Random| Step::Lift {
            subject,
            replica: random.below(REPLICAS as u64) as usize,
        };
        let coda = match random.below(5) {
            0 => vec![],
            1 => vec![trip(&mut random)],
            2 => vec![lift(&mut random)],
            3 => vec![lift(&mut random), trip(&mut random)],
            _ => vec![trip(&mut random), lift(&mut random)],
        };
        for step in coda {
            steps.push(step);
            steps.push(Step::Pause(random.below(151)));
        }
    }
    if outage && restart_at >= OPERATIONS {
        steps.push(Step::Pause(random.below(500)));
        steps.push(Step::Restart);
    }
    for (r, cut) in cut.iter().enumerate() {
        if *cut {
            steps.push(Step::Restore(r));
        }
    }
    (subjects, steps)
}

/// An operation taken: its step, when its call was sent and answered (unix ms), and for a
/// revocation the range its time falls in (unix seconds: the second after the call's, when it
/// named none) and the time the replica answered it kept (the latest it held).
#[derive(Debug, Clone)]
struct Taken {
    number: usize,
    step: Step,
    sent_ms: i64,
    answered_ms: i64,
    revoked: Option<Revoked>,
    /// For a trip, what each of its `Decide` calls answered: `step-up`, or `blocked by <reason
    /// id>`.
    answers: Vec<String>,
    /// Whether its replica's way to Redis was cut when it was sent. (One restored may still be
    /// waiting to reconnect, its backoff grown while it was cut: its changes wait meanwhile too.)
    cut_off: bool,
}

#[derive(Debug, Clone, Copy)]
struct Revoked {
    /// The earliest and latest time the revocation may have been given.
    from: i64,
    to: i64,
    /// The time of the revocation the replica kept, as it answered.
    kept: i64,
}

impl Taken {
    fn subject(&self) -> usize {
        match self.step {
            Step::Block { subject, .. }
            | Step::Lift { subject, .. }
            | Step::Revoke { subject, .. }
            | Step::Trip { subject, .. } => subject,
            _ => unreachable!("only operations are taken"),
        }
    }

    fn is_block_or_lift(&self) -> bool {
        matches!(self.step, Step::Block { .. } | Step::Lift { .. })
    }

    fn is_trip(&self) -> bool {
        matches!(self.step, Step::Trip { .. })
    }

    /// For a trip: whether its own step-ups reached the threshold, and its replica then refused
    /// the subject by the signal's block (so it set the block, or held it already from a
    /// crossing of those same events elsewhere). A trip refused at once, by a block its replica
    /// held, or whose replica held the key off after an operator's lift, did not.
    fn crossed(&self) -> bool {
        let steps = self.answers.iter().take_while(|a| *a == "step-up").count();
        steps >= THRESHOLD
            && self.answers.get(steps) == Some(&format!("blocked by {}", signal_id()))
    }

    /// Whether it started after `other` was answered (and so, for a write, was stamped later).
    fn follows(&self, other: &Taken) -> bool {
        self.sent_ms > other.answered_ms
    }

    /// What it leaves when it is the newest write: its block (by reason id), or none.
    fn outcome(&self) -> Option<String> {
        matches!(self.step, Step::Block { .. }).then(|| reason_id(self.number))
    }
}

fn reason_id(number: usize) -> String {
    format!("op-{number}")
}

/// What one replica, or Redis, holds of a seed's subjects: each one's block, and its revocation's
/// time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    blocks: Vec<Held>,
    revoked: Vec<Option<i64>>,
}

async fn replica_state(replica: &Replica, subjects: &[String]) -> View {
    let list = listed(replica).await;
    let revoked = subjects
        .iter()
        .map(|s| {
            list.revocations
                .iter()
                .find(|r| r.subject == *s)
                .map(|r| r.before)
        })
        .collect();
    View {
        blocks: blocks_listed(&list, subjects),
        revoked,
    }
}

fn store_state(redis: &Redis, subjects: &[String]) -> View {
    View {
        blocks: store_view(redis, subjects),
        revoked: subjects
            .iter()
            .map(|s| stored_revocation(redis, s).and_then(|r| r["before"].as_i64()))
            .collect(),
    }
}

/// Redis's records of each subject's block and revocation, with their write times (ms), as said
/// in a failure.
fn records(redis: &Redis, subjects: &[String]) -> String {
    let mut said = String::new();
    for subject in subjects {
        let field = format!("subject|{subject}");
        for (hash, key) in [
            ("stepgate:blocks", &field),
            ("stepgate:revocations", subject),
        ] {
            if let Some(reply) = redis.command(&resp(&["HGET", hash, key])) {
                let value = reply.split_once("\r\n").map_or("", |(_, v)| v.trim_end());
                said += &format!("  {hash} {key}: {value}\n");
            }
        }
    }
    said
}

/// Every replica's view and the store's, blocks and revocations, as said in a failure.
fn describe_all(views: &[View], store: &View, subjects: &[String]) -> String {
    let blocks: Vec<Vec<Held>> = views.iter().map(|v| v.blocks.clone()).collect();
    let mut said = format!(
        "blocks:\n{}revocations (time):\n",
        describe(&blocks, &store.blocks, subjects)
    );
    for (i, subject) in subjects.iter().enumerate() {
        said += &format!("  {subject}: store {:?}", store.revoked[i]);
        for (r, view) in views.iter().enumerate() {
            said += &format!(", replica {r} {:?}", view.revoked[i]);
        }
        said += "\n";
    }
    said
}

async fn all_states(replicas: &[Replica], subjects: &[String]) -> Vec<View> {
    let mut views = Vec::new();
    for replica in replicas {
        views.push(replica_state(replica, subjects).await);
    }
    views
}

/// The cluster: the replicas, each one's relay, and Redis.
struct Cluster {
    replicas: Vec<Replica>,
    relays: Vec<Relay>,
    redis: Redis,
}

impl Cluster {
    /// Every replica reconnected afresh (its way to Redis cut until it says the store is down,
    /// then restored), and up: no periodic re-read of the store comes in the 30 s that follow.
    async fn reconnect_all(&self) {
        for relay in &self.relays {
            relay.cut();
        }
        for replica in &self.replicas {
            store_down(&replica.server).await;
        }
        for relay in &self.relays {
            relay.restore();
        }
        for replica in &self.replicas {
            store_up(&replica.server, RESYNC).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_through_partitions_outages_and_revocations() {
    let redis = Redis::start();
    let mut replicas = Vec::new();
    let mut relays = Vec::new();
    for r in 0..REPLICAS {
        let relay = Relay::start(redis.port);
        let policy =
            policy_with_signals_through(&format!("redis-chaos-{r}"), &relay.url(), &signals());
        replicas.push(replica(&policy).await);
        relays.push(relay);
    }
    let mut cluster = Cluster {
        replicas,
        relays,
        redis,
    };
    for replica in &cluster.replicas {
        store_up(&replica.server, Duration::from_secs(10)).await;
    }
    let started = Instant::now();
    let mut failures = Vec::new();
    let seeds = redis_server::seeds("STEPGATE_CHAOS", &SEEDS);
    for &seed in &seeds {
        if let Err(failure) = run(seed, &mut cluster).await {
            eprintln!("seed {seed} FAILED");
            failures.push(failure);
        }
    }
    eprintln!(
        "{} seeds in {:?}, {} failed",
        seeds.len(),
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Runs `seed`'s plan against the cluster and checks what it converges on; what went wrong, said
/// in full. After a divergence every replica has reconnected and re-read the store, so that the
/// next seed starts from replicas that agree.
async fn run(seed: u64, cluster: &mut Cluster) -> Result<(), String> {
    cluster.reconnect_all().await;
    let fresh = Instant::now();
    let port = cluster.redis.port;
    let (count, steps) = plan(seed);
    let subjects: Vec<String> = (0..count).map(|i| format!("chaos{seed}-s{i}")).collect();
    let mut calls = Vec::new();
    let mut number = 0;
    // When Redis was killed and came back (unix ms).
    let mut killed_ms = None;
    for step in &steps {
        match *step {
            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::Cut(r) => cluster.relays[r].cut(),
            Step::Restore(r) => cluster.relays[r].restore(),
            Step::Kill => {
                cluster.redis.kill();
                killed_ms = Some(now_ms());
            }
            Step::Restart => {
                let restarted = tokio::task::spawn_blocking(move || Redis::start_on(port));
                cluster.redis = restarted.await.unwrap();
                // The operations that follow meet the replicas as they reconnect: writing what
                // waited, re-reading the store. (One cut off now reconnects later.)
                if cluster.relays.iter().any(|r| !r.is_cut()) {
                    subscribed_within(&cluster.redis, 1, Duration::from_secs(5)).await;
                }
            }
            Step::Block {
                subject, replica, ..
            }
            | Step::Lift { subject, replica }
            | Step::Revoke {
                subject, replica, ..
            }
            | Step::Trip { subject, replica } => {
                number += 1;
                let (step, number) = (*step, number);
                let mut admin = cluster.replicas[replica].admin.clone();
                let decide = cluster.replicas[replica].decide.clone();
                let subject = subjects[subject].clone();
                let cut_off = cluster.relays[replica].is_cut();
                calls.push(tokio::spawn(async move {
                    let sent_ms = now_ms();
                    let mut revoked = None;
                    let mut answers = Vec::new();
                    match step {
                        Step::Block { ttl, .. } => {
                            let request = BlockRequest {
                                target: target(&subject),
                                reason_id: reason_id(number),
                                reason: String::new(),
                                ttl_seconds: ttl,
                            };
                            admin.block(as_operator(request)).await.map(|_| ())
                        }
                        Step::Lift { .. } => {
                            let request = UnblockRequest {
                                target: target(&subject),
                                reason: String::new(),
                            };
                            admin.unblock(as_operator(request)).await.map(|_| ())
                        }
                        Step::Revoke { back, .. } => {
                            let before = back.map_or(0, |k| sent_ms / 1000 - k * 600);
                            let request = RevokeRequest {
                                subject,
                                before,
                                reason_id: reason_id(number),
                                reason: String::new(),
                            };
                            admin.revoke(as_operator(request)).await.map(|answer| {
                                let kept = answer.into_inner().revocation.map_or(0, |r| r.before);
                                // No time: the second after the call's, as the server read its
                                // clock between the call's start and its answer.
                                let (from, to) = if before == 0 {
                                    (sent_ms / 1000 + 1, now_ms() / 1000 + 1)
                                } else {
                                    (before, before)
                                };
                                revoked = Some(Revoked { from, to, kept });
                            })
                        }
                        Step::Trip { .. } => {
                            for _ in 0..TRIP_CALLS {
                                let (outcome, reason, block) = step_up_for(&decide, &subject).await;
                                let blocked = reason == "blocked";
                                assert!(
                                    blocked || outcome == Outcome::StepUp as i32,
                                    "operation {number} ({step:?}): {STEP_UP_OPERATION} answers \
                                     {outcome} {reason}, not a step-up: the trip counts nothing"
                                );
                                answers.push(if blocked {
                                    format!("blocked by {block}")
                                } else {
                                    "step-up".to_owned()
                                });
                                if blocked {
                                    break;
                                }
                            }
                            Ok(())
                        }
                        _ => unreachable!("only operations are called"),
                    }
                    .unwrap_or_else(|e| panic!("operation {number} ({step:?}): {e}"));
                    Taken {
                        number,
                        step,
                        sent_ms,
                        answered_ms: now_ms(),
                        revoked,
                        answers,
                        cut_off,
                    }
                }));
            }
        }
    }
    let mut taken = Vec::new();
    for call in calls {
        taken.push(call.await.expect("an operation's call"));
    }
    let (cuts, outage) = (
        steps.iter().filter(|s| matches!(s, Step::Cut(_))).count(),
        killed_ms.is_some(),
    );

    // What was done, as said in a failure.
    let story = || {
        let mut said = format!(
            "seed {seed} (STEPGATE_CHAOS_SEED={seed} to run it alone); Redis killed at {killed_ms:?}; \
             steps:\n{steps:?}\noperations (sent and answered, unix ms):\n"
        );
        for t in &taken {
            said += &format!(
                "  {} {:?} on {}{}: {}..{}{}\n",
                reason_id(t.number),
                t.step,
                subjects[t.subject()],
                if t.cut_off { " (cut off)" } else { "" },
                t.sent_ms,
                t.answered_ms,
                t.revoked
                    .map(|r| format!(", time {}..={}, the replica kept {}", r.from, r.to, r.kept))
                    .unwrap_or_default()
                    + &if t.is_trip() {
                        format!(", answered {:?}", t.answers)
                    } else {
                        String::new()
                    }
            );
        }
        said
    };

    // Every way to Redis restored and Redis up (the plan ends so; made sure of), then agreement:
    // every replica, and Redis, the same for each subject, well within the periodic re-read.
    for relay in &cluster.relays {
        relay.restore();
    }
    if !cluster.redis.ping() {
        cluster.redis = tokio::task::spawn_blocking(move || Redis::start_on(port))
            .await
            .unwrap();
    }
    let restored = Instant::now();
    for replica in &cluster.replicas {
        store_up(&replica.server, RESYNC).await;
    }
    let up = restored.elapsed();
    let deadline = Instant::now() + SETTLE;
    let agreed = loop {
        let views = all_states(&cluster.replicas, &subjects).await;
        let store = store_state(&cluster.redis, &subjects);
        if views.iter().all(|v| *v == store) {
            break store;
        }
        if Instant::now() >= deadline {
            // Whether a re-read heals it (each replica re-reads the store as it reconnects), to
            // tell the reader which path lost the change.
            cluster.reconnect_all().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let reread = all_states(&cluster.replicas, &subjects).await;
            let store_reread = store_state(&cluster.redis, &subjects);
            return Err(format!(
                "the replicas and Redis do not agree within {SETTLE:?} of being connected again:\n\
                 {}after every replica reconnected and re-read the store:\n{}{}the replicas' \
                 lines about these subjects:\n{}",
                describe_all(&views, &store, &subjects),
                describe_all(&reread, &store_reread, &subjects),
                story(),
                lines_about(&cluster.replicas, &subjects).join("\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let agreed_after = fresh.elapsed();

    let mut failures = Vec::new();
    // Each replica enforces what it lists: blocks, and the revocations' times to the second.
    for (r, replica) in cluster.replicas.iter().enumerate() {
        for (i, subject) in subjects.iter().enumerate() {
            let blocked = agreed.blocks[i].is_some();
            let said = decide_for(replica, subject, None).await;
            if (said.1 == "blocked") != blocked {
                failures.push(format!(
                    "replica {r} answers {said:?} for {subject}, whose block is {:?}",
                    agreed.blocks[i],
                ));
            }
            let Some(before) = agreed.revoked[i] else {
                continue;
            };
            for (iat, refused) in [(before - 1, true), (before + 1, false)] {
                let said = decide_for(replica, subject, Some(iat)).await;
                let expected = if blocked {
                    said.1 == "blocked"
                } else if refused {
                    said.1 == "session_revoked"
                } else {
                    said.0 == Outcome::Allow as i32
                };
                if !expected {
                    failures.push(format!(
                        "replica {r} answers {said:?} for a token of {subject} issued at {iat}, \
                         its sessions revoked before {before} (blocked: {blocked})"
                    ));
                }
            }
        }
    }

    // Revocations: of a subject's revocations, the one that covers most stays. Its time is at
    // least each one's earliest, and each time a replica answered it kept; at most the latest of
    // any.
    for (i, subject) in subjects.iter().enumerate() {
        let revoked: Vec<Revoked> = taken
            .iter()
            .filter(|t| t.subject() == i)
            .filter_map(|t| t.revoked)
            .collect();
        let range = revoked
            .iter()
            .map(|r| (r.from.max(r.kept), r.to))
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)));
        let held = agreed.revoked[i];
        let right = match (range, held) {
            (None, None) => true,
            (Some((from, to)), Some(held)) => (from..=to).contains(&held),
            _ => false,
        };
        if !right {
            failures.push(format!(
                "{subject}'s sessions are revoked before {held:?}, not the latest of its \
                 revocations' times ({range:?}, from..=to)"
            ));
        }
    }

    let (mut clear, mut tripped, mut crossed_last, mut lifted_last) = (0, 0, 0, 0);
    // Last writer wins: what is left of each subject is the outcome of an operation that no
    // other one followed strictly (started after it was answered, so stamped later), and of the
    // last one when it followed all the others. With the signal's blocks among them, each
    // precedence rule the docs state.
    for (i, subject) in subjects.iter().enumerate() {
        let on: Vec<&Taken> = taken
            .iter()
            .filter(|t| t.subject() == i && t.is_block_or_lift())
            .collect();
        let calls: Vec<(i64, i64)> = on.iter().map(|t| (t.sent_ms, t.answered_ms)).collect();
        let newest: Vec<&Taken> = newest_writes(&calls).into_iter().map(|n| on[n]).collect();
        clear += usize::from(newest.len() == 1);
        let left = agreed.blocks[i].as_ref().map(|(id, _)| id.clone());
        let mut possible: Vec<Option<String>> = if on.is_empty() {
            vec![None]
        } else {
            newest.iter().map(|t| t.outcome()).collect()
        };
        let trips: Vec<&Taken> = taken
            .iter()
            .filter(|t| t.subject() == i && t.is_trip())
            .collect();
        if !trips.is_empty() {
            tripped += 1;
            // The signal blocks too: over the operators' newest writes' outcomes (a lift, a
            // block shorter than its own), but an operator's block it never shortens, and an
            // older operator's block never comes back.
            possible.push(Some(signal_id()));
            // A trip that crossed the threshold after every operator's block and lift leaves
            // the subject blocked: by the signal, or by the operators' newest block when that
            // lasts longer (a signal's block never shortens one in force). Nothing else writes
            // after it but other trips, which only block.
            if let Some(last) = trips
                .iter()
                .find(|t| t.crossed() && on.iter().all(|o| t.follows(o)))
            {
                crossed_last += 1;
                possible.retain(Option::is_some);
                if left.is_none() {
                    failures.push(format!(
                        "{subject} is not blocked, though {} crossed the signal's threshold \
                         after every operator's block and lift of it",
                        reason_id(last.number)
                    ));
                }
            }
            // An operator's lift made after everything else on the subject, trips included,
            // leaves it unblocked.
            if let Some(lift) = on.iter().find(|l| {
                matches!(l.step, Step::Lift { .. })
                    && taken
                        .iter()
                        .filter(|t| t.subject() == i && t.number != l.number)
                        .filter(|t| t.is_block_or_lift() || t.is_trip())
                        .all(|t| l.follows(t))
            }) {
                lifted_last += 1;
                possible.retain(Option::is_none);
                if left.is_some() {
                    failures.push(format!(
                        "{subject} holds {left:?}, though {} lifted it after every other \
                         block, lift and trip of it",
                        reason_id(lift.number)
                    ));
                }
            }
        }
        if !possible.contains(&left) {
            failures.push(format!(
                "{subject} holds {left:?}, the outcome of none of its newest writes {:?} ({:?})",
                newest
                    .iter()
                    .map(|t| reason_id(t.number))
                    .collect::<Vec<_>>(),
                possible,
            ));
        }
    }
    eprintln!(
        "seed {seed}: {} operations ({} on a replica cut off, {} trips of which {} crossed) on \
         {count} subjects, {cuts} cuts, outage {outage}, {clear} subjects with one newest write, \
         {tripped} tripped ({crossed_last} crossed after every operator's write, \
         {lifted_last} lifted after every write), {} blocked, {} revoked; all up {up:?} after \
         the last restore, agreed {agreed_after:?} after the seed's fresh connections",
        taken.len(),
        taken.iter().filter(|t| t.cut_off).count(),
        taken.iter().filter(|t| t.is_trip()).count(),
        taken.iter().filter(|t| t.crossed()).count(),
        agreed.blocks.iter().filter(|h| h.is_some()).count(),
        agreed.revoked.iter().filter(|h| h.is_some()).count(),
    );
    if agreed_after >= RESYNC - SETTLE {
        failures.push(format!(
            "the check came {agreed_after:?} after the replicas' fresh connections: a periodic \
             re-read of the store may have come before it (the test's own bound, not the \
             product's)"
        ));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        let views = all_states(&cluster.replicas, &subjects).await;
        Err(format!(
            "{}\n{}what each held:\n{}Redis's records:\n{}the replicas' lines about these \
             subjects:\n{}",
            failures.join("\n"),
            story(),
            describe_all(&views, &agreed, &subjects),
            records(&cluster.redis, &subjects),
            lines_about(&cluster.replicas, &subjects).join("\n")
        ))
    }
}
