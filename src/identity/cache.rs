//! The verified-token cache: a session reuses its access token for many requests, and Envoy asks
//! stepgate about every one of them, so a signature verified once is remembered.
//!
//! Bounded in entries and in bytes (an unbounded JWT cache is a known out-of-memory attack: with a
//! CEL condition reading `claims`, every cached token keeps its whole payload, and 100 000 tokens
//! of 8 KiB of claims would be a gigabyte), and in time (until the token's `exp`, and at most
//! `ttl`); keyed by the SHA-256 of the token, so the shared cache holds no
//! bearer credential; only successful verifications are cached. An entry is served only while its
//! signing key is still in the issuer's key set: when a key is removed from the JWKS, the tokens it
//! signed stop verifying at once. One cache per policy: a reload starts afresh, because issuers,
//! audiences or leeway may have changed.
//!
//! The structure is small on purpose, since 100 000 cached tokens must fit in well under 100 MiB:
//! [`SHARDS`] mutex-guarded shards, each a hash map from digest to a slot in a ring that a CLOCK
//! hand sweeps to evict (an entry used since the hand last passed gets a second chance; expired
//! ones go first). About 100 bytes per entry besides the verified token itself, no background
//! task, and a hit is one uncontended lock, one probe and an `Arc` clone. The digest is already
//! uniformly random, so its bytes are the hash (no SipHash per lookup); a caller choosing tokens to
//! collide gains nothing, since only tokens with a valid signature are ever inserted.
//!
//! Each thread also keeps its own copies of hot tokens ([`LOCAL_SLOTS`], by the token's last
//! bytes): a hot token (a service account, one busy user) is then served on every core without
//! hashing it, without the shard's lock and without an `Arc` whose count all cores write. A copy
//! keeps the token's text and is served only to a token equal to it byte for byte, so a copy is
//! found without the SHA-256 (the most a cached decision spends on one step) and no two tokens can
//! ever share one. A token is copied on the thread's second shared hit of it in a row for its
//! slot, so that tokens each used now and then (many users) do not take turns being copied and
//! never served. A copy is served under the shared entry's conditions (its lifetime, its key still
//! published) and for its own cache only; a thread's copies are at most 64 tokens of at most
//! [`LOCAL_TEXT_MAX`] bytes each, and a copy's hits do not count as uses of the shared entry (its
//! CLOCK may evict a token only one thread uses; that thread serves its copy on, under the same
//! conditions). A copy found stale (past its lifetime, its key gone, left by a cache a reload
//! replaced) is dropped and its text wiped, as it is when another token takes its slot; a copy
//! nobody looks for again stays until then. The shared cache itself holds no token's text, only
//! digests.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use sha2::{Digest, Sha256};

use super::{
    intern::Interner,
    issuer::Issuers,
    token::{KeepClaims, TokenError, VerifiedToken, verify},
};
use crate::telemetry::metrics::{self, CacheEvent};

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

/// Upper bound of shards (fewer for small caches, so that the bound in entries stays exact).
pub const SHARDS: usize = 64;

