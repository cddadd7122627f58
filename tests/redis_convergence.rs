//! Three stepgate replicas sharing one real `redis-server`, driven by a seeded random sequence of
//! operators' blocks and lifts on a few subjects, each through a random replica's admin API, with
//! random pauses between them (none at all, often, so that calls on one subject overlap). For
//! half the seeds Redis is killed in the middle and started again, empty, on the same port, and
//! the sequence ends with one call on each subject, a few milliseconds apart, as the replicas
//! reconnect (writing what waited, then re-reading the store): the moment the store's records and
//! the replicas' own recent changes meet.
//!
//! What the module docs of `src/risk/redis.rs` and `src/risk/blocks.rs` promise, checked once the
//! sequence is over and the replicas are connected again:
//! - **Agreement.** Every replica holds, for each subject, the same block (the same operation's,
//!   by its reason id) or none, and so does Redis: a replica applies its own change first and the
//!   others' as they publish them, and re-reads the store on every reconnection. Asked well within
//!   the 30 s periodic re-read, so that only pub/sub and the reconnections' re-reads count. Every
//!   replica's `Decide` answers `blocked` exactly for the blocked subjects.
//! - **Last writer wins.** Each write is stamped in milliseconds inside its admin call, so an
//!   operation that started after another had returned is the newer write, and the older one
//!   cannot be what is left: the final state of a subject is the outcome of one of its operations
//!   that no later-started one followed strictly (whichever of overlapping calls got the later
//!   stamp), and of the last one when it followed all the others.
//!
//! The blocks last two minutes at least, so none expires while a sequence is checked; the test
//! uses no risk signal, so every write is an operator's and the newest one wins, in Redis and on
//! every replica.
//!
//! The seeds are fixed, for a repeatable run; every failing seed is said with its plan, what each
//! replica and Redis held, whether the replicas agreed once made to reconnect (and so re-read the
//! store), and the replicas' log lines about its subjects. `STEPGATE_CONVERGENCE_SEED=<n>` runs
//! that seed alone, and `STEPGATE_CONVERGENCE_RUNS=<n>` that many fresh ones. A seed repeats the
//! plan (operations, replicas, pauses, outage), not the interleaving the machine makes of it.
//!
//! A second test takes one such sequence on purpose, in the order that found a replica undoing its
//! own newest change (`a_lift_made_while_its_replica_reconnects_is_kept_there`).

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use common::TempPolicy;
use redis_server::{
    Random, Redis, Relay, Replica, as_operator, blocks, describe, lines_about, newest_writes,
    now_ms, policy_through, replica, replica_view, resp, store_down, store_up, store_view,
    stored_block, target, until_subscribed,
};
use stepgate::api::v1::{BlockRequest, UnblockRequest};

const SEEDS: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
const REPLICAS: usize = 3;
const SUBJECTS: usize = 4;
/// Operations in one sequence.
const OPERATIONS: usize = 40;
/// How long the replicas have to agree once connected: far less than the 30 s periodic re-read.
const SETTLE: Duration = Duration::from_secs(5);

/// The demo policy sharing its risk state through `redis`.
fn policy(name: &str, redis: &Redis) -> TempPolicy {
    policy_through(name, &redis.url())
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
    /// Waits this many milliseconds.
    Pause(u64),
    /// Kills Redis.
    Kill,
    /// Starts Redis again, empty, on the same port, and waits until a replica has reconnected.
    Restart,
}

