//! The write script of the shared risk store (`PUT` in `src/risk/redis.rs`), against a real
//! `redis-server`: a metamorphic test of arrival order. Writes reach Redis late and out of order
//! (a replica cut off queues them and writes them once it is back); the script keeps each
//! field's writes that can still change its outcome and folds them in write-time order, so that
//! a field ends on the same block whatever order its writes arrive in.
//!
//! Each seed draws a small set (2 to 6) of writes to one field, each stamped with its own write
//! time in ms within the last 8 s: operators' blocks (each with a reason id of its own, ending at
//! one of a few times, so that some have ended, some outlast others and some end together),
//! operators' lifts, risk signals' blocks (created by `risk:<name>`), and evictions of a signal's
//! block (a replica dropping a signal's source block it held, to make room). Each write passes
//! the script what a replica passes it (`Shared::write_puts`, `Precedence::args`): the record as
//! `BlockRecord` serializes it (`lift_record` for a lift and an eviction), `lift` or `evict` with
//! 0, or `operator` or `signal` with the block's end, and the writer's clock `now`, here the same
//! near-real-time second for every write, so that what is in force is judged alike in every
//! order. (A block's `reason` text, free for a replica, names the write here, `w<n>`, so that a
//! stored record tells which write it is.)
//!
//! The set is written, to a fresh field, in several arrival orders: the order of the write times
//! (no delay: the baseline), the reverse, and random ones (every one when the set has at most
//! four writes). An eviction always arrives after the signal's block it evicts: the evicting
//! replica held that block, so either made it (its own writes reach Redis in order) or read it
//! from Redis. Each order's final record is read as a replica reads it (`parse_stored` and
//! `apply_block` in `src/risk/redis.rs`, both private, reimplemented here: [`effective_block`]):
//! blocked or not, and when blocked, the block's reason id and end. Bookkeeping (`operator_at`,
//! the stamp) is not compared: no replica applies it. Every order must end on what [`model`]
//! says, the rules applied by one replica to the writes in write-time order (written here from
//! `docs/risk.md`, apart from the script); an order that ends elsewhere is a finding, shrunk to
//! the fewest writes that still show it. Whatever the order, an operator's newest lift leaves
//! nothing, an operator's newest block stands, and the store never ends on what no replica
//! applies.
//!
//! A second series does the same with revocations of one subject: whatever the order, the one
//! with the latest time (`before`) stays.
//!
//! The seeds are fixed (`1..=SEEDS`, some seconds); `STEPGATE_PUT_ORDER_SEED=<n>` replays one
//! seed, `STEPGATE_PUT_ORDER_RUNS=<n>` runs that many fresh ones. The summary (seeds, orders,
//! time, findings by shape) is printed to stderr: `--no-capture` shows it on success too.
//!
//! A second test writes out the smallest findings the randomized test found in earlier versions
//! of the script, in the two orders that ended differently, so that each is checked on every
//! run whatever the seeds.

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/redis.rs"]
mod redis_server;

use std::{collections::BTreeMap, fmt, time::Instant};

use redis_server::{Random, Redis};
use stepgate::risk::{
    blocks::{MAX_CREATED_BY_BYTES, MAX_REASON_BYTES, MAX_TTL_SECONDS, check_record},
    redis::{MAX_RECORD_BYTES, PUT},
    revocations::MAX_CLOCK_AHEAD_SECONDS,
};

/// The fixed seeds: `1..=SEEDS`.
const SEEDS: u64 = 1000;
const BLOCKS: &str = "stepgate:blocks";
const REVOCATIONS: &str = "stepgate:revocations";
const CHANNEL: &str = "stepgate:put-order-test";
const SIGNAL_PREFIX: &str = "risk:";
/// Random arrival orders tried beside the baseline and its reverse, for sets of more than
/// [`ALL_ORDERS_UP_TO`] writes.
const RANDOM_ORDERS: usize = 8;
const ALL_ORDERS_UP_TO: usize = 4;

/// What a write is.
#[derive(Debug, Clone)]
enum What {
    /// An operator's block, with its own reason id.
    Operator { reason_id: String, ends: i64 },
    /// An operator's lift, kept until `until` (the lifted block's end as the lifting replica
    /// knew it, or a day).
    Lift { until: i64 },
    /// A risk signal's block.
    Signal { name: &'static str, ends: i64 },
    /// A replica's eviction of the signal's block `of` (a write's index), which it held: a lift
    /// kept until that block's end.
    Evict { of: usize, until: i64 },
}

#[derive(Debug, Clone)]
struct Write {
    /// Its index in the set, which is sorted by `at_ms`.
    id: usize,
    /// Its write time (`Put::at_ms`, the script's `ARGV[2]`).
    at_ms: i64,
    what: What,
}

impl Write {
    /// `created_at`: the second of its write time (a replica takes `write_time` and the block's
    /// `created_at` at once; a lift's is its write time's second, `lift_record`).
    fn created_at(&self) -> i64 {
        self.at_ms.div_euclid(1000)
    }