/// A cache of verified tokens (or a pass-through when built with zero entries).
pub struct TokenCache {
    /// Unique per cache in the process: a thread's recent hits name the cache they came from.
    id: u64,
    shards: Box<[Mutex<Shard>]>,
    /// Entries per shard; the shards together hold at most the configured number.
    shard_capacity: usize,
    /// Estimated bytes per shard ([`entry_bytes`]); the shards together hold at most the budget.
    shard_bytes: usize,
    ttl_secs: i64,
    /// The raw claims this policy reads; the rest are not kept (see [`KeepClaims`]).
    keep: KeepClaims,
    /// Shared copies of the claim values tokens repeat.
    interner: Interner,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.entry_count())
            .field("capacity", &(self.shards.len() * self.shard_capacity))
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most `max_entries` tokens taking at most `max_bytes` (estimated, see
    /// [`entry_bytes`]), each kept at most `ttl`, with the raw claims `keep` selects. Zero
    /// entries: no cache.
    pub fn new(max_entries: u64, max_bytes: u64, ttl: Duration, keep: KeepClaims) -> Self {
        let max_entries = usize::try_from(max_entries).unwrap_or(usize::MAX);
        let max_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        // At least 256 entries per shard (or one shard), never more shards than SHARDS.
        let shards = (max_entries / 256).clamp(1, SHARDS);
        let shard_capacity = max_entries / shards;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shards: (0..if max_entries == 0 { 0 } else { shards })
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            shard_capacity,
            shard_bytes: max_bytes / shards,
            ttl_secs: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            keep,
            interner: Interner::default(),
        }
    }

    /// Verifies `token` at `now`, from the cache when it was verified before (and is still within
    /// its lifetime and its key still published). Returns the digest the token's fingerprint is
    /// taken from too, without hashing again: the token's SHA-256, or for a valid ECDSA token
    /// signed with the upper `s`, its twin's ([`VerifiedToken::fingerprint_digest`]).
    pub fn verify(
        &self,
        token: &str,
        issuers: &Issuers,
        max_bytes: usize,
        now: i64,
    ) -> (TokenDigest, Result<Arc<VerifiedToken>, TokenError>, bool) {
        let (digest, verified, cached) = self.verify_keyed(token, issuers, max_bytes, now);
        let named = match &verified {
            Ok(token) => token.fingerprint_digest.unwrap_or(digest),
            Err(_) => digest,
        };
        (named, verified, cached)
    }

    /// [`Self::verify`], returning the token's own digest (the cache's key).
    fn verify_keyed(
        &self,
        token: &str,
        issuers: &Issuers,
        max_bytes: usize,
        now: i64,
    ) -> (TokenDigest, Result<Arc<VerifiedToken>, TokenError>, bool) {
        let local = local_slot(token);
        if self.shards.is_empty() {
            // No copies for a cache that is off; one a replaced cache left in this slot goes.
            LOCAL_HITS.with_borrow_mut(|slots| slots[local].copy = None);
            let digest: TokenDigest = Sha256::digest(token.as_bytes()).into();
            return (
                digest,
                verify(token, issuers, max_bytes, now, &self.keep, &self.interner).map(Arc::new),
                false,
            );
        }
        // This thread's own recent hits first: served to the same text only, under the same
        // conditions as the shared entry (within its lifetime, its key still published), without
        // hashing the token, the shard's lock or a reference count shared with other cores. A
        // copy found stale (another cache's, a reload's predecessor; past its lifetime; its key
        // gone) is dropped, its text wiped.
        let mine = LOCAL_HITS.with_borrow_mut(|slots| {
            let slot = &mut slots[local];
            let hit = slot.copy.as_ref()?;
            if hit.cache != self.id || now > hit.expires_at {
                slot.copy = None;
                return None;
            }
            if !hit.is_for(token) {
                return None;
            }
            if !key_still_published(&hit.token) {
                slot.copy = None;
                return None;
            }
            Some((hit.digest, Arc::clone(&hit.token)))
        });
        if let Some((digest, token)) = mine {
            metrics::global().record_token_cache(CacheEvent::Hit);
            return (digest, Ok(token), true);
        }
        let digest: TokenDigest = Sha256::digest(token.as_bytes()).into();
        let shard = &self.shards[shard_index(&digest, self.shards.len())];
        match lock(shard).get(&digest, now) {
            Lookup::Hit(hit, expires_at) => {
                metrics::global().record_token_cache(CacheEvent::Hit);
                // A copy is made on this thread's second shared hit of the token in a row (for
                // its slot): a token used once in a while, among many, costs a marker rather than
                // a copy that would be replaced before it is ever served.
                LOCAL_HITS.with_borrow_mut(|slots| {
                    let slot = &mut slots[local];
                    let seen = (self.id, digest);
                    if slot.seen == Some(seen) {
                        slot.seen = None;
                        if token.len() <= LOCAL_TEXT_MAX {
                            slot.copy = Some(LocalHit {
                                cache: self.id,
                                text: token.as_bytes().into(),
                                digest,
                                token: Arc::new(thread_copy(&hit)),
                                expires_at,
                            });
                        }
                    } else {
                        slot.seen = Some(seen);
                    }
                });
                return (digest, Ok(hit), true);
            }
            Lookup::Dropped => metrics::global().record_token_cache(CacheEvent::Evicted),
            Lookup::Miss => {}
        }
        metrics::global().record_token_cache(CacheEvent::Miss);
        let result =
            verify(token, issuers, max_bytes, now, &self.keep, &self.interner).map(Arc::new);
        if let Ok(verified) = &result {
            let leeway = i64::try_from(verified.issuer.leeway).unwrap_or(i64::MAX);
            let expires_at = verified
                .principal
                .expires_at
                .saturating_add(leeway)
                .min(now.saturating_add(self.ttl_secs));
            let bytes = entry_bytes(verified);
            let evicted = lock(shard).insert(
                digest,
                Arc::clone(verified),
                expires_at,
                Room {
                    entries: self.shard_capacity,
                    bytes: self.shard_bytes,
                },
                bytes,
                now,
            );
            for _ in 0..evicted {
                metrics::global().record_token_cache(CacheEvent::Evicted);
            }
        }
        (digest, result, false)
    }

    /// The raw claims verified tokens keep for this policy.
    pub fn keeps(&self) -> &KeepClaims {
        &self.keep
    }

    /// Tokens held now.
    pub fn entry_count(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).map.len() as u64).sum()
    }

    /// Estimated bytes the tokens held now take ([`entry_bytes`]).
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).bytes as u64).sum()
    }
}

impl Drop for TokenCache {
    /// A reload replaces the policy and its cache: what this one held leaves the gauges.
    fn drop(&mut self) {
        let (entries, bytes) = self.shards.iter().fold((0, 0), |(e, b), shard| {
            let shard = lock(shard);
            (e + shard.map.len(), b + shard.bytes)
        });
        metrics::global().token_cache_changed(-(entries as i64), -(bytes as i64));
    }
}

/// What a shard may hold.
#[derive(Debug, Clone, Copy)]
struct Room {
    entries: usize,
    bytes: usize,
}

