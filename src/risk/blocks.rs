//! Blocks set by operators through the admin API: subjects, tenants, clients, single tokens (by
//! fingerprint) and source addresses or CIDRs, each until it expires.
//!
//! The request path reads them without waiting: with no block in force it pays one atomic load;
//! otherwise one hash lookup per kind the request has (subject, tenant, client, token) and a
//! scan of the source blocks, which are few (an operator's list) and bounded with the rest
//! ([`MAX_BLOCKS`]). An expired block stops applying at once, and is swept out when its room is
//! needed.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use ipnet::IpNet;

use crate::{identity::Principal, telemetry::metrics};

/// Most blocks held at once; more are refused (the admin API says so).
pub const MAX_BLOCKS: usize = 100_000;
/// Most source blocks among them: each request from a source is compared with every one.
pub const MAX_SOURCE_BLOCKS: usize = 1024;
/// Most of those that risk signals may hold: the rest is the operators'. When risk signals hold
/// this many, a new one replaces the one of theirs that ends first, so that anyone able to trip a
/// signal from many networks cannot fill the table and stop every later block (and operators'
/// blocks are never replaced, nor a signal's block that lengthened an operator's still in force:
/// evicting it would lift the operator's).
pub const MAX_RISK_SOURCE_BLOCKS: usize = 768;
/// Most blocks of the other kinds (subject, tenant, client, token) that risk signals may hold:
/// the rest of [`MAX_BLOCKS`] is the operators'. Past it a signal's new block is refused (and
/// logged), so that whoever can mint tokens and trip a `key: token` signal with each cannot fill
/// the table and lock the operators out of `stepgate admin block` during the incident.
pub const MAX_RISK_BLOCKS: usize = 75_000;
/// `created_by` of the blocks risk signals set (`risk:<signal>`).
pub const RISK_CREATOR_PREFIX: &str = "risk:";
/// Longest a block may last: 90 days.
pub const MAX_TTL_SECONDS: i64 = 90 * 24 * 3600;

/// What a block applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Subject,
    Tenant,
    ClientId,
    /// A token's fingerprint (12 hex digits).
    Token,
    /// A token's `jti` (or Entra `uti`).
    TokenId,
    /// A source address or CIDR.
    Source,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subject => "subject",
            Self::Tenant => "tenant",
            Self::ClientId => "client_id",
            Self::Token => "token",
            Self::TokenId => "token_id",
            Self::Source => "source",
        }
    }
}

/// One block, as set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub kind: Kind,
    /// The target as stored: a source in its canonical CIDR form (`203.0.113.7/32`).
    pub value: String,
    pub reason_id: Arc<str>,
    pub reason: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub created_by: String,
}

/// What a request is checked against: the fields of its verified token.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    pub subject: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub token: Option<&'a str>,
    pub token_id: Option<&'a str>,
}

impl<'a> Subject<'a> {
    /// What a block may match in a verified token: its principal's subject, tenant, client and
    /// token id, and `fingerprint`, the token's (its decision-log `token`). The decisions and the
    /// admin API's own callers are checked against the same fields.
    pub fn of_token(principal: &'a Principal, fingerprint: Option<&'a str>) -> Self {
        Self {
            subject: Some(&principal.subject),
            tenant: principal.tenant.as_deref(),
            client_id: principal.client_id.as_deref(),
            token: fingerprint,
            token_id: principal.token_id.as_deref(),
        }
    }
}

/// How long a lift is remembered, to hold a signal off: longer than a signal's two windows.
const LIFTS_KEPT_SECONDS: i64 = 86_400;

#[derive(Debug, Default)]
struct Table {
    /// One map per kind but `Source` (indexed by [`exact_slot`]), so a lookup by `&str` needs
    /// no key of its own.
    exact: [HashMap<String, Arc<Block>>; 5],
    sources: Vec<(IpNet, Arc<Block>)>,
    /// Blocks in `exact` that risk signals set.
    risk_exact: usize,
    /// When expired blocks were last swept out (unix seconds).
    swept_at: i64,
    /// An operator's source block that a risk signal's longer block replaced, by network: that
    /// signal's block is never evicted to make room for another while the operator's would
    /// still be in force, or the eviction would lift what an operator set.
    held_under: HashMap<IpNet, Arc<Block>>,
    /// When an operator (or the store, for one) last lifted a block, by kind and value: a risk
    /// signal does not block that key again while the counts of before the lift last
    /// ([`Blocks::lifted_at`]).
    lifted: HashMap<(Kind, String), i64>,
}