    /// The script's `ARGV[3]`, `ARGV[6]` and `ARGV[7]`: the record as `BlockRecord` serializes
    /// it (its members in that order, `operator_at` left out when none), what it is and when it
    /// ends (`Precedence::args`).
    fn args(&self, set: &[Write]) -> (String, &'static str, i64) {
        let created_at = self.created_at();
        let tag = format!("w{}", self.id);
        let block = |reason_id: &str, ends: i64, by: &str| {
            serde_json::json!({
                "removed": false, "reason_id": reason_id, "reason": tag, "created_at": created_at,
                "expires_at": ends, "created_by": by,
            })
            .to_string()
        };
        let lift = |until: i64| {
            serde_json::json!({
                "removed": true, "reason_id": "", "reason": "", "created_at": created_at,
                "expires_at": until, "created_by": "",
            })
            .to_string()
        };
        match &self.what {
            What::Operator { reason_id, ends } => {
                (block(reason_id, *ends, "san:ops"), "operator", *ends)
            }
            What::Signal { name, ends } => (
                block(
                    &format!("risk.{name}"),
                    *ends,
                    &format!("{SIGNAL_PREFIX}{name}"),
                ),
                "signal",
                *ends,
            ),
            What::Lift { until } => (lift(*until), "lift", 0),
            What::Evict { of, until } => {
                // Naming the block evicted, as `Shared::block_evicted` does.
                let What::Signal { name, .. } = set[*of].what else {
                    panic!("#{} evicts #{of}, no signal's block", self.id)
                };
                let mut record: serde_json::Value =
                    serde_json::from_str(&lift(*until)).expect("a lift's record");
                record["reason_id"] = format!("risk.{name}").into();
                record["created_by"] = format!("{SIGNAL_PREFIX}{name}").into();
                record["evicted_created_at"] = set[*of].created_at().into();
                (record.to_string(), "evict", 0)
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self.what {
            What::Operator { .. } => "operator",
            What::Lift { .. } => "lift",
            What::Signal { .. } => "signal",
            What::Evict { .. } => "evict",
        }
    }
}

thread_local! {
    /// The writers' clock for the whole run (seconds), near real time.
    static NOW: i64 = common::unix_now();
}

fn now() -> i64 {
    NOW.with(|n| *n)
}

impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rel = |t: i64| format!("now{:+}s", t - now());
        write!(f, "#{} at now{:+}ms: ", self.id, self.at_ms - now() * 1000)?;
        match &self.what {
            What::Operator { reason_id, ends } => {
                write!(f, "operator's block {reason_id} ending {}", rel(*ends))
            }
            What::Lift { until } => write!(f, "operator's lift (until {})", rel(*until)),
            What::Signal { name, ends } => {
                write!(f, "signal's block risk.{name} ending {}", rel(*ends))
            }
            What::Evict { of, until } => write!(f, "eviction of #{of} (until {})", rel(*until)),
        }
    }
}

/// What a replica applies of a stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effective {
    /// Nothing stored, a lift, or a block that has ended.
    Unblocked,
    Blocked {
        reason_id: String,
        expires_at: i64,
    },
    /// A stored value no replica applies (it never should be one the script wrote).
    Ignored(String),
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unblocked => write!(f, "unblocked"),
            Self::Blocked {
                reason_id,
                expires_at,
            } => write!(
                f,
                "blocked by {reason_id} until now{:+}s",
                expires_at - now()
            ),
            Self::Ignored(why) => write!(f, "ignored by the replicas ({why})"),
        }
    }
}

/// A stored block's value as a replica reads and applies it at `now`: `parse_stored` (a stamp of
/// digits no further ahead than a clock may be, a JSON object read as `BlockRecord`, whose
/// members all have defaults but `expires_at`), then what `apply_block` checks before applying
/// it (`check_record`, an end no further after its creation than a block may last, a creation no
/// further ahead than a clock may be), then `Blocks::in_force` (it ends after `now`).
fn effective_block(stored: Option<&str>, now: i64) -> Effective {
    let Some(stored) = stored else {
        return Effective::Unblocked;
    };
    let ahead = MAX_CLOCK_AHEAD_SECONDS;
    let Some((stamp, json)) = stored.split_once('|') else {
        return Effective::Ignored("no stamp".into());
    };
    let stamp_ok = !stamp.is_empty()
        && stamp.bytes().all(|b| b.is_ascii_digit())
        && stamp
            .parse::<i64>()
            .is_ok_and(|s| s <= (now + ahead) * 1000);
    if !stamp_ok {
        return Effective::Ignored(format!("stamp {stamp}"));
    }
    let Ok(serde_json::Value::Object(record)) = serde_json::from_str(json) else {
        return Effective::Ignored("not a JSON object".into());
    };
    let text = |name: &str| -> Result<String, String> {
        match record.get(name) {
            None => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("{name}: {other}")),
        }
    };
    let int = |name: &str, default: Option<i64>| -> Result<i64, String> {
        match record.get(name) {
            None => default.ok_or(format!("{name} missing")),
            Some(v) => v.as_i64().ok_or(format!("{name}: {v}")),
        }
    };
    let read = || -> Result<Effective, String> {
        let removed = match record.get("removed") {
            None => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => return Err(format!("removed: {other}")),
        };
        let (reason_id, reason, created_by) =
            (text("reason_id")?, text("reason")?, text("created_by")?);
        let created_at = int("created_at", Some(0))?;
        let expires_at = int("expires_at", None)?;
        if let Some(at) = record.get("operator_at")
            && !at.is_number()
        {
            return Err(format!("operator_at: {at}"));
        }
        if removed {
            return Ok(Effective::Unblocked);
        }
        check_record(&reason_id, &reason, &created_by)?;
        if expires_at > created_at.saturating_add(MAX_TTL_SECONDS + ahead)
            || created_at > now.saturating_add(ahead)
        {
            return Err("ends further ahead than a replica's block may".into());
        }
        Ok(if expires_at > now {
            Effective::Blocked {
                reason_id,
                expires_at,
            }
        } else {
            Effective::Unblocked
        })
    };
    read().unwrap_or_else(Effective::Ignored)
}