/// An estimate, on the high side, of the memory a cached token takes: the entry in its shard,
/// the verified token and its principal, and what it holds alone (values shared with other
/// tokens through the interner are not counted: a few thousand of them serve every token, and
/// the interner holds at most `STRIPES` × `STRIPE_BYTES` of them, 4 MiB). The
/// claims kept for the policy dominate when a CEL condition reads `claims`. The benchmark checks
/// it against real memory (`bench/run`, rows `rss-8k-fill` and `rss-8k-nocache`).
pub fn entry_bytes(token: &VerifiedToken) -> usize {
    // An `Arc`'s allocation holds its two counts beside the value.
    const COUNTS: usize = 2 * size_of::<usize>();
    let own_str = |s: &Arc<str>| {
        if Arc::strong_count(s) == 1 {
            allocation(COUNTS + s.len())
        } else {
            0
        }
    };
    let own_list = |list: &Arc<[Arc<str>]>| {
        if Arc::strong_count(list) == 1 {
            allocation(COUNTS + list.len() * size_of::<Arc<str>>())
                + list.iter().map(own_str).sum::<usize>()
        } else {
            0
        }
    };
    let p = &token.principal;
    let principal = allocation(COUNTS + size_of::<super::Principal>())
        + own_str(&p.subject)
        + [&p.tenant, &p.client_id, &p.acr]
            .into_iter()
            .flatten()
            .map(own_str)
            .sum::<usize>()
        + [&p.acrs, &p.amr, &p.scopes, &p.roles]
            .into_iter()
            .map(own_list)
            .sum::<usize>();
    // The slot, and the map entry (a digest and an index) in a table up to half empty, with its
    // control byte.
    let entry = size_of::<Slot>() + 2 * (size_of::<Key>() + size_of::<u32>() + 1);
    entry
        + allocation(COUNTS + size_of::<VerifiedToken>())
        + principal
        + own_list(&token.client_capabilities)
        + map_bytes(&token.claims)
        + token
            .certificate_binding
            .as_ref()
            .map_or(0, |_| allocation(size_of::<super::Thumbprint>()))
}

/// The memory a heap allocation of `n` bytes takes, on the high side: the allocator rounds a
/// request up to its size class (mimalloc's classes are at most an eighth apart) and keeps
/// some bookkeeping.
fn allocation(n: usize) -> usize {
    if n == 0 { 0 } else { n + n / 8 + 16 }
}

/// Heap bytes of a JSON object (`serde_json` with `preserve_order`: an index map, its entries in
/// a vector that grows by doubling, its hash table at most seven eighths full).
fn map_bytes(map: &serde_json::Map<String, serde_json::Value>) -> usize {
    if map.is_empty() {
        return 0;
    }
    let entry = size_of::<u64>() + size_of::<String>() + size_of::<serde_json::Value>();
    let buckets = (map.len() * 8 / 7 + 1).next_power_of_two();
    allocation(map.len().next_power_of_two() * entry)
        + allocation(buckets * (size_of::<usize>() + 1))
        + map
            .iter()
            .map(|(key, value)| allocation(key.capacity()) + value_bytes(value))
            .sum::<usize>()
}

fn value_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
        Value::String(s) => allocation(s.capacity()),
        Value::Array(items) => {
            allocation(items.capacity() * size_of::<Value>())
                + items.iter().map(value_bytes).sum::<usize>()
        }
        Value::Object(map) => map_bytes(map),
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // The shard's invariants hold between statements; a panic elsewhere cannot break them.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shard_index(digest: &TokenDigest, shards: usize) -> usize {
    // Bytes 8..16: independent of the bytes the shard's map hashes on.
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&digest[8..16]);
    (u64::from_le_bytes(bytes) % shards as u64) as usize
}

/// One shard: digest → slot, and the ring of slots the CLOCK hand sweeps.
#[derive(Default)]
struct Shard {
    map: HashMap<Key, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot>,
    /// Slots emptied by expiry or invalidation, reused before the hand evicts anything.
    free: Vec<u32>,
    hand: usize,
    /// Estimated bytes of the tokens held ([`entry_bytes`]).
    bytes: usize,
}

struct Slot {
    key: Key,
    /// `None` when the slot is free.
    token: Option<Arc<VerifiedToken>>,
    /// Unix seconds after which the entry is not served: `exp` + leeway, capped by the TTL.
    expires_at: i64,
    /// Used since the CLOCK hand last passed.
    referenced: bool,
    /// The token's [`entry_bytes`].
    bytes: u32,
}

enum Lookup {
    /// The token, and until when it may be served.
    Hit(Arc<VerifiedToken>, i64),
    Miss,
    /// There was an entry, expired or signed by a key no longer published: removed.
    Dropped,
}

impl Shard {
    fn get(&mut self, digest: &TokenDigest, now: i64) -> Lookup {
        let key = Key(*digest);
        let Some(&index) = self.map.get(&key) else {
            return Lookup::Miss;
        };
        let slot = &mut self.slots[index as usize];
        if let Some(token) = &slot.token
            && now <= slot.expires_at
            && key_still_published(token)
        {
            slot.referenced = true;
            return Lookup::Hit(Arc::clone(token), slot.expires_at);
        }
        // The caller verifies the token again (and learns why it no longer holds).
        self.remove(index as usize);
        Lookup::Dropped
    }