/// The blocks in force, shared by the admin API and the request path.
#[derive(Debug, Default)]
pub struct Blocks {
    table: RwLock<Table>,
    /// Blocks held (expired ones included until swept): zero means the request path skips the
    /// table entirely.
    count: AtomicUsize,
}

/// Why a block was not set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_BLOCKS} blocks are in force already; lift some first")]
    Full,
    #[error(
        "{MAX_SOURCE_BLOCKS} source blocks are in force already; lift some, or block a wider CIDR"
    )]
    FullOfSources,
    #[error("risk signals hold {MAX_RISK_BLOCKS} blocks already: the rest is kept for operators")]
    FullForSignals,
}

impl Blocks {
    /// Sets (or replaces) a block. `value` is checked for its kind: a source must be an IP
    /// address or a CIDR, a token fingerprint 12 lower-case hex digits.
    pub fn set(&self, block: Block, now: i64) -> Result<Arc<Block>, BlockError> {
        self.set_evicting(block, now, true).map(|(block, _)| block)
    }

    /// [`Self::set`], and the risk signals' source block it evicted to make room, if any (the
    /// shared store must drop it too, or it would come back at every resync).
    ///
    /// With `keep_longer`, a risk signal's block never shortens a block in force: the one in
    /// force is returned, unchanged. A block the shared store holds is applied as it is (the
    /// store's record is the cluster's word: an operator's lift this replica missed, then a
    /// signal's block written over it, must not bring the lifted block back).
    pub fn set_evicting(
        &self,
        mut block: Block,
        now: i64,
        keep_longer: bool,
    ) -> Result<(Arc<Block>, Option<Arc<Block>>), BlockError> {
        block.value = normalize(block.kind, &block.value)?;
        if block.expires_at <= now {
            return Err(BlockError::Invalid(
                "the block would already be over".into(),
            ));
        }
        let block = Arc::new(block);
        let mut table = self.write();
        // A risk signal's block never shortens a block in force (an operator's hour is not cut
        // to a signal's minutes): the one in force stays.
        if keep_longer
            && block.created_by.starts_with(RISK_CREATOR_PREFIX)
            && let Some(existing) = table.in_force(block.kind, &block.value, now)
            && existing.expires_at >= block.expires_at
        {
            return Ok((existing, None));
        }
        let replaces = table.contains(block.kind, &block.value);
        if !replaces && table.len() >= MAX_BLOCKS {
            // Expired blocks stay until room is needed.
            table.sweep(now);
            if table.len() >= MAX_BLOCKS {
                return Err(BlockError::Full);
            }
        }
        let mut evicted = None;
        if block.kind == Kind::Source {
            let net: IpNet = block.value.parse().expect("normalized above");
            let by_risk = block.created_by.starts_with(RISK_CREATOR_PREFIX);
            let replaced = table
                .in_force(Kind::Source, &block.value, now)
                .filter(|_| by_risk);
            let held = replaced.and_then(|replaced| {
                if replaced.created_by.starts_with(RISK_CREATOR_PREFIX) {
                    table.held_under.get(&net).cloned()
                } else {
                    Some(replaced)
                }
            });
            // What was there, put back if there is no room for the new block after all.
            let previous_held = table.held_under.remove(&net);
            if let Some(held) = held.filter(|held| held.expires_at > now) {
                table.held_under.insert(net, held);
            }
            let previous = table
                .sources
                .iter()
                .position(|(n, _)| *n == net)
                .map(|at| table.sources.remove(at));
            let full = |table: &Table| {
                table.sources.len() >= MAX_SOURCE_BLOCKS
                    || (by_risk && table.risk_sources() >= MAX_RISK_SOURCE_BLOCKS)
            };
            if full(&table) {
                table.sweep(now);
            }
            if full(&table) && by_risk {
                evicted = table.evict_risk_source(now);
                if evicted.is_some() {
                    metrics::global().record_risk_block_evicted();
                }
            }
            if full(&table) {
                table.sources.extend(previous);
                table.held_under.remove(&net);
                if let Some(held) = previous_held {
                    table.held_under.insert(net, held);
                }
                return Err(BlockError::FullOfSources);
            }
            table.sources.push((net, Arc::clone(&block)));
        } else {
            let slot = exact_slot(block.kind);
            let by_risk = is_by_risk(&block);
            let was_risk = table.exact[slot].get(&block.value).is_some_and(is_by_risk);
            if by_risk && !was_risk && table.risk_exact >= MAX_RISK_BLOCKS {
                // Swept at most once a second: every refused attempt would otherwise walk the
                // whole table under the lock the request path reads.
                if table.swept_at != now {
                    table.sweep(now);
                }
                if table.risk_exact >= MAX_RISK_BLOCKS {
                    return Err(BlockError::FullForSignals);
                }
            }
            table.exact[slot].insert(block.value.clone(), Arc::clone(&block));
            table.risk_exact = table.risk_exact + usize::from(by_risk) - usize::from(was_risk);
        }
        self.count.store(table.len(), Relaxed);
        metrics::global().set_blocks_held(table.len());
        Ok((block, evicted))
    }