/// The write a stored value is the record of, by the `w<n>` its reason holds: none for a lift.
fn tag(stored: Option<&str>) -> Option<usize> {
    let record: serde_json::Value = serde_json::from_str(stored?.split_once('|')?.1).ok()?;
    if record["removed"] == true {
        return None;
    }
    record["reason"].as_str()?.strip_prefix('w')?.parse().ok()
}

/// Where the script keeps the writes of `key`'s fields (`KEYS[2]`, `Hash::writes_key`).
fn writes_key(key: &str) -> String {
    format!("{key}:writes")
}

/// The script's bounds, as a replica passes them (`write_puts`): `ARGV[9]` to `ARGV[14]`.
fn bounds() -> [String; 6] {
    [
        SIGNAL_PREFIX.to_owned(),
        MAX_TTL_SECONDS.to_string(),
        MAX_CLOCK_AHEAD_SECONDS.to_string(),
        MAX_RECORD_BYTES.to_string(),
        MAX_REASON_BYTES.to_string(),
        MAX_CREATED_BY_BYTES.to_string(),
    ]
}

/// One write of a run: the script's reply, and what the field held after it.
#[derive(Debug, Clone)]
struct Step {
    id: usize,
    written: bool,
    after: Option<String>,
}

/// A set of writes, written in one order.
#[derive(Debug, Clone)]
struct Run {
    steps: Vec<Step>,
    stored: Option<String>,
    outcome: Effective,
}

struct Store {
    conn: redis::Connection,
    script: redis::Script,
    fields: u64,
}

impl Store {
    fn new(redis: &Redis) -> Self {
        let client = redis::Client::open(redis.url()).expect("the redis URL");
        Self {
            conn: client.get_connection().expect("connecting to redis-server"),
            script: redis::Script::new(PUT),
            fields: 0,
        }
    }

    /// A field no write has touched.
    fn fresh_field(&mut self) -> String {
        self.fields += 1;
        format!("source|put-order-{}", self.fields)
    }

    /// One write through `PUT` as `Shared::write_puts` sends it: whether it was written.
    #[allow(clippy::too_many_arguments)]
    fn put(
        &mut self,
        key: &str,
        field: &str,
        at_ms: i64,
        record: &str,
        what: &str,
        ends: i64,
        now: i64,
    ) -> bool {
        let mut call = self.script.prepare_invoke();
        call.key(key)
            .key(writes_key(key))
            .arg(field)
            .arg(at_ms)
            .arg(record)
            .arg("{}")
            .arg(CHANNEL)
            .arg(what)
            .arg(ends)
            .arg(now);
        for bound in bounds() {
            call.arg(bound);
        }
        let written: i64 = call.invoke(&mut self.conn).expect("running PUT");
        written == 1
    }

    fn get(&mut self, key: &str, field: &str) -> Option<String> {
        redis::cmd("HGET")
            .arg(key)
            .arg(field)
            .query(&mut self.conn)
            .expect("HGET")
    }

    fn forget(&mut self, key: &str, field: &str) {
        for key in [key.to_owned(), writes_key(key)] {
            let _: i64 = redis::cmd("HDEL")
                .arg(key)
                .arg(field)
                .query(&mut self.conn)
                .expect("HDEL");
        }
    }

    /// The writes of `set` in `order` (their ids) into a fresh field.
    fn run_blocks(&mut self, set: &[Write], order: &[usize], now: i64) -> Run {
        let field = self.fresh_field();
        let mut steps = Vec::new();
        for &id in order {
            let write = &set[id];
            let (record, what, ends) = write.args(set);
            let written = self.put(BLOCKS, &field, write.at_ms, &record, what, ends, now);
            let after = self.get(BLOCKS, &field);
            steps.push(Step { id, written, after });
        }
        let stored = self.get(BLOCKS, &field);
        self.forget(BLOCKS, &field);
        let outcome = effective_block(stored.as_deref(), now);
        Run {
            steps,
            stored,
            outcome,
        }
    }
}