    /// Inserts (or replaces) an entry taking `bytes`; returns how many entries were evicted to
    /// make room. An entry larger than the shard's byte room is not kept at all.
    fn insert(
        &mut self,
        digest: TokenDigest,
        token: Arc<VerifiedToken>,
        expires_at: i64,
        room: Room,
        bytes: usize,
        now: i64,
    ) -> usize {
        let key = Key(digest);
        if bytes > room.bytes {
            return 0;
        }
        let bytes_u32 = u32::try_from(bytes).unwrap_or(u32::MAX);
        if let Some(&index) = self.map.get(&key) {
            // Two requests verified the same new token at once: keep the later one.
            let slot = &mut self.slots[index as usize];
            self.bytes = self.bytes - slot.bytes as usize + bytes;
            metrics::global().token_cache_changed(0, bytes as i64 - i64::from(slot.bytes));
            slot.token = Some(token);
            slot.expires_at = expires_at;
            slot.bytes = bytes_u32;
            return 0;
        }
        let mut evicted = 0;
        while self.bytes + bytes > room.bytes {
            self.evict(now);
            evicted += 1;
        }
        let index = if let Some(index) = self.free.pop() {
            index as usize
        } else if self.slots.len() < room.entries {
            self.slots.push(Slot {
                key,
                token: None,
                expires_at,
                referenced: false,
                bytes: 0,
            });
            self.slots.len() - 1
        } else {
            evicted += 1;
            self.evict(now);
            self.free.pop().expect("eviction freed a slot") as usize
        };
        self.slots[index] = Slot {
            key,
            token: Some(token),
            expires_at,
            referenced: false,
            bytes: bytes_u32,
        };
        self.map.insert(key, index as u32);
        self.bytes += bytes;
        metrics::global().token_cache_changed(1, bytes as i64);
        evicted
    }

    /// Advances the CLOCK hand to a victim (expired, or not used since the hand last passed) and
    /// removes it, its slot going to the free list. Terminates within two turns of the ring;
    /// called only while the shard holds a token.
    fn evict(&mut self, now: i64) {
        loop {
            let index = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let slot = &mut self.slots[index];
            if slot.token.is_none() {
                continue;
            }
            if slot.referenced && now <= slot.expires_at {
                slot.referenced = false;
                continue;
            }
            self.remove(index);
            return;
        }
    }

    fn remove(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        if slot.token.take().is_some() {
            self.map.remove(&slot.key);
            self.free.push(index as u32);
            self.bytes -= slot.bytes as usize;
            metrics::global().token_cache_changed(-1, -i64::from(slot.bytes));
        }
    }
}

/// A cached verification is served only while its signing key is still in the issuer's current
/// key set (the same material, `alg` and `issuer`, under the same `kid`).
fn key_still_published(token: &VerifiedToken) -> bool {
    token
        .issuer
        .key_published(token.kid.as_deref(), &token.key_binding)
}

/// Entries of a thread's own table of recent hits ([`TokenCache::verify`]); a power of two.
const LOCAL_SLOTS: usize = 64;
const _: () = assert!(LOCAL_SLOTS.is_power_of_two());

/// The longest token a thread copies: its copies then hold at most 64 × 8 KiB of text (an Entra
/// token with groups is 2–5 KiB); a longer token is served by the shared cache.
const LOCAL_TEXT_MAX: usize = 8 * 1024;

/// A token's slot in a thread's table, from its last eight bytes (a signed token ends with its
/// signature, which two tokens do not share). It only tells where to look: a copy is served to its
/// own text alone, so tokens chosen to share a slot only take turns in it.
fn local_slot(token: &str) -> usize {
    let bytes = token.as_bytes();
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    let mut word = [0; 8];
    word[..tail.len()].copy_from_slice(tail);
    // Fibonacci hashing: the product's top bits depend on every byte of the word.
    let mixed = u64::from_le_bytes(word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> (u64::BITS - LOCAL_SLOTS.trailing_zeros())) as usize
}

/// A hit a worker thread keeps for itself: a copy of the verified token sharing no reference
/// count with other threads, for one cache (by id: a reload's new cache never sees it), served
/// to the token's exact text.
struct LocalHit {
    cache: u64,
    /// The token, compared in constant time and wiped when the copy goes.
    text: Box<[u8]>,
    digest: TokenDigest,
    token: Arc<VerifiedToken>,
    expires_at: i64,
}

impl LocalHit {
    /// Whether this copy is `token`'s: equal byte for byte, compared without stopping at the
    /// first difference (a caller choosing the token's last bytes picks the slot it is compared
    /// in, and must not learn how much of a hot token its own text shares).
    fn is_for(&self, token: &str) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(&self.text, token.as_bytes()).is_ok()
    }
}

impl Drop for LocalHit {
    /// A bearer token does not outlive its copy in the heap's free memory.
    fn drop(&mut self) {
        self.text.fill(0);
        std::hint::black_box(&self.text);
    }
}

/// One of a thread's [`LOCAL_SLOTS`]: the copy it serves, and the last token (cache id and
/// digest) the slot saw hit in the shared cache without a copy, which a second hit copies.
#[derive(Default)]
struct LocalSlot {
    copy: Option<LocalHit>,
    seen: Option<(u64, TokenDigest)>,
}

thread_local! {
    static LOCAL_HITS: std::cell::RefCell<Vec<LocalSlot>> =
        std::cell::RefCell::new((0..LOCAL_SLOTS).map(|_| LocalSlot::default()).collect());
}

/// The token as a thread's own copy: the principal and capabilities copied, so that the clones
/// a request makes of them touch no cache line another core writes.
fn thread_copy(token: &VerifiedToken) -> VerifiedToken {
    VerifiedToken {
        principal: Arc::new(token.principal.unshared()),
        client_capabilities: token
            .client_capabilities
            .iter()
            .map(|c| Arc::from(&**c))
            .collect(),
        ..token.clone()
    }
}