    /// Lifts a block; whether there was one (in force) to lift.
    pub fn remove(&self, kind: Kind, value: &str, now: i64) -> Result<bool, BlockError> {
        let value = normalize(kind, value)?;
        let mut table = self.write();
        table.note_lift(kind, &value, now, now);
        let removed = if kind == Kind::Source {
            let net: IpNet = value.parse().expect("normalized above");
            let at = table.sources.iter().position(|(n, _)| *n == net);
            table.held_under.remove(&net);
            at.map(|i| table.sources.remove(i))
                .is_some_and(|(_, b)| b.expires_at > now)
        } else {
            let removed = table.exact[exact_slot(kind)].remove(&value);
            if removed.as_ref().is_some_and(is_by_risk) {
                table.risk_exact -= 1;
            }
            removed.is_some_and(|b| b.expires_at > now)
        };
        self.count.store(table.len(), Relaxed);
        metrics::global().set_blocks_held(table.len());
        Ok(removed)
    }

    /// A lift made at `at` (unix seconds) by another replica, of a block this one does not
    /// hold: kept as [`Self::remove`] keeps its own, so that a signal does not block that key
    /// again here while the counts of before the lift last. Under the read lock alone when it is
    /// known already (a resync reads every lift the store holds).
    pub fn note_lifted(&self, kind: Kind, value: &str, at: i64, now: i64) {
        let Ok(value) = normalize(kind, value) else {
            return;
        };
        if now - at >= LIFTS_KEPT_SECONDS
            || self
                .lifted_at(kind, &value)
                .is_some_and(|known| known >= at)
        {
            return;
        }
        self.write().note_lift(kind, &value, at, now);
    }

    /// When a block on exactly this target (`value` normalized) was last lifted, if it was.
    pub fn lifted_at(&self, kind: Kind, value: &str) -> Option<i64> {
        self.read().lifted.get(&(kind, value.to_owned())).copied()
    }

    /// The block in force on exactly this target (`value` normalized), if any.
    pub fn get(&self, kind: Kind, value: &str, now: i64) -> Option<Arc<Block>> {
        self.read().in_force(kind, value, now)
    }

    /// The blocks in force, by kind and value.
    pub fn list(&self, now: i64) -> Vec<Arc<Block>> {
        let table = self.read();
        let mut blocks: Vec<Arc<Block>> = table
            .exact
            .iter()
            .flat_map(HashMap::values)
            .chain(table.sources.iter().map(|(_, b)| b))
            .filter(|b| b.expires_at > now)
            .cloned()
            .collect();
        blocks.sort_by(|a, b| (a.kind, &a.value).cmp(&(b.kind, &b.value)));
        blocks
    }

    /// The block in force on a token's subject, tenant, client or fingerprint, if any.
    pub fn matching(&self, who: Subject<'_>, now: i64) -> Option<Arc<Block>> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let table = self.read();
        [
            (Kind::Subject, who.subject),
            (Kind::Tenant, who.tenant),
            (Kind::ClientId, who.client_id),
            (Kind::Token, who.token),
            (Kind::TokenId, who.token_id),
        ]
        .into_iter()
        .filter_map(|(kind, value)| Some((kind, value?)))
        .find_map(|(kind, value)| {
            table.exact[exact_slot(kind)]
                .get(value)
                .filter(|b| b.expires_at > now)
                .cloned()
        })
    }