/// What holds in any order: the script's reply says whether the field holds the write (by its
/// stamp: the writes of a set have times of their own), which a replica that is told no reads
/// back; what the store ends on is what a replica applies; and the operators' newest word holds:
/// a lift newer than every other write leaves nothing, an operator's block newer than every other
/// write, in force, stands.
fn invariants(set: &[Write], run: &Run, now: i64) -> Result<(), String> {
    for step in &run.steps {
        let write = &set[step.id];
        let stamp = step
            .after
            .as_deref()
            .and_then(|a| a.split_once('|'))
            .map(|(s, _)| s);
        let holds = stamp == Some(write.at_ms.to_string().as_str());
        if holds != step.written {
            return Err(format!(
                "{write}: the script said {}, and the field holds {}",
                if step.written { "written" } else { "refused" },
                step.after.as_deref().unwrap_or("(nothing)")
            ));
        }
    }
    if let Some(newest) = set.iter().max_by_key(|w| w.at_ms) {
        match &newest.what {
            What::Lift { .. } if run.outcome != Effective::Unblocked => {
                return Err(format!(
                    "the newest write, {newest}, leaves {}: an operator's newest lift leaves \
                     nothing",
                    run.outcome
                ));
            }
            What::Operator { reason_id, ends } if *ends > now => {
                let stands = matches!(&run.outcome, Effective::Blocked { reason_id: r, expires_at }
                    if r == reason_id && expires_at == ends);
                if !stands {
                    return Err(format!(
                        "the newest write, {newest}, leaves {}: an operator's newest block \
                         stands",
                        run.outcome
                    ));
                }
            }
            _ => {}
        }
    }
    if let Effective::Ignored(why) = &run.outcome {
        return Err(format!(
            "the store ends on what no replica applies ({why}): {:?}",
            run.stored
        ));
    }
    Ok(())
}

/// A set of writes to one field, sorted by write time.
fn draw_blocks(random: &mut Random, now: i64) -> Vec<Write> {
    let n = 2 + random.below(5) as usize;
    let mut times: Vec<i64> = Vec::new();
    while times.len() < n {
        let at = now * 1000 - 1 - random.below(8000) as i64;
        // A replica never stamps a write at a second's first millisecond (`write_time`).
        if at.rem_euclid(1000) != 0 && !times.contains(&at) {
            times.push(at);
        }
    }
    times.sort_unstable();
    // A few ends, shared by several writes: some have ended by `now`, some outlast others,
    // some end together.
    let ends = |random: &mut Random, created_at: i64| {
        let end = match random.below(7) {
            0 => created_at + 1 + random.below(3) as i64,
            1 => now + 1,
            2 => now + 60,
            3 | 4 => now + 600,
            5 => now + 3600,
            _ => now + 7200,
        };
        end.max(created_at + 1)
    };
    let mut set: Vec<Write> = Vec::new();
    for (id, at_ms) in times.into_iter().enumerate() {
        let created_at = at_ms.div_euclid(1000);
        // The signals' blocks this write could evict: in force at its time, so that a replica
        // held it.
        let evictable: Vec<(usize, i64)> = set
            .iter()
            .filter_map(|w| match w.what {
                What::Signal { ends, .. } if ends > created_at => Some((w.id, ends)),
                _ => None,
            })
            .collect();
        let what = loop {
            match random.below(10) {
                0..=2 => {
                    break What::Operator {
                        reason_id: format!("INC-{id}"),
                        ends: ends(random, created_at),
                    };
                }
                3 | 4 => {
                    let until = if random.below(3) == 0 {
                        now + 86_400
                    } else {
                        ends(random, created_at)
                    };
                    break What::Lift { until };
                }
                5..=7 => {
                    let name = if random.below(2) == 0 {
                        "step_ups"
                    } else {
                        "forged"
                    };
                    break What::Signal {
                        name,
                        ends: ends(random, created_at),
                    };
                }
                _ if !evictable.is_empty() => {
                    let (of, until) = evictable[random.below(evictable.len() as u64) as usize];
                    break What::Evict { of, until };
                }
                _ => {}
            }
        };
        set.push(Write { id, at_ms, what });
    }
    set
}

/// `order` with each eviction moved right after the signal's block it evicts, when it came
/// before it.
fn causal(set: &[Write], order: &[usize]) -> Vec<usize> {
    let mut order = order.to_vec();
    for write in set {
        if let What::Evict { of, .. } = write.what
            && let (Some(e), Some(s)) = (
                order.iter().position(|&i| i == write.id),
                order.iter().position(|&i| i == of),
            )
            && e < s
        {
            order.remove(e);
            order.insert(s, write.id);
        }
    }
    order
}

fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut all = Vec::new();
    for (i, &first) in items.iter().enumerate() {
        let mut rest = items.to_vec();
        rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            all.push(tail);
        }
    }
    all
}

fn shuffled(ids: &[usize], random: &mut Random) -> Vec<usize> {
    let mut order = ids.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, random.below(i as u64 + 1) as usize);
    }
    order
}

/// The arrival orders tried: the baseline (write-time order) first.
fn orders(set: &[Write], random: &mut Random) -> Vec<Vec<usize>> {
    let ids: Vec<usize> = set.iter().map(|w| w.id).collect();
    let mut orders = vec![ids.clone()];
    let mut add = |order: Vec<usize>| {
        let order = causal(set, &order);
        if !orders.contains(&order) {
            orders.push(order);
        }
    };
    if ids.len() <= ALL_ORDERS_UP_TO {
        for order in permutations(&ids) {
            add(order);
        }
    } else {
        add(ids.iter().rev().copied().collect());
        for _ in 0..RANDOM_ORDERS {
            add(shuffled(&ids, random));
        }
    }
    orders
}