/// The plan of a seed: its steps, operations and outage in the order they are taken. With an
/// outage, the sequence ends as the replicas reconnect with one call on each subject, a few
/// milliseconds apart: each the last on its subject, so that no later call hides what it left.
fn plan(seed: u64) -> Vec<Step> {
    let mut random = Random(seed);
    let outage = random.below(2) == 0;
    let restart_at = OPERATIONS - SUBJECTS;
    let kill_at = restart_at - 6 - random.below(15) as usize;
    let mut last: Vec<usize> = (0..SUBJECTS).collect();
    for i in (1..SUBJECTS).rev() {
        last.swap(i, random.below(i as u64 + 1) as usize);
    }
    let mut steps = Vec::new();
    for i in 0..OPERATIONS {
        if outage && i == kill_at {
            steps.push(Step::Kill);
        }
        if outage && i == restart_at {
            steps.push(Step::Pause(random.below(1000)));
            steps.push(Step::Restart);
        }
        let reconnecting = outage && i >= restart_at;
        let subject = if reconnecting {
            last[i - restart_at]
        } else {
            random.below(SUBJECTS as u64) as usize
        };
        let replica = random.below(REPLICAS as u64) as usize;
        steps.push(if random.below(5) < 3 {
            Step::Block {
                subject,
                replica,
                ttl: 120 + random.below(86_400 - 120) as i64,
            }
        } else {
            Step::Lift { subject, replica }
        });
        // A few milliseconds as the replicas reconnect; else none a third of the time (calls in
        // flight together), and up to 50 ms.
        let pause = if reconnecting {
            random.below(5)
        } else if random.below(3) == 0 {
            0
        } else {
            random.below(51)
        };
        steps.push(Step::Pause(pause));
    }
    steps
}

/// An operation taken: its step, and when its call was sent and answered (unix ms).
#[derive(Debug, Clone)]
struct Taken {
    number: usize,
    step: Step,
    sent_ms: i64,
    answered_ms: i64,
}

impl Taken {
    fn subject(&self) -> usize {
        match self.step {
            Step::Block { subject, .. } | Step::Lift { subject, .. } => subject,
            _ => unreachable!("only operations are taken"),
        }
    }

    /// What it leaves when it is the newest write: its block (by reason id), or none.
    fn outcome(&self) -> Option<String> {
        matches!(self.step, Step::Block { .. }).then(|| reason_id(self.number))
    }
}