    /// The block in force on a source address (`203.0.113.7`, `2001:db8::1`), if any. An
    /// address that does not parse matches nothing.
    pub fn matching_source(&self, address: &str, now: i64) -> Option<Arc<Block>> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let address = address.parse::<IpAddr>().ok()?.to_canonical();
        let table = self.read();
        table
            .sources
            .iter()
            .find(|(net, block)| block.expires_at > now && net.contains(&address))
            .map(|(_, block)| Arc::clone(block))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Table {
    /// A lift of `kind`/`value` made at `at`, kept unless a later one is.
    fn note_lift(&mut self, kind: Kind, value: &str, at: i64, now: i64) {
        if self.lifted.len() >= MAX_BLOCKS {
            self.lifted.retain(|_, at| now - *at < LIFTS_KEPT_SECONDS);
            if self.lifted.len() >= MAX_BLOCKS {
                self.lifted.clear();
            }
        }
        let known = self.lifted.entry((kind, value.to_owned())).or_insert(at);
        *known = (*known).max(at);
    }

    fn len(&self) -> usize {
        self.exact.iter().map(HashMap::len).sum::<usize>() + self.sources.len()
    }

    /// The block in force on exactly this target (`value` normalized), if any.
    fn in_force(&self, kind: Kind, value: &str, now: i64) -> Option<Arc<Block>> {
        let block = if kind == Kind::Source {
            self.sources
                .iter()
                .find(|(net, _)| net.to_string() == value)
                .map(|(_, b)| b)
        } else {
            self.exact[exact_slot(kind)].get(value)
        };
        block.filter(|b| b.expires_at > now).cloned()
    }

    fn contains(&self, kind: Kind, value: &str) -> bool {
        if kind == Kind::Source {
            let net = value.parse::<IpNet>().ok();
            self.sources.iter().any(|(n, _)| Some(*n) == net)
        } else {
            self.exact[exact_slot(kind)].contains_key(value)
        }
    }

    /// Source blocks risk signals set.
    fn risk_sources(&self) -> usize {
        self.sources
            .iter()
            .filter(|(_, b)| b.created_by.starts_with(RISK_CREATOR_PREFIX))
            .count()
    }

    /// Drops the risk signals' source block that ends first, and returns it: none that holds
    /// an operator's block in force under it ([`Table::held_under`]), which an eviction would
    /// lift.
    fn evict_risk_source(&mut self, now: i64) -> Option<Arc<Block>> {
        let first = self
            .sources
            .iter()
            .enumerate()
            .filter(|(_, (net, b))| {
                b.created_by.starts_with(RISK_CREATOR_PREFIX)
                    && self.held_under.get(net).is_none_or(|h| h.expires_at <= now)
            })
            .min_by_key(|(_, (_, b))| b.expires_at)
            .map(|(i, _)| i);
        let (net, block) = self.sources.remove(first?);
        self.held_under.remove(&net);
        Some(block)
    }

    fn sweep(&mut self, now: i64) {
        self.swept_at = now;
        let mut swept_risk = 0;
        for map in &mut self.exact {
            map.retain(|_, b| {
                let keep = b.expires_at > now;
                swept_risk += usize::from(!keep && is_by_risk(b));
                keep
            });
        }
        self.risk_exact -= swept_risk;
        self.sources.retain(|(_, b)| b.expires_at > now);
        self.held_under.retain(|_, b| b.expires_at > now);
    }
}

/// Whether a risk signal set `block`.
fn is_by_risk(block: &Arc<Block>) -> bool {
    block.created_by.starts_with(RISK_CREATOR_PREFIX)
}

/// Where a kind's map is in [`Table::exact`].
fn exact_slot(kind: Kind) -> usize {
    match kind {
        Kind::Subject => 0,
        Kind::Tenant => 1,
        Kind::ClientId => 2,
        Kind::Token => 3,
        Kind::TokenId => 4,
        Kind::Source => unreachable!("sources are CIDRs, kept apart"),
    }
}

/// The stored form of a target: a source as a CIDR (an address is its /32 or /128, host bits
/// cleared), a fingerprint checked, other values as given (non-empty, at most 1 KiB).
/// An IPv4 address or network written in IPv6's mapped form (`::ffff:192.0.2.7`,
/// `::ffff:192.0.2.0/120`) as the IPv4 one it is: a dual-stack proxy or listener may report an
/// IPv4 client either way, and the two spellings must be one source to count and to block.
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6.addr().to_ipv4_mapped().map_or(net, |v4| {
            IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_or(net, |n| n.trunc())
        }),
        _ => net,
    }
}

/// A network (`10.0.0.0/8`) or one address (`10.1.2.3`, as a /32 or /128), as written: bits past
/// the prefix are kept, for the caller to drop or refuse.
pub fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// The longest value a block or a revocation holds. A verified token whose subject, tenant,
/// client or token id is longer is refused (`claim_invalid`), so that every holder of a token
/// stepgate accepts can be blocked by each of them.
pub const MAX_BLOCKED_VALUE_BYTES: usize = 1024;