/// Two arrival orders of a set, of which one at least does not end on what [`model`] says.
#[derive(Debug, Clone)]
struct Finding {
    set: Vec<Write>,
    orders: [Vec<usize>; 2],
    runs: [Run; 2],
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  writes (by write time):")?;
        for write in &self.set {
            writeln!(f, "    {write}")?;
        }
        writeln!(
            f,
            "  in write-time order, one replica: {}",
            model(&self.set, now())
        )?;
        for (order, run) in self.orders.iter().zip(&self.runs) {
            let ids: Vec<String> = order.iter().map(|i| format!("#{i}")).collect();
            writeln!(
                f,
                "  arriving {}: {}\n    stored {}",
                ids.join(", "),
                run.outcome,
                run.stored.as_deref().unwrap_or("(nothing)"),
            )?;
        }
        Ok(())
    }
}

/// Both orders of `set` (their ids): a finding if what a replica applies after either is not
/// what [`model`] says.
fn compare(
    store: &mut Store,
    set: &[Write],
    orders: [&[usize]; 2],
    now: i64,
) -> Result<Option<Finding>, String> {
    let runs = [
        store.run_blocks(set, orders[0], now),
        store.run_blocks(set, orders[1], now),
    ];
    for (order, run) in orders.iter().zip(&runs) {
        invariants(set, run, now).map_err(|e| format!("arriving {order:?}: {e}"))?;
    }
    let expected = model(set, now);
    Ok(runs
        .iter()
        .any(|run| run.outcome != expected)
        .then(|| Finding {
            set: set.to_vec(),
            orders: [orders[0].to_vec(), orders[1].to_vec()],
            runs,
        }))
}

/// The writes of `finding` that `keep` keeps (and no eviction of a signal's block it drops), in
/// both orders, numbered `0..` again: a finding if they still end differently.
fn restricted(
    store: &mut Store,
    finding: &Finding,
    keep: impl Fn(&Write) -> bool,
    now: i64,
) -> Option<Finding> {
    let kept: Vec<&Write> = finding
        .set
        .iter()
        .filter(|w| keep(w))
        .filter(|w| !matches!(w.what, What::Evict { of, .. } if !keep(&finding.set[of])))
        .collect();
    if kept.len() < 2 {
        return None;
    }
    let new: BTreeMap<usize, usize> = kept.iter().enumerate().map(|(i, w)| (w.id, i)).collect();
    let set: Vec<Write> = kept
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut w = (*w).clone();
            w.id = i;
            if let What::Evict { of, .. } = &mut w.what {
                *of = new[of];
            }
            w
        })
        .collect();
    let map = |order: &[usize]| -> Vec<usize> {
        order.iter().filter_map(|i| new.get(i).copied()).collect()
    };
    let orders = [map(&finding.orders[0]), map(&finding.orders[1])];
    // (A smaller set whose runs break an invariant is not taken: that is another finding.)
    compare(store, &set, [&orders[0], &orders[1]], now)
        .ok()
        .flatten()
}

/// `finding` with its writes taken out, one at a time, while the two orders (of what is left)
/// still end differently: first all its evictions at once, so that a finding they play no part
/// in is not judged by them.
fn shrink(store: &mut Store, finding: Finding, now: i64) -> Finding {
    let mut best = finding;
    if let Some(smaller) = restricted(store, &best, |w| !matches!(w.what, What::Evict { .. }), now)
    {
        best = smaller;
    }
    'again: loop {
        for drop in 0..best.set.len() {
            if let Some(smaller) = restricted(store, &best, |w| w.id != drop, now) {
                best = smaller;
                continue 'again;
            }
        }
        return best;
    }
}

/// A block as [`model`] holds it.
#[derive(Debug, Clone, Copy)]
struct Held<'a> {
    reason_id: &'a str,
    ends: i64,
    by_signal: bool,
    /// When it was made (second).
    made: i64,
}

/// What the field ends on when one replica applies `set` in write-time order, by the rules of
/// `docs/risk.md`: an operator's block or lift replaces whatever is there; a signal's block is
/// refused over a block that lasts as long or longer (it never shortens one) and otherwise
/// replaces it, holding an operator's block it replaces under it (or keeping the one held under
/// the signal's block it replaces); an eviction of a signal's block lifts it only if it is the
/// block there (by its end, the signal that set it and when), and brings back the operator's
/// block held under it if that is still in force.
fn model(set: &[Write], now: i64) -> Effective {
    let mut by_time: Vec<&Write> = set.iter().collect();
    by_time.sort_by_key(|w| w.at_ms);
    let mut names = Vec::new();
    for write in &by_time {
        if let What::Signal { name, .. } = write.what {
            names.push((write.id, format!("risk.{name}")));
        }
    }
    let name = |id: usize| {
        names
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.as_str())
    };
    let mut there: Option<Held<'_>> = None;
    let mut under: Option<Held<'_>> = None;
    for write in by_time {
        match &write.what {
            What::Operator { reason_id, ends } => {
                there = Some(Held {
                    reason_id,
                    ends: *ends,
                    by_signal: false,
                    made: write.created_at(),
                });
                under = None;
            }
            What::Lift { .. } => (there, under) = (None, None),
            What::Signal { ends, .. } => {
                if there.is_some_and(|b| b.ends >= *ends) {
                    continue;
                }
                match there {
                    Some(b) if !b.by_signal => under = Some(b),
                    Some(_) => {}
                    None => under = None,
                }
                there = Some(Held {
                    reason_id: name(write.id).expect("named above"),
                    ends: *ends,
                    by_signal: true,
                    made: write.created_at(),
                });
            }
            What::Evict { of, until } => {
                let evicted = name(*of);
                let made = set[*of].created_at();
                if there.is_some_and(|b| {
                    b.by_signal
                        && b.ends == *until
                        && Some(b.reason_id) == evicted
                        && b.made == made
                }) {
                    there = under.take().filter(|b| b.ends > now);
                }
            }
        }
    }
    match there {
        Some(b) if b.ends > now => Effective::Blocked {
            reason_id: b.reason_id.to_owned(),
            expires_at: b.ends,
        },
        _ => Effective::Unblocked,
    }
}