fn reason_id(number: usize) -> String {
    format!("op-{number}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_on_the_newest_block_or_lift_of_each_subject() {
    let mut redis = Redis::start();
    let policy = policy("redis-convergence", &redis);
    let mut replicas = Vec::new();
    for _ in 0..REPLICAS {
        replicas.push(replica(&policy).await);
    }
    for replica in &replicas {
        store_up(&replica.server, Duration::from_secs(10)).await;
    }
    let mut failures = Vec::new();
    for seed in redis_server::seeds("STEPGATE_CONVERGENCE", &SEEDS) {
        if let Err(failure) = run(seed, &replicas, &mut redis).await {
            eprintln!("seed {seed} FAILED");
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Runs `seed`'s plan against `replicas` and checks what they converge on; what went wrong, said
/// in full. After a divergence every replica has reconnected and re-read the store, so that the
/// next seed starts from replicas that agree.
async fn run(seed: u64, replicas: &[Replica], redis: &mut Redis) -> Result<(), String> {
    let started = Instant::now();
    let port = redis.port;
    let steps = plan(seed);
    let subjects: Vec<String> = (0..SUBJECTS).map(|i| format!("seed{seed}-s{i}")).collect();
    let mut calls = Vec::new();
    let mut number = 0;
    for step in &steps {
        match *step {
            Step::Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Step::Kill => redis.kill(),
            Step::Restart => {
                let restarted = tokio::task::spawn_blocking(move || Redis::start_on(port));
                *redis = restarted.await.unwrap();
                // The operations that follow meet the replicas as they reconnect: writing what
                // waited, re-reading the store.
                until_subscribed(redis, 1).await;
            }
            Step::Block {
                subject, replica, ..
            }
            | Step::Lift { subject, replica } => {
                number += 1;
                let (step, number) = (*step, number);
                let mut admin = replicas[replica].admin.clone();
                let subject = subjects[subject].clone();
                calls.push(tokio::spawn(async move {
                    let sent_ms = now_ms();
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
                        _ => {
                            let request = UnblockRequest {
                                target: target(&subject),
                                reason: String::new(),
                            };
                            admin.unblock(as_operator(request)).await.map(|_| ())
                        }
                    }
                    .unwrap_or_else(|e| panic!("operation {number} ({step:?}): {e}"));
                    Taken {
                        number,
                        step,
                        sent_ms,
                        answered_ms: now_ms(),
                    }
                }));
            }
        }
    }
    let mut taken = Vec::new();
    for call in calls {
        taken.push(call.await.expect("an operation's call"));
    }

    // What was done, as said in a failure.
    let story = || {
        let mut said = format!(
            "seed {seed} (STEPGATE_CONVERGENCE_SEED={seed} to run it alone); steps:\n{steps:?}\n\
             operations (sent and answered, unix ms):\n"
        );
        for t in &taken {
            said += &format!(
                "  {} {:?} on {}: {}..{}\n",
                reason_id(t.number),
                t.step,
                subjects[t.subject()],
                t.sent_ms,
                t.answered_ms
            );
        }
        said
    };

    // Agreement: every replica, and Redis, the same for each subject, well within the periodic
    // re-read.
    for replica in replicas {
        store_up(&replica.server, Duration::from_secs(30)).await;
    }
    let deadline = Instant::now() + SETTLE;
    let agreed = loop {
        let mut views = Vec::new();
        for replica in replicas {
            views.push(replica_view(replica, &subjects).await);
        }
        let store = store_view(redis, &subjects);
        if views.iter().all(|v| *v == store) {
            break store;
        }
        if Instant::now() >= deadline {
            // Whether a re-read heals it (each replica re-reads the store as it reconnects), to
            // tell the reader which path lost the change.
            for kind in ["normal", "pubsub"] {
                redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            for replica in replicas {
                store_up(&replica.server, Duration::from_secs(30)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut reread = Vec::new();
            for replica in replicas {
                reread.push(replica_view(replica, &subjects).await);
            }
            let store_reread = store_view(redis, &subjects);
            let logs = lines_about(replicas, &subjects);
            let failure = format!(
                "the replicas and Redis do not agree within {SETTLE:?}:\n{}after every replica \
                 reconnected and re-read the store:\n{}{}the replicas' lines about these \
                 subjects:\n{}",
                describe(&views, &store, &subjects),
                describe(&reread, &store_reread, &subjects),
                story(),
                logs.join("\n")
            );
            return Err(failure);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let mut failures = Vec::new();
    // Each replica enforces what it lists.
    for (r, replica) in replicas.iter().enumerate() {
        for (i, subject) in subjects.iter().enumerate() {
            let blocked = blocks(replica, subject).await;
            if blocked != agreed[i].is_some() {
                failures.push(format!(
                    "replica {r} answers blocked {blocked} for {subject}, whose block is {:?}",
                    agreed[i],
                ));
            }
        }
    }

    let mut clear = 0;
    // Last writer wins: what is left of each subject is the outcome of an operation that no
    // other one followed strictly (started after it was answered, so stamped later), and of the
    // last one when it followed all the others.
    for (i, subject) in subjects.iter().enumerate() {
        let on: Vec<&Taken> = taken.iter().filter(|t| t.subject() == i).collect();
        let calls: Vec<(i64, i64)> = on.iter().map(|t| (t.sent_ms, t.answered_ms)).collect();
        let newest: Vec<&Taken> = newest_writes(&calls).into_iter().map(|i| on[i]).collect();
        clear += usize::from(newest.len() == 1);
        let left = agreed[i].as_ref().map(|(id, _)| id.clone());
        let possible: Vec<Option<String>> = if on.is_empty() {
            vec![None]
        } else {
            newest.iter().map(|t| t.outcome()).collect()
        };
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
    let outage = steps.iter().any(|s| matches!(s, Step::Kill));
    eprintln!(
        "seed {seed}: {} operations, outage {outage}, {clear} of {SUBJECTS} subjects with one \
         newest write, {} blocked; agreed in {:?}",
        taken.len(),
        agreed.iter().filter(|h| h.is_some()).count(),
        started.elapsed()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{}\n{}", failures.join("\n"), story()))
    }
}

/// A change an operator makes on a replica while it reconnects is not undone by the replica's own
/// re-read of the store. A and B lose Redis; meanwhile A blocks 300 subjects, whose writes wait
/// for Redis. Redis is back, empty: B is back at once, while A writes what waited, one at a
/// time, before it re-reads the store. Meanwhile an operator blocks mallory on B, which reaches
/// the store at once, and a moment later another lifts mallory on A: the newer write, which wins
/// in Redis, and B lifts the block. A must not block mallory either, though the store held B's
/// block when A read it: A's lift, whose write was still on its way, is newer. (Tried again, up
/// to three times, when A had caught up before the lift: then the lift went out at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_made_while_its_replica_reconnects_is_kept_there() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-reconnect-change", &redis);
    let a = replica(&policy).await;
    let b = replica(&policy).await;
    for server in [&a.server, &b.server] {
        store_up(server, Duration::from_secs(10)).await;
    }
    let block = |subject: &str, id: &str| BlockRequest {
        target: target(subject),
        reason_id: id.into(),
        reason: String::new(),
        ttl_seconds: 3600,
    };
    let (mut a_admin, mut b_admin) = (a.admin.clone(), b.admin.clone());
    let mut attempt = 0;
    let subject = loop {
        attempt += 1;
        let subject = format!("mallory-{attempt}");
        let last_filler = format!("subject|filler-{attempt}-299");
        redis.kill();
        for server in [&a.server, &b.server] {
            store_down(server).await;
        }
        for i in 0..300 {
            let request = block(&format!("filler-{attempt}-{i}"), "INC-0");
            a_admin.block(as_operator(request)).await.unwrap();
        }
        redis = Redis::start_on(port);
        until_subscribed(&redis, 2).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        b_admin
            .block(as_operator(block(&subject, "INC-1")))
            .await
            .unwrap();
        let lift = UnblockRequest {
            target: target(&subject),
            reason: String::new(),
        };
        a_admin.unblock(as_operator(lift)).await.unwrap();
        let a_caught_up = stored_block(&redis, &last_filler).is_some();
        for server in [&a.server, &b.server] {
            store_up(server, Duration::from_secs(30)).await;
        }
        if !a_caught_up {
            break subject;
        }
        assert!(attempt < 3, "A was back before the lift, {attempt} times");
    };
    let field = format!("subject|{subject}");
    eventually("Redis holds the lift", || async {
        stored_block(&redis, &field).is_some_and(|(_, r)| r["removed"] == true)
    })
    .await;
    eventually("B lifts the block", || async {
        !blocks(&b, &subject).await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !blocks(&a, &subject).await,
        "A blocks {subject}, though its own lift is the newest write: Redis holds {:?}, B lifted \
         it, A lists {:?}",
        stored_block(&redis, &field),
        replica_view(&a, std::slice::from_ref(&subject)).await
    );
}

/// Polls `probe` every 20 ms until it holds; fails after 10 s.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut probe: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A replica whose subscription is dropped without a word (its connection open, nothing crossing
/// it) while its commands' connection stays healthy: it must notice, reconnect and catch up,
/// rather than miss every other replica's change, and keep a field whose echo never came from
/// ever being read back. Here A blocks alice once its subscription is silent (that block's echo
/// never comes), then B lifts alice: A must lift her well within the 30 s resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_without_a_word_is_noticed_and_caught_up_on() {
    let redis = Redis::start();
    let relay = Relay::start(redis.port);
    let through_relay = policy_through("redis-silent-a", &relay.url());
    let direct = policy("redis-silent-b", &redis);
    let a = replica(&through_relay).await;
    let b = replica(&direct).await;
    for server in [&a.server, &b.server] {
        store_up(server, Duration::from_secs(10)).await;
    }
    assert_eq!(
        relay.silence_subscriptions(),
        1,
        "A's subscription, silenced"
    );
    let block = BlockRequest {
        target: target("alice"),
        reason_id: "INC-7".into(),
        reason: String::new(),
        ttl_seconds: 3600,
    };
    a.admin.clone().block(as_operator(block)).await.unwrap();
    eventually(
        "B applies A's block (published by A's commands' connection)",
        || async { blocks(&b, "alice").await },
    )
    .await;
    let lift = UnblockRequest {
        target: target("alice"),
        reason: String::new(),
    };
    b.admin.clone().unblock(as_operator(lift)).await.unwrap();
    let lifted = Instant::now();
    eventually("A lifts alice too, well within the 30 s resync", || async {
        !blocks(&a, "alice").await
    })
    .await;
    eprintln!("A caught up {:?} after the lift", lifted.elapsed());
}