pub fn normalize(kind: Kind, value: &str) -> Result<String, BlockError> {
    if value.is_empty() || value.len() > MAX_BLOCKED_VALUE_BYTES {
        return Err(BlockError::Invalid(format!(
            "a {} must be 1 to {MAX_BLOCKED_VALUE_BYTES} bytes",
            kind.as_str()
        )));
    }
    match kind {
        Kind::Source => {
            // Bits past the prefix are dropped: a block errs on the wide side.
            let net = parse_net(value).ok_or_else(|| {
                BlockError::Invalid(format!(
                    "source {value:?} is neither an IP address nor a CIDR"
                ))
            })?;
            Ok(canonical_net(net.trunc()).to_string())
        }
        Kind::Token => {
            if value.len() == 12
                && value
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                Ok(value.to_owned())
            } else {
                Err(BlockError::Invalid(format!(
                    "token {value:?} is not a fingerprint (12 lower-case hex digits, as the \
                     decision log's `token`)"
                )))
            }
        }
        Kind::Subject | Kind::Tenant | Kind::ClientId | Kind::TokenId => Ok(value.to_owned()),
    }
}

/// `text` as an operator may write it into a block, an unblock or a revocation: without control
/// characters (`char::is_control`: U+0000–U+001F, U+007F and the C1 range U+0080–U+009F), which
/// could start a forged line in a text log or hide what follows them. The error names `field`,
/// never the text.
///
/// Checked at the admin API, not in [`normalize`]: a risk signal's block and a block shared
/// through Redis go through `normalize` too, and a verified token whose subject holds a control
/// character must still be blockable by a signal (the logs escape it).
pub fn check_text(field: &str, text: &str) -> Result<(), String> {
    if text.chars().any(char::is_control) {
        Err(format!(
            "{field}: control characters (U+0000 to U+001F, U+007F to U+009F) are not allowed"
        ))
    } else {
        Ok(())
    }
}

/// The most a block's or a revocation's free-text reason holds, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// The most a block's or a revocation's `created_by` holds, in bytes (an admin token's is its
/// issuer and subject).
pub const MAX_CREATED_BY_BYTES: usize = 1024;

/// Whether a block or revocation made elsewhere (another replica's, read from the shared store)
/// is one a replica could have made: a reason id of the admin API's characters (up to 128: a
/// risk signal's is `risk.` and its name), and a reason and author of bounded size without
/// control characters. The error names the field, never its text.
pub fn check_record(reason_id: &str, reason: &str, created_by: &str) -> Result<(), String> {
    if !(1..=128).contains(&reason_id.len()) || !reason_id.bytes().all(reason_id_byte) {
        return Err("reason_id: 1 to 128 letters, digits, '-', '_' or '.'".to_owned());
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(format!("reason: at most {MAX_REASON_BYTES} bytes"));
    }
    if created_by.len() > MAX_CREATED_BY_BYTES {
        return Err(format!("created_by: at most {MAX_CREATED_BY_BYTES} bytes"));
    }
    check_text("reason", reason)?;
    check_text("created_by", created_by)
}