/// A finding's outline, to count findings alike once: the writes' kinds in write-time order,
/// both orders and what each ends on.
fn shape(finding: &Finding) -> String {
    let kinds: Vec<&str> = finding.set.iter().map(Write::kind).collect();
    let ends = |run: &Run| match &run.outcome {
        Effective::Unblocked => "unblocked".to_owned(),
        Effective::Blocked { .. } => {
            let by = finding
                .set
                .iter()
                .find(|w| tag(run.stored.as_deref()) == Some(w.id))
                .map_or("?", |w| w.kind());
            format!("blocked by the {by}'s")
        }
        Effective::Ignored(_) => "ignored".to_owned(),
    };
    let model = match model(&finding.set, now()) {
        Effective::Blocked { reason_id, .. } if reason_id.starts_with("risk.") => {
            "blocked by the signal's".to_owned()
        }
        Effective::Blocked { .. } => "blocked by the operator's".to_owned(),
        other => other.to_string(),
    };
    format!(
        "{} (one replica: {model}) | {:?} -> {} vs {:?} -> {}",
        kinds.join(" "),
        finding.orders[0],
        ends(&finding.runs[0]),
        finding.orders[1],
        ends(&finding.runs[1]),
    )
}

/// A set of revocations of one subject, sorted by write time: `(write time, before)`.
fn draw_revocations(random: &mut Random, now: i64) -> Vec<(i64, i64)> {
    let n = 2 + random.below(4) as usize;
    let mut set: Vec<(i64, i64)> = Vec::new();
    while set.len() < n {
        let at = now * 1000 - 1 - random.below(8000) as i64;
        if at.rem_euclid(1000) == 0 || set.iter().any(|(t, _)| *t == at) {
            continue;
        }
        let created_at = at.div_euclid(1000);
        // Every token issued up to now, or before some minutes ago (an incident's start); some
        // revocations share a time.
        let before = match random.below(5) {
            0 => created_at,
            1 => now - 600,
            2 => now - 3600,
            3 => created_at - random.below(3) as i64,
            _ => now - 7,
        };
        set.push((at, before));
    }
    set.sort_unstable();
    set
}

/// A stored revocation as a replica reads it (`parse_stored` as `RevocationRecord`, whose members
/// are all required, then `apply_revocation`'s checks): its time, `before`.
fn effective_revocation(stored: Option<&str>, now: i64) -> Result<Option<i64>, String> {
    let Some(stored) = stored else {
        return Ok(None);
    };
    let ahead = MAX_CLOCK_AHEAD_SECONDS;
    let (stamp, json) = stored.split_once('|').ok_or("no stamp")?;
    if stamp.is_empty()
        || !stamp.bytes().all(|b| b.is_ascii_digit())
        || stamp.parse::<i64>().map_err(|e| e.to_string())? > (now + ahead) * 1000
    {
        return Err(format!("stamp {stamp}"));
    }
    let record: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let text = |name: &str| {
        record[name]
            .as_str()
            .map(str::to_owned)
            .ok_or(name.to_owned())
    };
    let int = |name: &str| record[name].as_i64().ok_or(name.to_owned());
    let (before, created_at) = (int("before")?, int("created_at")?);
    check_record(&text("reason_id")?, &text("reason")?, &text("created_by")?)?;
    if before > created_at + ahead || created_at > now + ahead {
        return Err("ahead of the clock".into());
    }
    Ok(Some(before))
}

/// The revocations `set` in `order` into a fresh field: what a replica applies, and the stored
/// value.
fn run_revocations(
    store: &mut Store,
    set: &[(i64, i64)],
    order: &[usize],
    now: i64,
) -> (Result<Option<i64>, String>, Option<String>) {
    let field = store.fresh_field();
    for &i in order {
        let (at_ms, before) = set[i];
        // As `RevocationRecord` serializes it.
        let record = serde_json::json!({
            "before": before, "reason_id": format!("INC-{i}"), "reason": "",
            "created_at": at_ms.div_euclid(1000), "created_by": "san:ops",
        })
        .to_string();
        store.put(
            REVOCATIONS,
            &field,
            at_ms,
            &record,
            "revocation",
            before,
            now,
        );
    }
    let stored = store.get(REVOCATIONS, &field);
    store.forget(REVOCATIONS, &field);
    (effective_revocation(stored.as_deref(), now), stored)
}