/// A digest as a map key, hashed by its own first eight bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key(TokenDigest);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(bytes));
    }
}

#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `Key`; anything else still hashes deterministically.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::Algorithm;
    use serde_json::Value;

    use super::*;
    use crate::{
        demo::{self, DEMO_RSA_KID, TokenSpec},
        identity::jwks::KeySet,
        policy::{
            Policy,
            testing::{DEMO_POLICY, compile_policy, demo_file},
        },
    };

    const NOW: i64 = 1_800_000_000;
    const MIB_64: u64 = 64 << 20;

    /// Room for `n` entries, bytes aside.
    fn entries(n: usize) -> Room {
        Room {
            entries: n,
            bytes: usize::MAX,
        }
    }
    fn policy() -> Policy {
        compile_policy(DEMO_POLICY)
    }

    fn token(subject: &str) -> String {
        let pem = demo_file("demo-rsa-private.pem");
        let spec = TokenSpec {
            subject: subject.to_owned(),
            ..TokenSpec::default()
        };
        demo::sign(&spec.claims(NOW), &pem, Algorithm::RS256, DEMO_RSA_KID).unwrap()
    }

    #[test]
    fn second_verification_is_served_from_the_cache() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = token("alice");
        let (d1, first, from_cache_first) = cache.verify(&t, &p.issuers, 16_384, NOW);
        let (d2, second, from_cache_second) = cache.verify(&t, &p.issuers, 16_384, NOW);
        assert_eq!(d1, d2);
        assert!(
            Arc::ptr_eq(&first.unwrap(), &second.unwrap()),
            "the same verified token"
        );
        assert!(!from_cache_first && from_cache_second, "a miss, then a hit");
    }

    /// A thread's own copy of a hit: made on the second shared hit, served from the fourth
    /// verification on, equal to the shared entry, sharing none of its reference counts; and
    /// under the same conditions (the key still published, the lifetime), for its own cache only.
    #[test]
    fn a_thread_keeps_its_own_copy_of_a_hit_under_the_same_conditions() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = token("carol");
        let verify = |cache: &TokenCache, now| cache.verify(&t, &p.issuers, 16_384, now);
        let first = verify(&cache, NOW).1.unwrap();
        let (_, second, hit) = verify(&cache, NOW);
        let second = second.unwrap();
        assert!(hit && Arc::ptr_eq(&first, &second), "the shared entry");
        let (_, third, hit) = verify(&cache, NOW);
        assert!(
            hit && Arc::ptr_eq(&first, &third.unwrap()),
            "the shared entry again, copied now"
        );
        let (_, third, hit) = verify(&cache, NOW);
        let third = third.unwrap();
        assert!(hit && !Arc::ptr_eq(&second, &third), "this thread's copy");
        assert_eq!(third.principal, second.principal);
        assert!(!Arc::ptr_eq(&third.principal, &second.principal));
        assert!(!Arc::ptr_eq(
            &third.principal.subject,
            &second.principal.subject
        ));
        assert!(Arc::ptr_eq(&verify(&cache, NOW).1.unwrap(), &third));
        // Another cache (a reload's) never serves it.
        let other = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        assert!(!verify(&other, NOW).2, "a miss in a new cache");
        // Nor past the token's lifetime.
        assert_eq!(
            verify(&cache, NOW + 3600 + 61).1.unwrap_err(),
            TokenError::Expired
        );
        // Nor once its key leaves the key set.
        assert!(verify(&cache, NOW).1.is_ok() && verify(&cache, NOW).2);
        let only_ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"stepgate-demo-ec-1","x":"v2VXNFtLEMaW0AVp_9Qpo3Chz2Wjm4z1wpr9xEzwrhg","y":"Wn9rbvkm73LUEmQWAVtpOfxpx1HbnS605h3xHewu1io"}]}"#;
        let (set, _) = KeySet::parse(only_ec.as_bytes()).unwrap();
        for issuer in p.issuers.iter() {
            issuer.set_keys(set.clone());
        }
        assert!(matches!(
            verify(&cache, NOW).1,
            Err(TokenError::UnknownKey { .. })
        ));
    }

    /// Tokens that take turns in one slot are never copied (each would replace the other's copy
    /// before it is served), and leave the copy of a hot token in that slot alone.
    #[test]
    fn tokens_taking_turns_in_a_slot_are_not_copied_and_leave_a_hot_copy_alone() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let slot = |t: &str| local_slot(t);
        let hot = token("hot");
        let mut same_slot = (0..)
            .map(|i| token(&format!("user-{i}")))
            .filter(|t| slot(t) == slot(&hot));
        let (x, y) = (same_slot.next().unwrap(), same_slot.next().unwrap());
        let verify = |t: &str| {
            let (_, token, hit) = cache.verify(t, &p.issuers, 16_384, NOW);
            (token.unwrap(), hit)
        };
        let shared = verify(&hot).0;
        verify(&hot);
        verify(&hot);
        let copy = verify(&hot).0;
        assert!(!Arc::ptr_eq(&shared, &copy), "the hot token is copied");
        let (x_shared, y_shared) = (verify(&x).0, verify(&y).0);
        for round in 0..4 {
            for (t, entry) in [(&x, &x_shared), (&y, &y_shared)] {
                let (served, hit) = verify(t);
                assert!(
                    hit && Arc::ptr_eq(&served, entry),
                    "round {round}: the shared entry"
                );
            }
            assert!(
                Arc::ptr_eq(&verify(&hot).0, &copy),
                "round {round}: the hot copy stays"
            );
        }
    }

    /// A thread's copy is served to its own text alone: a token ending as the hot one does (so
    /// looked for in its slot) but differing in one byte is verified, and fails; the copy stays.
    #[test]
    fn a_copy_is_served_to_its_own_text_alone() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let hot = token("hot");
        let verify = |t: &str| cache.verify(t, &p.issuers, 16_384, NOW);
        let shared = verify(&hot).1.unwrap();
        for _ in 0..2 {
            assert!(verify(&hot).2, "a shared hit");
        }
        let copy = verify(&hot).1.unwrap();
        assert!(!Arc::ptr_eq(&shared, &copy), "the hot token is copied");
        // One letter of the payload changed: same signature, same slot, another token.
        let payload = hot.find('.').unwrap() + 5;
        let mut forged = hot.clone().into_bytes();
        forged[payload] = if forged[payload] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert_eq!(local_slot(&forged), local_slot(&hot));
        let (digest, verified, hit) = verify(&forged);
        assert!(!hit, "not served from the cache");
        assert!(verified.is_err(), "its signature does not verify");
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(forged.as_bytes())));
        let (digest, served, hit) = verify(&hot);
        assert!(
            hit && Arc::ptr_eq(&served.unwrap(), &copy),
            "the copy stays"
        );
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(hot.as_bytes())));
    }

    /// Whether this thread holds a copy of `token`'s text.
    fn copy_held(token: &str) -> bool {
        LOCAL_HITS.with_borrow(|slots| {
            slots.iter().any(|slot| {
                slot.copy
                    .as_ref()
                    .is_some_and(|c| *c.text == *token.as_bytes())
            })
        })
    }

    /// A copy found stale is dropped, its text with it: past its lifetime, its key gone, looked
    /// for by another cache (a reload's) or by a cache that is off.
    #[test]
    fn a_stale_copy_is_dropped_with_its_text() {
        let p = policy();
        let copied = |cache: &TokenCache, subject: &str| {
            let t = token(subject);
            for _ in 0..4 {
                assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
            }
            assert!(copy_held(&t), "copied");
            t
        };
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = copied(&cache, "stale-expired");
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW + 7200).1.is_err());
        assert!(!copy_held(&t), "dropped past its lifetime");

        let t = copied(&cache, "stale-reloaded");
        let reloaded = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        assert!(reloaded.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        assert!(!copy_held(&t), "dropped when another cache looks");

        let t = copied(&cache, "stale-off");
        let off = TokenCache::new(0, 0, Duration::ZERO, KeepClaims::All);
        assert!(off.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        assert!(!copy_held(&t), "dropped when a cache that is off looks");

        let t = copied(&cache, "stale-key");
        let only_ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"stepgate-demo-ec-1","x":"v2VXNFtLEMaW0AVp_9Qpo3Chz2Wjm4z1wpr9xEzwrhg","y":"Wn9rbvkm73LUEmQWAVtpOfxpx1HbnS605h3xHewu1io"}]}"#;
        let (set, _) = KeySet::parse(only_ec.as_bytes()).unwrap();
        for issuer in p.issuers.iter() {
            issuer.set_keys(set.clone());
        }
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_err());
        assert!(!copy_held(&t), "dropped once its key is gone");
    }

    /// A token longer than [`LOCAL_TEXT_MAX`] is served by the shared cache only.
    #[test]
    fn a_long_token_is_not_copied() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let pem = demo_file("demo-rsa-private.pem");
        let spec = TokenSpec {
            subject: "long".to_owned(),
            extra: [("pad".to_owned(), Value::from("x".repeat(LOCAL_TEXT_MAX)))]
                .into_iter()
                .collect(),
            ..TokenSpec::default()
        };
        let long = demo::sign(&spec.claims(NOW), &pem, Algorithm::RS256, DEMO_RSA_KID).unwrap();
        assert!(long.len() > LOCAL_TEXT_MAX);
        let verify = || cache.verify(&long, &p.issuers, 64 * 1024, NOW);
        let shared = verify().1.unwrap();
        for _ in 0..4 {
            let (_, served, hit) = verify();
            assert!(
                hit && Arc::ptr_eq(&served.unwrap(), &shared),
                "the shared entry"
            );
        }
    }

    #[test]
    fn failures_are_never_cached() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let mut t = token("alice");
        t.pop();
        t.push('A');
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_err());
        assert_eq!(cache.entry_count(), 0);
    }

    #[test]
    fn a_cached_token_expires_with_its_exp() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = token("alice");
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        let later = NOW + 3600 + 61;
        assert_eq!(
            cache.verify(&t, &p.issuers, 16_384, later).1.unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn removing_the_signing_key_from_the_jwks_stops_serving_its_tokens() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = token("alice");
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        let only_ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"stepgate-demo-ec-1","x":"v2VXNFtLEMaW0AVp_9Qpo3Chz2Wjm4z1wpr9xEzwrhg","y":"Wn9rbvkm73LUEmQWAVtpOfxpx1HbnS605h3xHewu1io"}]}"#;
        let (set, _) = KeySet::parse(only_ec.as_bytes()).unwrap();
        for issuer in p.issuers.iter() {
            issuer.set_keys(set.clone());
        }
        assert!(matches!(
            cache.verify(&t, &p.issuers, 16_384, NOW).1,
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn a_key_republished_for_another_issuer_or_algorithm_stops_serving_its_tokens() {
        let jwks: Value = serde_json::from_slice(&demo_file("jwks.json")).unwrap();
        for (member, value) in [("issuer", "https://elsewhere.example"), ("alg", "RS384")] {
            let p = policy();
            let cache = TokenCache::new(100, MIB_64, Duration::from_secs(600), KeepClaims::All);
            let t = token("alice");
            assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
            let mut changed = jwks.clone();
            for key in changed["keys"].as_array_mut().unwrap() {
                if key["kid"] == DEMO_RSA_KID {
                    key[member] = Value::from(value);
                }
            }
            let (set, _) = KeySet::parse(changed.to_string().as_bytes()).unwrap();
            for issuer in p.issuers.iter() {
                issuer.set_keys(set.clone());
            }
            let verified = cache.verify(&t, &p.issuers, 16_384, NOW).1;
            assert!(
                verified.is_err(),
                "the key now states {member} {value}, yet the cached token was served"
            );
        }
    }

    #[test]
    fn the_cache_is_bounded_in_entries() {
        let p = policy();
        let cache = TokenCache::new(10, MIB_64, Duration::from_secs(600), KeepClaims::All);
        for i in 0..100 {
            assert!(
                cache
                    .verify(&token(&format!("user{i}")), &p.issuers, 16_384, NOW)
                    .1
                    .is_ok()
            );
        }
        assert!(cache.entry_count() <= 10, "{} entries", cache.entry_count());
    }

    #[test]
    fn the_bound_is_exact_for_any_size() {
        for max in [1, 10, 255, 256, 1000, 100_000, 100_001] {
            let cache = TokenCache::new(max, MIB_64, Duration::from_secs(600), KeepClaims::All);
            let capacity = cache.shards.len() * cache.shard_capacity;
            assert!(capacity as u64 <= max, "{max}: capacity {capacity}");
            assert!(
                capacity as u64 * 100 >= max * 99,
                "{max}: capacity {capacity} wastes room"
            );
            assert!(cache.shards.len() <= SHARDS);
        }
    }

    fn verified(p: &Policy, subject: &str) -> Arc<VerifiedToken> {
        Arc::new(
            verify(
                &token(subject),
                &p.issuers,
                16_384,
                NOW,
                &KeepClaims::All,
                &Interner::default(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_clock_evicts_entries_not_used_since_its_last_pass() {
        let p = policy();
        let token = verified(&p, "alice");
        let mut shard = Shard::default();
        for i in 0..4u8 {
            assert_eq!(
                shard.insert([i; 32], Arc::clone(&token), NOW + 60, entries(4), 100, NOW),
                0
            );
        }
        // Entry 0 and 2 are used; inserting a fifth evicts 1, the first one unused.
        assert!(matches!(shard.get(&[0; 32], NOW), Lookup::Hit(..)));
        assert!(matches!(shard.get(&[2; 32], NOW), Lookup::Hit(..)));
        assert_eq!(
            shard.insert([9; 32], Arc::clone(&token), NOW + 60, entries(4), 100, NOW),
            1
        );
        assert!(matches!(shard.get(&[1; 32], NOW), Lookup::Miss));
        for kept in [0, 2, 3, 9] {
            assert!(
                matches!(shard.get(&[kept; 32], NOW), Lookup::Hit(..)),
                "{kept}"
            );
        }
        assert_eq!(shard.map.len(), 4);
    }

    #[test]
    fn expired_entries_are_dropped_and_their_slots_reused() {
        let p = policy();
        let token = verified(&p, "alice");
        let mut shard = Shard::default();
        shard.insert([1; 32], Arc::clone(&token), NOW + 10, entries(2), 100, NOW);
        shard.insert([2; 32], Arc::clone(&token), NOW + 100, entries(2), 100, NOW);
        assert!(matches!(shard.get(&[1; 32], NOW + 11), Lookup::Dropped));
        assert!(matches!(shard.get(&[1; 32], NOW + 11), Lookup::Miss));
        // The freed slot takes the next entry: nothing evicted, no growth.
        assert_eq!(
            shard.insert([3; 32], Arc::clone(&token), NOW + 100, entries(2), 100, NOW),
            0
        );
        assert_eq!(shard.slots.len(), 2);
        assert!(matches!(shard.get(&[2; 32], NOW + 11), Lookup::Hit(..)));
        assert!(matches!(shard.get(&[3; 32], NOW + 11), Lookup::Hit(..)));
    }

    #[test]
    fn an_entry_is_never_served_past_the_ttl() {
        let p = policy();
        let cache = TokenCache::new(100, MIB_64, Duration::from_secs(30), KeepClaims::All);
        let t = token("alice");
        let (_, first, _) = cache.verify(&t, &p.issuers, 16_384, NOW);
        let (_, within, _) = cache.verify(&t, &p.issuers, 16_384, NOW + 30);
        assert!(Arc::ptr_eq(
            first.as_ref().unwrap(),
            within.as_ref().unwrap()
        ));
        let (_, after, _) = cache.verify(&t, &p.issuers, 16_384, NOW + 31);
        assert!(
            !Arc::ptr_eq(first.as_ref().unwrap(), after.as_ref().unwrap()),
            "verified again after the TTL"
        );
    }

    #[test]
    fn only_the_claims_the_policy_reads_are_kept() {
        let p = policy();
        let t = token("alice");
        let named = KeepClaims::Named(vec!["tid".to_owned(), "absent".to_owned()].into());
        let kept = verify(&t, &p.issuers, 16_384, NOW, &named, &Interner::default()).unwrap();
        assert_eq!(kept.claims.keys().collect::<Vec<_>>(), ["tid"]);
        let none = verify(
            &t,
            &p.issuers,
            16_384,
            NOW,
            &KeepClaims::Named(Box::new([])),
            &Interner::default(),
        )
        .unwrap();
        assert!(none.claims.is_empty());
        assert_eq!(
            none.principal, kept.principal,
            "the principal is read before selecting"
        );
        let all = verify(
            &t,
            &p.issuers,
            16_384,
            NOW,
            &KeepClaims::All,
            &Interner::default(),
        )
        .unwrap();
        assert!(all.claims.contains_key("sub") && all.claims.contains_key("exp"));
    }

    /// A token whose payload carries `kib` KiB of claims.
    fn large_token(subject: &str, kib: usize) -> String {
        let pem = demo_file("demo-rsa-private.pem");
        let mut spec = TokenSpec {
            subject: subject.to_owned(),
            ..TokenSpec::default()
        };
        spec.extra.insert(
            "profile".into(),
            serde_json::json!(
                (0..kib)
                    .map(|i| format!("{i:04}{}", "x".repeat(1020)))
                    .collect::<Vec<_>>()
            ),
        );
        demo::sign(&spec.claims(NOW), &pem, Algorithm::RS256, DEMO_RSA_KID).unwrap()
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_whatever_the_tokens_carry() {
        let p = policy();
        let budget = 1 << 20;
        let cache = TokenCache::new(100_000, budget, Duration::from_secs(600), KeepClaims::All);
        let mut sizes = Vec::new();
        for i in 0..400 {
            let (_, verified, _) = cache.verify(
                &large_token(&format!("user{i}"), 8),
                &p.issuers,
                65_536,
                NOW,
            );
            sizes.push(entry_bytes(&verified.unwrap()));
        }
        let held = cache.bytes();
        assert!(
            held <= budget,
            "{held} bytes held over a budget of {budget}"
        );
        let smallest = *sizes.iter().min().unwrap() as u64;
        assert!(
            smallest > 8 * 1024,
            "8 KiB of claims counted as {smallest} bytes"
        );
        assert!(
            cache.entry_count() * smallest <= budget && cache.entry_count() > 0,
            "{} entries",
            cache.entry_count()
        );
        // Small tokens fill the same budget with many more entries.
        let small = TokenCache::new(100_000, budget, Duration::from_secs(600), KeepClaims::All);
        for i in 0..400 {
            assert!(
                small
                    .verify(&token(&format!("u{i}")), &p.issuers, 16_384, NOW)
                    .1
                    .is_ok()
            );
        }
        assert!(
            small.entry_count() > 3 * cache.entry_count(),
            "{} small entries against {} large",
            small.entry_count(),
            cache.entry_count()
        );
        assert!(small.bytes() <= budget);
    }

    #[test]
    fn a_token_larger_than_a_shard_holds_is_verified_but_not_cached() {
        let p = policy();
        let cache = TokenCache::new(10, 4096, Duration::from_secs(600), KeepClaims::All);
        let t = large_token("alice", 8);
        assert!(cache.verify(&t, &p.issuers, 65_536, NOW).1.is_ok());
        assert_eq!((cache.entry_count(), cache.bytes()), (0, 0));
    }

    #[test]
    fn only_the_claims_kept_are_counted() {
        let p = policy();
        let t = large_token("alice", 8);
        let all = verify(
            &t,
            &p.issuers,
            65_536,
            NOW,
            &KeepClaims::All,
            &Interner::default(),
        )
        .unwrap();
        let none = verify(
            &t,
            &p.issuers,
            65_536,
            NOW,
            &KeepClaims::Named(Box::new([])),
            &Interner::default(),
        )
        .unwrap();
        assert!(
            entry_bytes(&all) > 8 * 1024 + entry_bytes(&none),
            "{} vs {}",
            entry_bytes(&all),
            entry_bytes(&none)
        );
        // About 1 KiB: the slot, the token and its principal, without the claims.
        assert!(entry_bytes(&none) < 1100, "{}", entry_bytes(&none));
    }

    #[test]
    fn zero_entries_turns_the_cache_off() {
        let p = policy();
        let cache = TokenCache::new(0, MIB_64, Duration::from_secs(600), KeepClaims::All);
        let t = token("alice");
        let (_, first, _) = cache.verify(&t, &p.issuers, 16_384, NOW);
        let (_, second, _) = cache.verify(&t, &p.issuers, 16_384, NOW);
        assert!(!Arc::ptr_eq(&first.unwrap(), &second.unwrap()));
    }
}