fn reason_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Whether `id` can be a block's reason id: 1 to 64 of letters, digits, `-`, `_`, `.`.
pub fn valid_reason_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(reason_id_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn block(kind: Kind, value: &str, ttl: i64) -> Block {
        Block {
            kind,
            value: value.to_owned(),
            reason_id: Arc::from("INC-1"),
            reason: "account takeover".to_owned(),
            created_at: NOW,
            expires_at: NOW + ttl,
            created_by: "san:ops".to_owned(),
        }
    }

    #[test]
    fn a_subject_block_applies_until_it_expires_or_is_lifted() {
        let blocks = Blocks::default();
        let alice = Subject {
            subject: Some("alice"),
            ..Subject::default()
        };
        assert!(blocks.matching(alice, NOW).is_none());
        blocks.set(block(Kind::Subject, "alice", 60), NOW).unwrap();
        assert_eq!(&*blocks.matching(alice, NOW).unwrap().reason_id, "INC-1");
        let bob = Subject {
            subject: Some("bob"),
            ..Subject::default()
        };
        assert!(blocks.matching(bob, NOW).is_none());
        assert!(blocks.matching(alice, NOW + 60).is_none(), "expired");
        assert!(blocks.remove(Kind::Subject, "alice", NOW).unwrap());
        assert!(blocks.matching(alice, NOW).is_none());
        assert!(!blocks.remove(Kind::Subject, "alice", NOW).unwrap());
    }

    #[test]
    fn sources_match_by_cidr_in_both_families() {
        let blocks = Blocks::default();
        blocks
            .set(block(Kind::Source, "203.0.113.9/24", 60), NOW)
            .unwrap();
        blocks
            .set(block(Kind::Source, "2001:db8::1", 60), NOW)
            .unwrap();
        assert!(blocks.matching_source("203.0.113.200", NOW).is_some());
        assert!(blocks.matching_source("203.0.114.1", NOW).is_none());
        assert!(blocks.matching_source("2001:db8::1", NOW).is_some());
        assert!(blocks.matching_source("2001:db8::2", NOW).is_none());
        assert!(blocks.matching_source("not an address", NOW).is_none());
        let listed: Vec<String> = blocks.list(NOW).iter().map(|b| b.value.clone()).collect();
        assert_eq!(listed, ["2001:db8::1/128", "203.0.113.0/24"]);
        assert!(blocks.remove(Kind::Source, "203.0.113.0/24", NOW).unwrap());
        assert!(blocks.matching_source("203.0.113.200", NOW).is_none());
    }

    #[test]
    fn an_ipv4_source_in_ipv6_mapped_form_is_the_same_source() {
        let blocks = Blocks::default();
        blocks
            .set(block(Kind::Source, "192.0.2.0/24", 60), NOW)
            .unwrap();
        assert!(blocks.matching_source("::ffff:192.0.2.66", NOW).is_some());
        blocks
            .set(block(Kind::Source, "::ffff:198.51.100.9/120", 60), NOW)
            .unwrap();
        assert!(blocks.matching_source("198.51.100.7", NOW).is_some());
        let listed: Vec<String> = blocks.list(NOW).iter().map(|b| b.value.clone()).collect();
        assert_eq!(listed, ["192.0.2.0/24", "198.51.100.0/24"]);
        // A mapped block does not swallow IPv6 as a whole, nor the other way round.
        assert!(blocks.matching_source("::1", NOW).is_none());
        assert!(blocks.matching_source("2001:db8::1", NOW).is_none());
        assert!(
            matches!(
                canonical_net("::ffff:0:0/64".parse().unwrap()),
                IpNet::V6(_)
            ),
            "a network wider than the mapped range stays IPv6"
        );
    }

    #[test]
    fn risk_signals_cannot_fill_the_source_table_and_never_replace_operators_blocks() {
        let blocks = Blocks::default();
        let by = |creator: &str, net: String, ttl: i64| Block {
            created_by: creator.to_owned(),
            ..block(Kind::Source, &net, ttl)
        };
        // Operators' blocks first, then risk signals' up to their share, each ending later.
        for i in 0..100 {
            blocks
                .set(by("san:ops", format!("10.0.{i}.0/24"), 3600), NOW)
                .unwrap();
        }
        for i in 0..MAX_RISK_SOURCE_BLOCKS as i64 {
            let net = format!("2001:db8:{i:x}::/64");
            blocks.set(by("risk:forged", net, 600 + i), NOW).unwrap();
        }
        // One more from a signal: set, in place of the signal's block that ends first.
        let newest = by("risk:forged", "198.51.100.0/24".into(), 600);
        blocks
            .set(newest, NOW)
            .expect("the newest attacker is blocked");
        assert!(blocks.matching_source("198.51.100.7", NOW).is_some());
        assert!(
            blocks.matching_source("2001:db8::1", NOW).is_none(),
            "the risk block ending first made room"
        );
        assert!(blocks.matching_source("2001:db8:1::1", NOW).is_some());
        // Operators still have room, and none of their blocks was replaced.
        for i in 100..(MAX_SOURCE_BLOCKS - MAX_RISK_SOURCE_BLOCKS) {
            blocks
                .set(
                    by("san:ops", format!("10.1.{}.{}/32", i / 256, i % 256), 3600),
                    NOW,
                )
                .unwrap();
        }
        assert_eq!(
            blocks.set(by("san:ops", "192.0.2.0/24".into(), 3600), NOW),
            Err(BlockError::FullOfSources),
            "past the whole table, operators are told"
        );
        for i in 0..100 {
            assert!(
                blocks
                    .matching_source(&format!("10.0.{i}.1"), NOW)
                    .is_some()
            );
        }
    }

    #[test]
    fn a_signals_block_that_lengthened_an_operators_is_not_evicted_while_that_one_lasts() {
        let blocks = Blocks::default();
        let by = |creator: &str, net: &str, ttl: i64| Block {
            created_by: creator.to_owned(),
            ..block(Kind::Source, net, ttl)
        };
        // An operator's hour on a network, which a signal then lengthens to two (and a second
        // signal to three: the operator's block is still under it).
        blocks
            .set(by("san:ops", "192.0.2.0/24", 3600), NOW)
            .unwrap();
        blocks.set(by("risk:a", "192.0.2.0/24", 7200), NOW).unwrap();
        blocks
            .set(by("risk:b", "192.0.2.0/24", 10_800), NOW)
            .unwrap();
        // Signals' blocks up to their share, all ending before it: the flood a replica makes
        // room for by evicting the signal's block that ends first.
        for i in 1..MAX_RISK_SOURCE_BLOCKS as i64 {
            let net = format!("2001:db8:{i:x}::/64");
            blocks.set(by("risk:flood", &net, 600 + i), NOW).unwrap();
        }
        for i in 0..MAX_RISK_SOURCE_BLOCKS as i64 {
            let net = format!("2001:db9:{i:x}::/64");
            let (_, evicted) = blocks
                .set_evicting(by("risk:flood", &net, 20_000 + i), NOW, true)
                .unwrap();
            let evicted = evicted.expect("room is made by evicting");
            assert_ne!(evicted.value, "192.0.2.0/24", "evicted at the {i}th");
        }
        let held = blocks
            .matching_source("192.0.2.1", NOW)
            .expect("still blocked");
        assert_eq!(held.created_by, "risk:b");
        // Once the operator's block would have ended, the signal's is a signal's like the rest.
        let later = NOW + 3600;
        let (_, evicted) = blocks
            .set_evicting(by("risk:flood", "198.51.100.0/24", 30_000), later, true)
            .unwrap();
        assert_eq!(evicted.unwrap().value, "192.0.2.0/24");
        // When every signal's block holds an operator's, the next is refused rather than lift
        // one of them.
        let blocks = Blocks::default();
        for i in 0..MAX_RISK_SOURCE_BLOCKS {
            let net = format!("10.{}.{}.0/24", i / 256, i % 256);
            blocks.set(by("san:ops", &net, 3600), NOW).unwrap();
            blocks.set(by("risk:a", &net, 7200), NOW).unwrap();
        }
        assert_eq!(
            blocks.set(by("risk:flood", "198.51.100.0/24", 600), NOW),
            Err(BlockError::FullOfSources)
        );
        // Nor does a refused one lift the operator's block it would have lengthened.
        blocks
            .set(by("san:ops", "203.0.113.0/24", 3600), NOW)
            .unwrap();
        assert_eq!(
            blocks.set(by("risk:flood", "203.0.113.0/24", 7200), NOW),
            Err(BlockError::FullOfSources)
        );
        let still = blocks
            .matching_source("203.0.113.9", NOW)
            .expect("still blocked");
        assert_eq!(still.created_by, "san:ops");
        // A lift, or an operator's new block, ends what was held: none is kept past them.
        let blocks = Blocks::default();
        let net = "203.0.113.0/24";
        let held = |blocks: &Blocks| blocks.read().held_under.contains_key(&net.parse().unwrap());
        blocks.set(by("san:ops", net, 60), NOW).unwrap();
        blocks.set(by("risk:a", net, 120), NOW).unwrap();
        assert!(held(&blocks));
        blocks.remove(Kind::Source, net, NOW).unwrap();
        blocks.set(by("risk:a", net, 120), NOW).unwrap();
        assert!(!held(&blocks), "lifted");
        blocks.set(by("san:ops", net, 60), NOW).unwrap();
        blocks.set(by("risk:a", net, 120), NOW).unwrap();
        blocks.set(by("san:ops", net, 60), NOW).unwrap();
        assert!(!held(&blocks), "an operator's block replaced the signal's");
    }

    #[test]
    fn bad_targets_are_refused() {
        let blocks = Blocks::default();
        for (kind, value) in [
            (Kind::Source, "203.0.113.300"),
            (Kind::Source, "example.com"),
            (Kind::Token, "sha256:abcd"),
            (Kind::Token, "ABCDEF012345"),
            (Kind::Subject, ""),
        ] {
            assert!(
                matches!(
                    blocks.set(block(kind, value, 60), NOW),
                    Err(BlockError::Invalid(_))
                ),
                "{kind:?} {value:?}"
            );
        }
        assert!(
            blocks.set(block(Kind::Subject, "a", 0), NOW).is_err(),
            "already over"
        );
        assert!(check_record("risk.forged_tokens", "risk signal …", "risk:forged_tokens").is_ok());
        assert!(check_record(&"r".repeat(128), "", "").is_ok());
        for (id, reason, by) in [
            ("", "x", "x"),
            (&*"r".repeat(129), "x", "x"),
            ("has space", "x", "x"),
            ("INC-1", &*"x".repeat(MAX_REASON_BYTES + 1), "x"),
            ("INC-1", "x", &*"x".repeat(MAX_CREATED_BY_BYTES + 1)),
            ("INC-1", "line\nFORGED", "x"),
            ("INC-1", "x", "san:ops\u{1b}[2J"),
        ] {
            assert!(
                check_record(id, reason, by).is_err(),
                "{id:?} {reason:?} {by:?}"
            );
        }
        assert!(valid_reason_id("INC-2024.7_a"));
        assert!(!valid_reason_id("has space"));
        assert!(!valid_reason_id(""));
    }

    #[test]
    fn text_with_a_control_character_is_refused_naming_its_field() {
        for text in [
            "a\nb",
            "a\rb",
            "\u{0}",
            "tab\there",
            "del\u{7f}",
            "c1\u{85}",
            "\u{9f}",
        ] {
            let refused = check_text("target.value", text).expect_err(text);
            assert!(refused.starts_with("target.value: "), "{refused}");
            assert!(!refused.contains(text), "the text is not echoed: {refused}");
        }
        for text in ["alice", "Zoë \"quoted\" by=x", "\u{a0}", "\u{2028}", ""] {
            assert_eq!(check_text("reason", text), Ok(()), "{text:?}");
        }
        // The table itself takes such a subject: a risk signal blocks a verified token's.
        let blocks = Blocks::default();
        blocks.set(block(Kind::Subject, "eve\nx", 60), NOW).unwrap();
        let eve = Subject {
            subject: Some("eve\nx"),
            ..Subject::default()
        };
        assert!(blocks.matching(eve, NOW).is_some());
    }

    #[test]
    fn the_table_is_bounded_and_replacing_does_not_count_twice() {
        let blocks = Blocks::default();
        for i in 0..MAX_BLOCKS {
            blocks
                .set(block(Kind::Subject, &format!("user{i}"), 60), NOW)
                .unwrap();
        }
        assert_eq!(
            blocks.set(block(Kind::Subject, "one-more", 60), NOW),
            Err(BlockError::Full)
        );
        assert!(blocks.set(block(Kind::Subject, "user7", 120), NOW).is_ok());
        // Expired blocks make room when it is needed.
        assert!(
            blocks
                .set(block(Kind::Subject, "later", 200), NOW + 121)
                .is_ok()
        );
    }

    /// Risk signals hold at most [`MAX_RISK_BLOCKS`] blocks of the exact kinds: the rest of the
    /// table is the operators', whoever can trip a `key: token` signal with token after token.
    #[test]
    fn signals_leave_room_for_the_operators() {
        let blocks = Blocks::default();
        let by_signal = |value: &str, ttl: i64| Block {
            created_by: format!("{RISK_CREATOR_PREFIX}token_replay"),
            ..block(Kind::Token, value, ttl)
        };
        let hex = |i: usize| format!("{i:012x}");
        for i in 0..MAX_RISK_BLOCKS {
            blocks.set(by_signal(&hex(i), 60), NOW).unwrap();
        }
        assert_eq!(
            blocks.set(by_signal(&hex(MAX_RISK_BLOCKS), 60), NOW),
            Err(BlockError::FullForSignals)
        );
        // The same block again (a signal blocking again) replaces, and counts once.
        assert!(blocks.set(by_signal(&hex(7), 120), NOW).is_ok());
        // An operator's block still fits, on any kind.
        assert!(blocks.set(block(Kind::Subject, "mallory", 60), NOW).is_ok());
        assert!(
            blocks.set(block(Kind::Token, &hex(9), 60), NOW).is_ok(),
            "an operator's over a signal's"
        );
        // Room comes back as signals' blocks are lifted or replaced, and as they expire.
        assert!(
            blocks
                .set(by_signal(&hex(MAX_RISK_BLOCKS), 60), NOW)
                .is_ok()
        );
        assert!(blocks.remove(Kind::Token, &hex(1), NOW).unwrap());
        assert!(
            blocks
                .set(by_signal(&hex(MAX_RISK_BLOCKS + 1), 60), NOW)
                .is_ok()
        );
        assert_eq!(
            blocks.set(by_signal(&hex(MAX_RISK_BLOCKS + 2), 60), NOW),
            Err(BlockError::FullForSignals)
        );
        assert!(
            blocks
                .set(by_signal(&hex(MAX_RISK_BLOCKS + 2), 200), NOW + 121)
                .is_ok()
        );
    }
}