#[test]
fn the_store_ends_on_the_same_block_whatever_order_the_writes_arrive_in() {
    let redis = Redis::start();
    let mut store = Store::new(&redis);
    let now = now();
    let fixed: Vec<u64> = (1..=SEEDS).collect();
    let seeds = redis_server::seeds("STEPGATE_PUT_ORDER", &fixed);
    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut shapes: BTreeMap<String, usize> = BTreeMap::new();
    let mut compared = 0_usize;
    for &seed in &seeds {
        let replay = format!("seed {seed} (STEPGATE_PUT_ORDER_SEED={seed} to replay it)");
        let mut random = Random(seed);
        let set = draw_blocks(&mut random, now);
        let orders = orders(&set, &mut random);
        let expected = model(&set, now);
        let baseline = store.run_blocks(&set, &orders[0], now);
        if let Err(broken) = invariants(&set, &baseline, now) {
            failures.push(format!(
                "{replay}, in write-time order: {broken}\n  writes: {set:#?}"
            ));
            continue;
        }
        for other in &orders[1..] {
            compared += 1;
            let run = store.run_blocks(&set, other, now);
            if let Err(broken) = invariants(&set, &run, now) {
                failures.push(format!(
                    "{replay}, arriving {other:?}: {broken}\n  writes: {set:#?}"
                ));
                break;
            }
            if run.outcome == expected && baseline.outcome == expected {
                continue;
            }
            let finding = Finding {
                set: set.clone(),
                orders: [orders[0].clone(), other.clone()],
                runs: [baseline.clone(), run],
            };
            let small = shrink(&mut store, finding.clone(), now);
            let shape = shape(&small);
            *shapes.entry(shape.clone()).or_default() += 1;
            if shapes[&shape] == 1 {
                failures.push(format!(
                    "{replay}: an arrival order does not end on what one replica applying the \
                     writes in write-time order ends on\n{finding}shrunk to:\n{small}"
                ));
            }
            break;
        }

        // Revocations: the latest `before` stays, whatever the order.
        let revocations = draw_revocations(&mut random, now);
        let ids: Vec<usize> = (0..revocations.len()).collect();
        let latest = revocations.iter().map(|(_, before)| *before).max();
        let mut tried = vec![ids.clone(), ids.iter().rev().copied().collect()];
        for _ in 0..3 {
            tried.push(shuffled(&ids, &mut random));
        }
        for order in tried {
            let (got, stored) = run_revocations(&mut store, &revocations, &order, now);
            if got != Ok(latest) {
                failures.push(format!(
                    "{replay}: revocations {revocations:?} (write time in ms, before) arriving \
                     {order:?} end on {got:?} (stored {stored:?}), not the latest {latest:?}"
                ));
                break;
            }
        }
    }
    let lines = |counts: Vec<(String, usize)>| -> String {
        counts
            .into_iter()
            .map(|(what, n)| format!("  {n:>4} × {what}\n"))
            .collect()
    };
    let found = lines(shapes.into_iter().collect());
    eprintln!(
        "{} seeds, {compared} arrival orders beside the write-time order, in {:?}.\nFindings \
         (shrunk, by shape):\n{found}",
        seeds.len(),
        started.elapsed(),
    );
    assert!(
        failures.is_empty(),
        "{} finding(s), the first of each shape shown (now = {now}):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A set of writes, said in words, and two arrival orders of it.
type Case = (&'static str, Vec<Write>, [Vec<usize>; 2]);

/// The smallest findings of the randomized test, one for each defect it found in earlier
/// versions of the script (which kept rules, not writes), and one for each kind of
/// order-dependence those versions documented as intended, written out: both arrival orders of
/// each set must end on what [`model`] says. `ago` is how long before `now` (ms) each write was
/// made, `ends` when its block ends (seconds from `now`).
#[test]
fn the_smallest_findings_end_alike_in_both_orders() {
    let redis = Redis::start();
    let mut store = Store::new(&redis);
    let now = now();
    let at = |ago: i64| now * 1000 - ago;
    let operator = |id: usize, ago: i64, ends: i64| Write {
        id,
        at_ms: at(ago),
        what: What::Operator {
            reason_id: format!("INC-{id}"),
            ends: now + ends,
        },
    };
    let signal = |id: usize, name: &'static str, ago: i64, ends: i64| Write {
        id,
        at_ms: at(ago),
        what: What::Signal {
            name,
            ends: now + ends,
        },
    };
    let lift = |id: usize, ago: i64| Write {
        id,
        at_ms: at(ago),
        what: What::Lift {
            until: now + 86_400,
        },
    };
    let evict = |id: usize, ago: i64, of: usize, until: i64| Write {
        id,
        at_ms: at(ago),
        what: What::Evict {
            of,
            until: now + until,
        },
    };
    let cases: Vec<Case> = vec![
        (
            "a signal's longer block held up is refused over another signal's newer, shorter \
             one: cut to it",
            vec![
                signal(0, "step_ups", 5123, 3600),
                signal(1, "forged", 3123, 60),
            ],
            [vec![0, 1], vec![1, 0]],
        ),
        (
            "... or lost, when the newer one has ended by then",
            vec![
                signal(0, "step_ups", 5123, 3600),
                signal(1, "forged", 3123, -1),
            ],
            [vec![0, 1], vec![1, 0]],
        ),
        (
            "an operator's block held up is refused over a signal's newer, shorter block that \
             has ended: lost",
            vec![operator(0, 5123, 3600), signal(1, "step_ups", 3123, -1)],
            [vec![0, 1], vec![1, 0]],
        ),
        (
            "an operator's block held up is refused over a signal's newer one ending at the \
             same second: the signal's stays",
            vec![operator(0, 5123, 600), signal(1, "step_ups", 3123, 600)],
            [vec![0, 1], vec![1, 0]],
        ),
        (
            "... which an eviction then lifts, where the operator's would have stayed",
            vec![
                operator(0, 5123, 600),
                signal(1, "step_ups", 3123, 600),
                evict(2, 1123, 1, 600),
            ],
            [vec![0, 1, 2], vec![1, 0, 2]],
        ),
        (
            "a signal's block made after a lift, refused over an older signal's block in \
             force, is forgotten: the lift arriving after it leaves nothing",
            vec![
                signal(0, "step_ups", 5123, 3600),
                lift(1, 4123),
                signal(2, "forged", 3123, 600),
            ],
            [vec![0, 1, 2], vec![0, 2, 1]],
        ),
        (
            "... and an operator's shorter block arriving after it leaves that shorter block",
            vec![
                signal(0, "step_ups", 5123, 3600),
                operator(1, 4123, 60),
                signal(2, "forged", 3123, 600),
            ],
            [vec![0, 1, 2], vec![0, 2, 1]],
        ),
        (
            "... and an eviction of the older block arriving after it leaves nothing",
            vec![
                signal(0, "step_ups", 5123, 3600),
                evict(1, 4123, 0, 3600),
                signal(2, "forged", 3123, 600),
            ],
            [vec![0, 1, 2], vec![0, 2, 1]],
        ),
        (
            "a signal's block an operator's record keeps is dropped when another signal's \
             longer block replaces the record: an operator's shorter block older than the \
             kept one, arriving last, leaves that shorter block",
            vec![
                operator(0, 7663, 600),
                signal(1, "step_ups", 7561, 7200),
                operator(2, 4992, 30),
                signal(3, "forged", 1046, 60),
            ],
            [vec![0, 1, 2, 3], vec![0, 3, 1, 2]],
        ),
        (
            "a record keeping a newer, shorter signal's block forgot an older, longer one \
             that replaces the block it stands for; an operator's block older than both, \
             arriving last, leaves its own shorter block",
            vec![
                signal(0, "forged", 7751, 7200),
                operator(1, 5666, 600),
                signal(2, "forged", 1165, 3600),
                signal(3, "forged", 550, 2),
            ],
            [vec![0, 1, 2, 3], vec![3, 2, 0, 1]],
        ),
        (
            "a record keeping an older, longer signal's block refused a newer, shorter one and \
             forgot it; a lift older than it, arriving last, leaves nothing",
            vec![
                signal(0, "forged", 2450, 600),
                signal(1, "step_ups", 2212, 600),
                lift(2, 2150),
                signal(3, "forged", 821, 60),
            ],
            [vec![0, 1, 2, 3], vec![0, 1, 3, 2]],
        ),
        (
            "an eviction of a signal's block that lengthened an operator's lifted the \
             operator's too, where the operator's block arriving after it stayed",
            vec![
                operator(0, 5123, 600),
                signal(1, "step_ups", 4123, 3600),
                evict(2, 3123, 1, 3600),
            ],
            [vec![0, 1, 2], vec![1, 2, 0]],
        ),
        (
            "an eviction lifted whatever signal's block it found when it arrived: a later \
             signal's block",
            vec![
                signal(0, "forged", 5123, 600),
                evict(1, 4123, 0, 600),
                signal(2, "step_ups", 3123, 3600),
            ],
            [vec![0, 1, 2], vec![0, 2, 1]],
        ),
        (
            "two evictions of one block",
            vec![
                signal(0, "forged", 5123, 3600),
                evict(1, 4123, 0, 3600),
                evict(2, 3123, 0, 3600),
                signal(3, "step_ups", 2123, 7200),
            ],
            [vec![0, 1, 2, 3], vec![0, 2, 1, 3]],
        ),
        (
            "an eviction lifted another signal's block ending in the same second (matched by \
             its end alone)",
            vec![
                signal(0, "forged", 9123, 600),
                operator(1, 8123, 300),
                signal(2, "step_ups", 6123, 600),
                evict(3, 5123, 0, 600),
            ],
            [vec![0, 1, 2, 3], vec![0, 1, 3, 2]],
        ),
        (
            "of two signals' blocks ending at the same second, the one that arrived first stayed",
            vec![
                signal(0, "forged", 5123, 600),
                signal(1, "step_ups", 4123, 600),
            ],
            [vec![0, 1], vec![1, 0]],
        ),
    ];
    let mut failures = Vec::new();
    for (what, set, [first, second]) in &cases {
        match compare(&mut store, set, [first, second], now) {
            Ok(None) => {}
            Ok(Some(finding)) => failures.push(format!("{what}:\n{finding}")),
            Err(broken) => failures.push(format!("{what}: {broken}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} sets end differently by arrival order (now = {now}):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
