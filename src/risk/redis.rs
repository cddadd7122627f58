//! The Redis store: blocks, revocations and risk counters shared by every replica.
//!
//! The request path never waits on Redis. Each replica keeps its own view in memory (the
//! [`RiskState`]) and one background task links it to Redis:
//! - **Changes out.** A block, unblock or revocation made here is applied here first, then
//!   written to a Redis hash by a script ([`PUT`]) that keeps each block's writes that can still
//!   change it and folds them in write-time order (by time in milliseconds) by the rules each
//!   replica keeps (a risk signal's block never shortens a block, an eviction lifts only the
//!   signal's block it evicted and brings back the operator's block under it), so that the
//!   order writes arrive in does not matter; of two revocations the one that covers more stays.
//!   What the field then holds is published on the replicas' channel.
//! - **Changes in.** The task subscribes to that channel and applies what the other replicas
//!   publish. Pub/sub delivers at most once, so the task also re-reads both hashes every
//!   [`RESYNC`] and on every (re)connection.
//! - **Counters.** Each event is counted here at once and sent to Redis in batches (one script
//!   call per key and window: `INCRBY`, atomic, so no increment is lost however many replicas
//!   count); the reply, every replica's total, raises this replica's view. A count that reaches
//!   its threshold in the shared total acts here and is published, so the other replicas apply
//!   the step-up too.
//! - **Faults.** While Redis is unreachable decisions go on from the last known state (or fail
//!   closed, as the policy says), counters count locally, and changes made here wait in a
//!   bounded queue. The task reconnects with backoff (100 ms doubling to 10 s); it then writes
//!   the waiting changes (the newest write still wins), re-reads everything, and writes back what
//!   Redis lost (a restart without persistence): the blocks held here, each at the time it was
//!   written, and the lifts known here ([`Lifts`]).
//!
//! The store is one primary, at a fixed address or the one Redis Sentinel names ([`Target`]):
//! through Sentinel, each connection asks the sentinels and checks the server's `ROLE` at every
//! ping, so that a failover is followed. Redis Cluster is not supported; every key of one
//! counter shares a hash tag, so a later Cluster client changes only the connection.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use redis::{
    AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError,
    aio::MultiplexedConnection,
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{
    blocks::{self, Block, Kind, MAX_TTL_SECONDS},
    counters::Counting,
    revocations::{self, KEEP_SECONDS, Revocation},
    signals::Crossing,
    store::RiskState,
};
use crate::{
    policy::Policy,
    server::authorizer::unix_now,
    telemetry::{
        metrics,
        throttle::{Throttle, WARNING_PERIOD},
    },
};

/// Counts waiting for the task; past it, counts are dropped (and still count here).
const QUEUE: usize = 65_536;
/// Changes kept while Redis is unreachable, and changes queued for the task; past it, the oldest
/// kept are dropped, and a change that finds the queue full is (this replica's own view keeps
/// them, and the next resync writes back the blocks and lifts it holds).
const PENDING: usize = 100_000;
/// How often both hashes are read again, healing any lost pub/sub message.
const RESYNC: Duration = Duration::from_secs(30);
/// How often an idle connection is checked.
const PING: Duration = Duration::from_secs(2);
/// Connect and command timeout.
const TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Operations sent in one pipeline.
const BATCH: usize = 1024;
/// Sessions in a row in which the write script may fail on the same change before it is
/// dropped.
const MAX_SCRIPT_FAILURES: u32 = 3;

/// Writes a block, a lift or a revocation, `ARGV[3]` (the record), made at `ARGV[2]` (ms), into
/// field `ARGV[1]` of hash `KEYS[1]` as `"<ms>|<record>"`, and publishes what the field then
/// holds on channel `ARGV[5]`: `ARGV[4]`, the writer's message, when that is this write (the
/// reply is then 1), else the store's (`"from":"store"`, and the reply 0: the writer reads the
/// field back).
///
/// `ARGV[6]` says what is written (`signal` or `operator` block, `lift`, `evict`, or
/// `revocation`), `ARGV[7]` when the block ends (a revocation's time, `before`) and `ARGV[8]` the
/// writer's time, in seconds; `ARGV[9]` is the signals' `created_by` prefix; `ARGV[10]` the
/// longest block and `ARGV[11]` how far ahead of the writer's clock another's may be, in
/// seconds, `ARGV[12]` the longest stored value a replica reads, and `ARGV[13]` and `ARGV[14]`
/// the longest reason and author: a stored block that no replica could have written under them
/// (which every replica ignores, [`apply_block`]) is written over as if it were not there.
///
/// **Blocks: the field ends on what one replica would hold had every write reached it in
/// write-time order**, whatever order the writes reach Redis in (a replica cut off writes its
/// queue when it is back). The script keeps each field's writes that can still change that
/// (`KEYS[2]`, the field's name: `{"result": <SHA-1 of what the field held after them>,
/// "writes": [...]}`)
/// and folds them in write-time order by the rules each replica keeps (`blocks::set_evicting`):
/// - an operator's block or lift replaces whatever is there (and is the operators' last word:
///   no older write changes the fold, so none is kept);
/// - a risk signal's block (one still in force) never shortens a block: it is refused over one
///   that lasts as long or longer, and otherwise replaces it, holding under it the operator's
///   block it replaced;
/// - an `evict` (a signal's source block a replica evicted to make room) lifts the signal's
///   block it evicted, if that is the one there (by its end, which the eviction's record keeps),
///   and brings back the operator's block held under it if that is still in force: it is no
///   operator's word.
///
/// Kept are the operators' last word and, after it, the signals' blocks still in force that no
/// newer one outlasts (that one replaces them in any order, holding what they held) and the
/// evictions of those: a few, at most 32 (past that the oldest are folded into one, and a write
/// older than that arriving later is taken as older than the operators' last word). The record
/// stored carries `operator_at`, the time of the operators' last word it stands for (its own, for
/// an operator's record), which replicas write back with a signal's block (a member older
/// replicas ignore). A field written by a version that kept no writes, or by hand, is taken as
/// the writes it stands for (a signal's record, its `operator_at` as the operators' last word).
///
/// A revocation keeps the rule each replica keeps (`revocations::set`): the one that covers more
/// (the later `before`) stays, however new the other's write; a stored revocation no replica
/// could have written is written over. Otherwise the newest write wins.
pub const PUT: &str = r#"
-- `body` with `operator_at` (wherever it stood) set to `t`, or left out when `t` is nil.
local function with_operator_at(body, t)
  body = string.gsub(string.gsub(body, '"operator_at":%-?[%d%.eE%+]+,?', ''), ',}$', '}')
  if not t or string.sub(body, 1, 1) ~= '{' or string.sub(body, 2, 2) == '}' then return body end
  return '{"operator_at":' .. string.format('%d', t) .. ',' .. string.sub(body, 2)
end
-- The writer's message, with the record as stored when the script changed it (its
-- `operator_at`), so that every replica knows what the store holds, and writes it back so.
local function message(stored)
  if stored == ARGV[3] then return ARGV[4] end
  local ok, m = pcall(cjson.decode, ARGV[4])
  if not ok or type(m) ~= 'table' or type(m.put) ~= 'table' then return ARGV[4] end
  m.put.record = stored
  return cjson.encode(m)
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local stamp, record, what = ARGV[2], ARGV[3], ARGV[6]
local old, at, body = nil, nil, nil
if cur then
  at, body = string.match(cur, '^(%d+)|(.*)$')
  if body then
    local ok, decoded = pcall(cjson.decode, body)
    if ok and type(decoded) == 'table' then old = decoded end
  end
end
-- What no replica writes (written by hand) does not stand in a write's way: a record stamped
-- further ahead of the writer's clock than a replica's clock may be, and a block that every
-- replica ignores (`apply_block`, `parse_stored`, `READ`): too long, unreadable, with a member
-- of the wrong type or a text the admin API refuses, ending further after its creation than a
-- block may last, or made ahead of the clock.
local now, ahead = tonumber(ARGV[8]), tonumber(ARGV[11])
local function int(v)
  return type(v) == 'number' and v == v and v == math.floor(v) and v > -9e15 and v < 9e15
end
local function text(v, max)
  return type(v) == 'string' and #v <= max and not string.find(v, '%c')
    and not string.find(v, '\194[\128-\159]')
end
if at and tonumber(at) > (now + ahead) * 1000 then cur = nil end
if cur and (not old or #cur > tonumber(ARGV[12])) then cur = nil end
local function reason_id(v)
  return type(v) == 'string' and #v >= 1 and #v <= 128 and not string.find(v, '[^%w%-_%.]')
end
if what == 'revocation' then
  -- The one that covers more stays: a stored revocation a replica could have written
  -- (`apply_revocation`) whose time is as late as this one's refuses it.
  if cur then
    local before, made = old.before, old.created_at
    if int(before) and int(made) and made <= now + ahead and before <= made + ahead
       and reason_id(old.reason_id) and text(old.reason, tonumber(ARGV[13]))
       and text(old.created_by, tonumber(ARGV[14])) and before >= tonumber(ARGV[7]) then
      return 0
    end
  end
  redis.call('HSET', KEYS[1], ARGV[1], stamp .. '|' .. record)
  redis.call('PUBLISH', ARGV[5], ARGV[4])
  return 1
end
-- A block a replica could have written (and would apply).
local function block(t)
  if type(t) ~= 'table' then return false end
  local made = t.created_at
  return t.removed ~= true
    and (t.removed == nil or type(t.removed) == 'boolean') and int(t.expires_at) and int(made)
    and made <= now + ahead and t.expires_at <= made + tonumber(ARGV[10]) + ahead
    and reason_id(t.reason_id)
    and (t.reason == nil or text(t.reason, tonumber(ARGV[13])))
    and (t.created_by == nil or text(t.created_by, tonumber(ARGV[14])))
end
if cur and old then
  local made, ends_at = old.created_at, old.expires_at
  if (old.removed ~= nil and type(old.removed) ~= 'boolean') or not int(ends_at)
     or (made ~= nil and not int(made)) then
    cur = nil
  elseif old.removed ~= true and not block(old) then
    cur = nil
  end
end
local prefix = ARGV[9]
local function signals(t)
  return type(t.created_by) == 'string' and string.sub(t.created_by, 1, #prefix) == prefix
end
-- An operators' time a replica's clock could have given.
local function clock_ms(v)
  return int(v) and v >= 0 and v <= (now + ahead) * 1000 and v or nil
end
-- The field's writes (`KEYS[2]`), kept as long as they can change what it ends on: stored with
-- what the field held once they were folded (`result`, the SHA-1 of it, or of "" for nothing),
-- and taken only while it still holds that. Otherwise (a version that kept no writes wrote the
-- field, or it was deleted or written by hand) the writes start again from what it holds.
local kinds = {operator = true, lift = true, signal = true, evict = true}
-- A kept write rebuilt from its checked members alone (nil if it is not one): what was written
-- by hand (another type, a number cjson cannot write again) never reaches the fold or the encoder.
local function write(e)
  if type(e) == 'table' and kinds[e.what] and clock_ms(e.at) and int(e.ends)
     and type(e.record) == 'string' and #e.record <= tonumber(ARGV[12]) then
    return {at = e.at, what = e.what, ends = e.ends, record = e.record}
  end
end
local function entry(e)
  if type(e) ~= 'table' or not clock_ms(e.at) then return nil end
  if e.what == 'mark' then return {at = e.at, what = 'mark'} end
  if e.what == 'state' then
    local st, held = e.state and write(e.state), e.held and write(e.held)
    if (e.state ~= nil and not st) or (e.held ~= nil and not held)
       or (e.op ~= nil and not clock_ms(e.op))
       or (e.state_op ~= nil and not clock_ms(e.state_op)) then
      return nil
    end
    return {at = e.at, what = 'state', state = st, held = held, op = e.op, state_op = e.state_op}
  end
  return write(e)
end
-- Another client's key of another type under that name: no writes are kept.
local keeps = redis.call('TYPE', KEYS[2])['ok']
keeps = keeps == 'hash' or keeps == 'none'
local writes = {}
local result = redis.sha1hex(cur or '')
local kept = keeps and redis.call('HGET', KEYS[2], ARGV[1])
if kept then
  local ok, log = pcall(cjson.decode, kept)
  if ok and type(log) == 'table' and type(log.writes) == 'table' and log.result == result then
    for _, e in ipairs(log.writes) do
      writes[#writes + 1] = entry(e)
    end
  else
    kept = nil
  end
end
-- A stored block's or lift's record from its checked members alone (no bookkeeping).
local function plain(t)
  local function txt(v) return type(v) == 'string' and v or '' end
  return cjson.encode({removed = t.removed == true, reason_id = txt(t.reason_id),
    reason = txt(t.reason), created_at = int(t.created_at) and t.created_at or 0,
    expires_at = t.expires_at, created_by = txt(t.created_by)})
end
if cur and not kept then
  -- What the field holds, as the writes it stands for: its block or lift (at the operators'
  -- time it keeps, when that is earlier: a held-up operator's write took the stored time), the
  -- operators' word a signal's record was written over, and the signal's block it kept.
  local stamp_ms, op_ms = tonumber(at), clock_ms(old.operator_at)
  local by_signal = signals(old)
  if by_signal and op_ms then
    writes[#writes + 1] = {at = op_ms, what = 'mark'}
  end
  if type(old.displaced) == 'string' then
    local ok, d = pcall(cjson.decode, old.displaced)
    local d_at = clock_ms(old.displaced_at)
    if ok and block(d) and signals(d) and d_at then
      writes[#writes + 1] = {at = d_at, what = 'signal', ends = d.expires_at, record = plain(d)}
    end
  end
  -- (A lift a signal's author signed is an eviction: no operator's word.)
  local what = 'operator'
  if old.removed == true and by_signal then
    what = 'evict'
  elseif old.removed == true then
    what = 'lift'
  elseif by_signal then
    what = 'signal'
  end
  if not by_signal and op_ms and op_ms < stamp_ms then stamp_ms = op_ms end
  local ends = old.expires_at
  if what == 'lift' then ends = 0 end
  writes[#writes + 1] = {at = stamp_ms, what = what, ends = ends, record = plain(old)}
end
-- This write, unless it is one of them already (a block written back).
local w = {at = tonumber(ARGV[2]), what = ARGV[6], ends = tonumber(ARGV[7]), record = ARGV[3]}
local ok_record, written_record = pcall(cjson.decode, ARGV[3])
if w.what == 'evict' then
  -- The block it evicted, by its end (the eviction's record keeps it).
  w.ends = ok_record and type(written_record) == 'table' and int(written_record.expires_at)
    and written_record.expires_at or 0
end
local twin = nil
for _, e in ipairs(writes) do
  if e.at == w.at and e.what == w.what and e.ends == w.ends and e.record == w.record then
    twin = e
  end
end
if twin then w = twin else writes[#writes + 1] = w end
-- A signal's block written back with the operators' last word it knew of (the time of the lift
-- or block it was written over): no operator's write older than that is taken over it.
if w.what == 'signal' and ok_record and type(written_record) == 'table' then
  local op_ms = clock_ms(written_record.operator_at)
  if op_ms and op_ms < w.at then writes[#writes + 1] = {at = op_ms, what = 'mark'} end
end
-- In write-time order; at the same millisecond: an eviction, a lift, a signal's block, an
-- operator's block (fail closed), then by the record.
local rank = {state = 0, mark = 1, evict = 2, lift = 3, signal = 4, operator = 5}
table.sort(writes, function(a, b)
  if a.at ~= b.at then return a.at < b.at end
  if rank[a.what] ~= rank[b.what] then return (rank[a.what] or 9) < (rank[b.what] or 9) end
  if (a.ends or 0) ~= (b.ends or 0) then return (a.ends or 0) < (b.ends or 0) end
  return (a.record or '') < (b.record or '')
end)
-- Which block a signal's block is, or an eviction's record names: its author, reason id and
-- creation (an eviction written by an older version names none, and is taken for any block of
-- its end).
local names = {}
local function named(e)
  if names[e] == nil then
    local ok, r = pcall(cjson.decode, e.record)
    names[e] = false
    if ok and type(r) == 'table' and type(r.created_by) == 'string' and r.created_by ~= ''
       and type(r.reason_id) == 'string' then
      local made = r.created_at
      if e.what == 'evict' then made = r.evicted_created_at end
      names[e] = {by = r.created_by, id = r.reason_id, made = int(made) and made or nil}
    end
  end
  return names[e]
end
local function evicts(e, signal)
  if signal.ends ~= e.ends then return false end
  local x, b = named(e), named(signal)
  if not x then return true end
  return b and x.by == b.by and x.id == b.id and (x.made == nil or x.made == b.made)
end
-- The fold: each write as one replica applies it in that order. An operator's block or lift
-- replaces whatever is there; a signal's block still in force replaces what is not a block
-- lasting as long or longer (a signal's block never shortens a block), and holds the operator's
-- block it replaced under it (one that has ended is over: it is not brought back); an eviction
-- lifts the signal's block it evicted (by its end and name) and brings back the operator's
-- block held under it, if that is still in force, and is no operator's word.
local function fold(list, upto)
  local s = {state = nil, held = nil, op = nil, state_op = nil}
  for i = 1, upto do
    local e = list[i]
    if e.what == 'state' then
      s.state, s.held, s.op, s.state_op = e.state, e.held, e.op, e.state_op
    elseif e.what == 'mark' then
      s.state, s.held, s.op = nil, nil, e.at
    elseif e.what == 'operator' or e.what == 'lift' then
      s.state, s.held, s.op = e, nil, e.at
    elseif e.what == 'signal' and e.ends > now then
      local st = s.state
      local is_block = st and (st.what == 'operator' or st.what == 'signal')
      if not (is_block and st.ends >= e.ends) then
        if st and st.what == 'operator' then
          s.held = st
        elseif not (st and st.what == 'signal') then
          s.held = nil
        end
        s.state, s.state_op = e, s.op
      end
    elseif e.what == 'evict' then
      local st = s.state
      if st and st.what == 'signal' and evicts(e, st) then
        if s.held and s.held.ends > now then
          s.state = s.held
        else
          s.state, s.state_op = e, s.op
        end
        s.held = nil
      end
    end
  end
  return s
end
local s = fold(writes, #writes)
-- What the field ends on, with the operators' time a replica reads (`operator_at`): an
-- operator's record its own, a signal's block the operators' last word it was written over, an
-- eviction's that word (0 for none).
local stored = cur
local st = s.state
if st then
  local op = st.at
  if st.what == 'signal' then op = s.state_op elseif st.what == 'evict' then op = s.op or 0 end
  stored = string.format('%d', st.at) .. '|' .. with_operator_at(st.record, op)
end
-- Kept: from the operators' last word on (nothing older can change the fold), less the signals'
-- blocks that have ended or that a newer one outlasts (whatever a write arriving later does,
-- that one replaces them, and holds what they would have held), and the evictions but the first
-- of each block kept (a second could only lift the same block written again, by the same signal
-- in the same second: it stays, failing closed); at most 32 (the oldest folded into one).
local base = 0
for i, e in ipairs(writes) do
  if e.what == 'operator' or e.what == 'lift' or e.what == 'mark' or e.what == 'state' then
    base = i
  end
end
local longest, open, keep = 0, {}, {}
for i = #writes, base + 1, -1 do
  local e = writes[i]
  if e.what == 'signal' and e.ends > now and e.ends >= longest then
    longest = e.ends
    e.keep = true
  end
end
local from = writes[base]
if from and from.what == 'state' and from.state and from.state.what == 'signal' then
  open[1] = from.state
end
for i = math.max(base, 1), #writes do
  local e = writes[i]
  local kept_here = i == base or e.keep
  if e.keep then open[#open + 1] = e end
  if not kept_here and e.what == 'evict' then
    for j, signal in ipairs(open) do
      if evicts(e, signal) then
        kept_here = true
        table.remove(open, j)
        break
      end
    end
  end
  if kept_here then keep[#keep + 1] = e end
  e.keep = nil
end
if #keep > 32 then
  local cut = #keep - 31
  local f = fold(keep, cut)
  local base = {at = keep[cut].at, what = 'state', state = f.state, held = f.held, op = f.op,
    state_op = f.state_op}
  local rest = {base}
  for i = cut + 1, #keep do rest[#rest + 1] = keep[i] end
  keep = rest
end
local accepted = st == w
if stored and stored ~= cur then
  redis.call('HSET', KEYS[1], ARGV[1], stored)
  if not accepted then
    local kept_at, kept_record = string.match(stored, '^(%d+)|(.*)$')
    if kept_at then
      redis.call('PUBLISH', ARGV[5], '{"from":"store","put":{"hash":' .. cjson.encode(KEYS[1])
        .. ',"field":' .. cjson.encode(ARGV[1]) .. ',"record":' .. cjson.encode(kept_record)
        .. ',"at":' .. kept_at .. '}}')
    end
  end
end
-- (None kept for a field that holds nothing: no resync would find them to delete.)
if keeps then
  local ok, text = false, nil
  if stored then ok, text = pcall(cjson.encode, {result = redis.sha1hex(stored), writes = keep}) end
  if ok then
    redis.call('HSET', KEYS[2], ARGV[1], text)
  else
    redis.call('HDEL', KEYS[2], ARGV[1])
  end
end
if accepted then
  local _, r = string.match(stored, '^(%d+)|(.*)$')
  redis.call('PUBLISH', ARGV[5], message(r or ARGV[3]))
  return 1
end
return 0
"#;

/// Adds `ARGV[1]` to counter `KEYS[1]` (expiring after `ARGV[2]` ms) and returns it with the
/// previous window's counter `KEYS[2]`.
const COUNT: &str = r"
local c = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local p = tonumber(redis.call('GET', KEYS[2]) or '0')
return {c, p}
";

/// Adds member `ARGV[2]` seen at `ARGV[1]` ms to sorted set `KEYS[1]`, drops those older than
/// the window `ARGV[3]` ms and all but the newest `ARGV[4]`, and returns how many are left.
const DISTINCT: &str = r"
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[3]))
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {redis.call('ZCARD', KEYS[1]), 0}
";

/// Deletes field `ARGV[1]` of hash `KEYS[1]` if it still holds `ARGV[2]`: an entry a resync read
/// past its time, unless another replica wrote the field since; and the writes [`PUT`] keeps for
/// it in `KEYS[2]`.
pub const DELETE: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  if redis.call('TYPE', KEYS[2])['ok'] == 'hash' then redis.call('HDEL', KEYS[2], ARGV[1]) end
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";

/// The fields of hash `KEYS[1]` of at most `ARGV[1]` bytes whose values hold at most `ARGV[2]`,
/// the first `ARGV[3]` of them, as `{skipped, {field, value, …}, cut}`: what a replica reads of a
/// hash it did not write alone, so that values no replica writes (another client of the Redis)
/// cost Redis their room and this replica nothing; `cut` is 1 when fields were left unread past
/// the count. `{-1, {}, 0}` when the key holds another type than a hash (set by another
/// client), which is no error to the reader.
pub const READ: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then return {-1, {}, 0} end
local all = redis.call('HGETALL', KEYS[1])
local out, skipped, cut = {}, 0, 0
for i = 1, #all, 2 do
  if #all[i] > tonumber(ARGV[1]) or #all[i + 1] > tonumber(ARGV[2]) then
    skipped = skipped + 1
  elseif #out >= 2 * tonumber(ARGV[3]) then
    skipped = skipped + 1
    cut = 1
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return {skipped, out, cut}
";

/// The longest field read from Redis: a block's kind, `|` and value, or a revoked subject (each
/// value at most 1 KiB, as the admin API and `blocks::normalize` take them).
const MAX_FIELD_BYTES: usize = 2048;
/// The longest stored record read from Redis: a block's or a revocation's, whose texts
/// [`blocks::check_record`] bounds (a reason and an author of 1 KiB each, twice that once
/// escaped in JSON), with its write time.
pub const MAX_RECORD_BYTES: usize = 8 * 1024;
/// The longest message read from the channel: a record and its field, escaped again.
const MAX_MESSAGE_BYTES: usize = 32 * 1024;

/// This replica's end of the link: queues changes and counts for the task.
#[derive(Debug)]
pub struct Shared {
    /// Counts, for the task.
    ops: mpsc::Sender<Op>,
    /// Changes, for the task: a queue of their own, so that a flood of counts never holds one
    /// up, and a new session takes every change queued (see `Changed::all_back`).
    puts: mpsc::Sender<Put>,
    down: Arc<AtomicBool>,
    /// Whether the blocks and revocations Redis holds have been read once: until then this
    /// replica knows none of them.
    synced: Arc<AtomicBool>,
    /// Blocks' fields changed here, and when.
    changed: Arc<Changed>,
}

enum Op {
    /// A block, unblock or revocation to write (last-writer-wins) and publish.
    Put(Put),
    /// One event of a signal for a key (and, for a distinct count, its value's digest).
    Count {
        policy: Arc<Policy>,
        signal: usize,
        key: String,
        member: Option<String>,
        at_ms: i64,
    },
}

#[derive(Debug, Clone)]
struct Put {
    hash: Hash,
    field: String,
    at_ms: i64,
    record: String,
    precedence: Precedence,
    /// This write's own number ([`put_id`]), which its message carries: a replica tells the echo
    /// of each of its writes from another's of the same field.
    id: u64,
}

/// A number no other write of this process has.
fn put_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// What a write is, for [`PUT`]'s rule between blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Precedence {
    /// A revocation of tokens issued before this time: the later time wins.
    Revocation(i64),
    /// An operator's lift.
    Lift,
    /// A risk signal's block this replica evicted to make room for another: a lift of it, but
    /// only of a signal's block, never of an operator's this replica has not heard of.
    Evict,
    /// An operator's block, ending at this time.
    Operator(i64),
    /// A risk signal's block, ending at this time.
    Signal(i64),
}

impl Precedence {
    fn of_block(record: &BlockRecord) -> Self {
        if record.removed {
            Self::Lift
        } else if record.created_by.starts_with(blocks::RISK_CREATOR_PREFIX) {
            Self::Signal(record.expires_at)
        } else {
            Self::Operator(record.expires_at)
        }
    }

    /// [`PUT`]'s `ARGV[6]` and `ARGV[7]`.
    fn args(self) -> (&'static str, i64) {
        match self {
            Self::Revocation(before) => ("revocation", before),
            Self::Lift => ("lift", 0),
            Self::Evict => ("evict", 0),
            Self::Operator(ends) => ("operator", ends),
            Self::Signal(ends) => ("signal", ends),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Hash {
    Blocks,
    Revocations,
}

impl Hash {
    fn key(self) -> &'static str {
        match self {
            Self::Blocks => "stepgate:blocks",
            Self::Revocations => "stepgate:revocations",
        }
    }

    /// Where [`PUT`] keeps the writes of each of the hash's fields that can still change what
    /// the field ends on (a revocation needs none: the later time stays).
    fn writes_key(self) -> &'static str {
        match self {
            Self::Blocks => "stepgate:blocks:writes",
            Self::Revocations => "stepgate:revocations:writes",
        }
    }
}

const CHANNEL: &str = "stepgate:changes";

/// A block as stored in Redis; `removed` marks an unblock (kept until `expires_at`, so that a
/// replica cut off meanwhile cannot bring the block back).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockRecord {
    #[serde(default)]
    removed: bool,
    #[serde(default)]
    reason_id: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    created_at: i64,
    expires_at: i64,
    #[serde(default)]
    created_by: String,
    /// The time (ms) of the newest operator's write the record stands for, which the write
    /// script keeps ([`PUT`]); read as the script reads it, any number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operator_at: Option<serde_json::Number>,
    /// An eviction's: when the block it evicted was made (with its author, reason id and end,
    /// which block it was: [`PUT`] lifts that one only). Versions before it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    evicted_created_at: Option<i64>,
}

impl BlockRecord {
    fn of(block: &Block) -> Self {
        Self {
            removed: false,
            reason_id: block.reason_id.to_string(),
            reason: block.reason.clone(),
            created_at: block.created_at,
            expires_at: block.expires_at,
            created_by: block.created_by.clone(),
            operator_at: None,
            evicted_created_at: None,
        }
    }

    /// A risk signal's block that knows of no operator's write as new as `block`, an
    /// operator's: one written where Redis had lost the operator's (restarted empty, flushed,
    /// failed over to a replica behind) by a replica that did not know it. A signal's block
    /// written over a lift of `block` carries the lift's time, and is the cluster's word.
    fn unaware_of(&self, block: &Block) -> bool {
        let known = self
            .operator_at
            .as_ref()
            .and_then(serde_json::Number::as_f64);
        !self.removed
            && self.created_by.starts_with(blocks::RISK_CREATOR_PREFIX)
            && !block.created_by.starts_with(blocks::RISK_CREATOR_PREFIX)
            && block.expires_at > self.expires_at
            // `created_at` is whole seconds: an operator's write within the block's second
            // (a lift, then this block again) may be before or after it. Taken as before: the
            // block is kept here and written back, and the script decides (its write time is
            // the second's start, so the store's record wins: the order within one second is
            // not known to it either).
            && known.is_none_or(|at| at < (block.created_at as f64 + 1.0) * 1000.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RevocationRecord {
    before: i64,
    reason_id: String,
    reason: String,
    created_at: i64,
    created_by: String,
}

/// What the replicas publish to each other.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    put: Option<PutMessage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<CountMessage>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PutMessage {
    hash: String,
    field: String,
    record: String,
    /// The write's number ([`Put::id`]); absent from versions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    /// The write's time in ms ([`Put::at_ms`]); absent from versions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<i64>,
    /// A signal's block evicted to make room ([`Precedence::Evict`]): a lift that is no
    /// operator's, not kept as one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    evicted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct CountMessage {
    signal: String,
    window: u64,
    /// A `sources` signal's grouping of addresses ([`Signal::distinct_grouping`]); absent for
    /// whole addresses and other signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grouping: Option<String>,
    /// What the signal counts (`deny`, `sources`, …): a replica whose policy counts another
    /// event under the same name (a policy change rolling out) ignores the count. Absent from
    /// versions before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    key: String,
    idx: i64,
    cur: u32,
    prev: u32,
}

impl Shared {
    /// The link to the Redis at `url`: this end, and the task to start with [`Link::spawn`]
    /// once the state it feeds exists.
    pub fn new(
        url: &str,
        policy: Arc<dyn Fn() -> Option<Arc<Policy>> + Send + Sync>,
    ) -> (Self, Link) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (puts_tx, puts) = mpsc::channel(PENDING);
        let changed = Arc::new(Changed::default());
        let down = Arc::new(AtomicBool::new(true));
        let synced = Arc::new(AtomicBool::new(false));
        metrics::global().set_risk_store_up(false);
        let link = Link(Task {
            url: url.to_owned(),
            replica: Arc::from(replica_id()),
            state: Weak::new(),
            policy,
            rx,
            puts,
            pending: VecDeque::new(),
            down: Arc::clone(&down),
            synced: Arc::clone(&synced),
            read_store: false,
            refused: false,
            refused_before: false,
            failing: None,
            changed: Arc::clone(&changed),
        });
        (
            Self {
                ops: tx,
                puts: puts_tx,
                down,
                synced,
                changed,
            },
            link,
        )
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// Held across a change made here, from applying it to queueing its write, so that no
    /// record from the store or another replica is applied in between (see `Changed::order`).
    pub fn in_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changed.in_order()
    }

    /// Whether Redis's blocks and revocations have been read once (and so are known here).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Relaxed)
    }

    pub fn block_set(&self, block: &Block) {
        let record = BlockRecord::of(block);
        let precedence = Precedence::of_block(&record);
        let field = block_field(block.kind, &block.value);
        let at_ms = write_time();
        let written = BlockWritten {
            at_ms,
            created_at: block.created_at,
            until: block.expires_at,
            operator_at: None,
        };
        let now = at_ms.div_euclid(1000);
        let lifts = &self.changed.lifts;
        lifts.blocked(&field, Some(written), block.expires_at, now);
        self.put(Hash::Blocks, field, &record, precedence, at_ms);
    }

    /// A risk signal's block evicted here to make room for another: dropped from the store too,
    /// if the store holds it (a replica still holding it drops it rather than writing it back),
    /// and kept as a lift neither here nor by the other replicas (anonymous traffic can cause
    /// evictions, as many as it likes; and an eviction is no operator's word).
    pub fn block_evicted(&self, block: &Block) {
        let at_ms = write_time();
        let field = block_field(block.kind, &block.value);
        // (Ending at 0: no lift known here is forgotten for it.)
        self.changed
            .lifts
            .blocked(&field, None, 0, at_ms.div_euclid(1000));
        let lift = Lift {
            at_ms,
            until: block.expires_at,
        };
        // Naming the block evicted (its author and reason id, beside its end): the store lifts
        // that one only, not another signal's ending in the same second.
        let record = BlockRecord {
            reason_id: block.reason_id.to_string(),
            created_by: block.created_by.clone(),
            evicted_created_at: Some(block.created_at),
            ..lift_record(lift)
        };
        self.put(Hash::Blocks, field, &record, Precedence::Evict, at_ms);
    }

    /// `value` is normalized.
    pub fn block_removed(&self, kind: Kind, value: &str, expires_at: i64) {
        let at_ms = write_time();
        let field = block_field(kind, value);
        let lift = Lift {
            at_ms,
            until: expires_at,
        };
        self.changed
            .lifts
            .lifted(&field, lift, at_ms.div_euclid(1000));
        self.put(
            Hash::Blocks,
            field,
            &lift_record(lift),
            Precedence::Lift,
            at_ms,
        );
    }

    pub fn revoked(&self, revocation: &Revocation) {
        let record = RevocationRecord {
            before: revocation.before,
            reason_id: revocation.reason_id.to_string(),
            reason: revocation.reason.clone(),
            created_at: revocation.created_at,
            created_by: revocation.created_by.clone(),
        };
        self.put(
            Hash::Revocations,
            revocation.subject.clone(),
            &record,
            Precedence::Revocation(revocation.before),
            write_time(),
        );
    }

    fn put(
        &self,
        hash: Hash,
        field: String,
        record: &impl Serialize,
        precedence: Precedence,
        at_ms: i64,
    ) {
        // Noted and queued under one lock: a new session takes what is queued and counts the
        // writes out under it too (`Changed::all_back`), so none is counted twice or missed.
        let id = put_id();
        let mut changed = (hash == Hash::Blocks).then(|| self.changed.lock());
        if let Some(changed) = changed.as_mut() {
            Changed::note(changed, &field, id);
        }
        let put = Put {
            hash,
            field,
            at_ms,
            record: serde_json::to_string(record).expect("records serialize"),
            precedence,
            id,
        };
        // Changes are few (operators', signals' blocks), and the task empties the queue even
        // while Redis is away: a full one (the task held up writing a reconnection's backlog, or
        // gone) drops this change, and says so.
        if let Err(err) = self.puts.try_send(put) {
            // Not on its way after all: no write of it is out.
            let put = match err {
                mpsc::error::TrySendError::Full(put) | mpsc::error::TrySendError::Closed(put) => {
                    put
                }
            };
            if let Some(changed) = changed.as_mut() {
                Changed::back_in(changed, &put.field, put.id);
            }
            drop(changed);
            // Closed: the task is gone (sharing is off, already said, or the process ends).
            static FULL: Throttle = Throttle::new(WARNING_PERIOD);
            if !self.puts.is_closed()
                && let Some(unlogged) = FULL.admit()
            {
                tracing::error!(
                    field = %put.field,
                    unlogged,
                    "the risk store's queue of changes is full: this change made here is \
                     shared at the next resync, when what this replica holds is written back \
                     (later ones within 10 s are only counted)"
                );
            }
        }
    }

    /// One event of `policy`'s signal number `signal` for `key`.
    pub fn counted(
        &self,
        policy: &Arc<Policy>,
        signal: usize,
        key: &str,
        distinct: Option<&str>,
        at_ms: i64,
    ) {
        let op = Op::Count {
            policy: Arc::clone(policy),
            signal,
            key: key.to_owned(),
            member: distinct.map(|d| crate::identity::sha256_hex(d, 16)),
            at_ms,
        };
        if self.ops.try_send(op).is_err() {
            metrics::global().record_risk_store_unsent(1);
        }
    }
}

/// The background task of a [`Shared`], not yet started.
pub struct Link(Task);

impl Link {
    /// Starts the task (on the current Tokio runtime), feeding `state`.
    pub fn spawn(self, state: Weak<RiskState>) {
        let mut task = self.0;
        task.state = state;
        tokio::spawn(task.run());
    }
}

struct Task {
    url: String,
    replica: Arc<str>,
    state: Weak<RiskState>,
    policy: Arc<dyn Fn() -> Option<Arc<Policy>> + Send + Sync>,
    /// Counts.
    rx: mpsc::Receiver<Op>,
    /// Changes.
    puts: mpsc::Receiver<Put>,
    /// Changes made while Redis was unreachable, oldest first.
    pending: VecDeque<Put>,
    down: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
    /// The last session connected and read the store.
    read_store: bool,
    /// Redis answered the last session's last command with an error.
    refused: bool,
    /// The session before it read the store and was refused too.
    refused_before: bool,
    /// The change queued first, by number, and how many sessions in a row the write script
    /// failed on it ([`MAX_SCRIPT_FAILURES`]).
    failing: Option<(u64, u32)>,
    /// Blocks' fields changed here, and when.
    changed: Arc<Changed>,
}

/// A batch's counts are summed per (policy snapshot, signal, key, distinct member, window).
type CountKey = (usize, usize, String, Option<String>, i64);
/// (the policy snapshot, the latest event's time in ms, how many events).
type Counted = (Arc<Policy>, i64, u32);

/// When each block's field was last changed here (set, lifted), for a while, and how many of
/// those changes' writes have not come back yet: a record read from the store, or a message,
/// older than such a change must not undo it before the change's own write reaches the store. A
/// resync's snapshot read before that write holds one (a lift that removes the block set since,
/// an older block that shortens it), and so does a message published before it; this replica
/// ignores its own message, and would not enforce the block until the next resync while every
/// other replica does. Times on this process's monotonic clock, not the records' seconds, which
/// cannot order two writes of one second.
#[derive(Debug, Default)]
struct Changed {
    fields: Mutex<ChangedFields>,
    /// Held across a change here (applied, noted and queued) and across applying what is read
    /// from the store or another replica (checked against the changes here, then applied), so
    /// that neither falls between the other's check and its effect: a message applied between
    /// this replica's block and its noting would undo the block here until the next resync (the
    /// block's write then wins in the store, and this replica ignores its own echo). Taken before
    /// `fields`.
    order: Mutex<()>,
    /// The lifts known here.
    lifts: Lifts,
}

/// The lifts known here (made here, or read from the store or another replica), kept until the
/// block lifted would have ended, as the store keeps them: a Redis that lost a lift (restarted
/// without persistence, or from an older snapshot) would otherwise take back the block lifted
/// from a replica that had not heard of the lift, or from a write of it that waited out an
/// outage, and every replica would enforce it again. A lift the store lacks is written back, and
/// a block the store (or another replica) holds that is older than a lift here is not applied:
/// the lift is written back, and the store decides between the two.
///
/// Beside them, the time in ms each block held here was written, where known to the millisecond
/// (its record keeps only the second): a block written back to a Redis that lost it takes its own
/// time, not its second's start, which an older write of that second (a lift that waited out an
/// outage) would beat.
#[derive(Debug, Default)]
struct Lifts(Mutex<LiftTable>);

#[derive(Debug, Default)]
struct LiftTable {
    lifts: HashMap<String, Lift>,
    /// When the blocks held here were written, by field, where known to the millisecond.
    blocks: HashMap<String, BlockWritten>,
    /// When those over were last swept out to make room (at most once a second: a resync may
    /// read a hundred thousand lifts).
    swept: Option<Instant>,
}

/// When a block held here was written, to the millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockWritten {
    at_ms: i64,
    /// The block's `created_at`, which tells it from another block of the field.
    created_at: i64,
    /// When it ends: forgotten then.
    until: i64,
    /// A signal's block's `operator_at` as the store holds it (the time of the operators' last
    /// word it knows of), written back with it: without it, an operator's write older than
    /// that word, held up, would replace it in a store that lost it.
    operator_at: Option<i64>,
}

/// A lift known here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lift {
    /// When it was written (ms): the store's stamp, or its creation when only that is known.
    at_ms: i64,
    /// When the block lifted would have ended (seconds): the lift is kept until then.
    until: i64,
}

impl Lifts {
    /// The most remembered; past it, those over are forgotten, and past it still a lift is not
    /// remembered: it is then only as safe as the store's own record of it.
    const MAX: usize = blocks::MAX_BLOCKS;

    fn lock(&self) -> std::sync::MutexGuard<'_, LiftTable> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `field` lifted: kept unless a newer lift of it is known.
    fn lifted(&self, field: &str, lift: Lift, now: i64) {
        if lift.until <= now {
            return;
        }
        let mut table = self.lock();
        table.blocks.remove(field);
        if let Some(known) = table.lifts.get_mut(field) {
            if known.at_ms <= lift.at_ms {
                *known = lift;
            }
            return;
        }
        if table.lifts.len() >= Self::MAX {
            table.sweep(now);
            if table.lifts.len() >= Self::MAX {
                return;
            }
        }
        table.lifts.insert(field.to_owned(), lift);
    }

    /// A block on `field`, newer than any lift of it here, is held here now, ending at `until`,
    /// `written` when (none: not known to the millisecond, or not held after all). A lift that
    /// outlasts it is kept: once the block ends, the store forgets it, and the lift, written
    /// back, keeps the lifted block from coming back (a replica cut off meanwhile still holds
    /// it).
    fn blocked(&self, field: &str, written: Option<BlockWritten>, until: i64, now: i64) {
        let mut table = self.lock();
        if table.lifts.get(field).is_some_and(|l| l.until <= until) {
            table.lifts.remove(field);
        }
        let Some(written) = written else {
            table.blocks.remove(field);
            return;
        };
        if !table.blocks.contains_key(field) && table.blocks.len() >= Self::MAX {
            table.sweep(now);
            if table.blocks.len() >= Self::MAX {
                return;
            }
        }
        table.blocks.insert(field.to_owned(), written);
    }

    /// The store gave the block held here on `field`, made at `created_at`, the operators' time
    /// `at` (this replica's own signal's block, written over a lift).
    fn operator_at(&self, field: &str, created_at: i64, at: i64) {
        if let Some(written) = self.lock().blocks.get_mut(field)
            && written.created_at == created_at
        {
            written.operator_at = Some(at);
        }
    }

    /// When the block held here on `field`, made at `created_at`, was written, if known to the
    /// millisecond.
    fn block_written(&self, field: &str, created_at: i64) -> Option<BlockWritten> {
        self.lock()
            .blocks
            .get(field)
            .filter(|w| w.created_at == created_at)
            .copied()
    }

    /// The lift of `field` known here that is newer than a write made at `at_ms`, if any.
    fn newer_than(&self, field: &str, at_ms: i64, now: i64) -> Option<Lift> {
        self.lock()
            .lifts
            .get(field)
            .filter(|l| l.at_ms > at_ms && l.until > now)
            .copied()
    }

    /// The lifts known here whose blocks would not have ended yet.
    fn live(&self, now: i64) -> Vec<(String, Lift)> {
        let mut table = self.lock();
        table.lifts.retain(|_, l| l.until > now);
        table.blocks.retain(|_, w| w.until > now);
        table.lifts.iter().map(|(f, l)| (f.clone(), *l)).collect()
    }
}

impl LiftTable {
    /// Forgets what is over, at most once a second.
    fn sweep(&mut self, now: i64) {
        let at = Instant::now();
        if self
            .swept
            .is_none_or(|swept| at.duration_since(swept) >= Duration::from_secs(1))
        {
            self.swept = Some(at);
            self.lifts.retain(|_, l| l.until > now);
            self.blocks.retain(|_, w| w.until > now);
        }
    }
}

#[derive(Debug, Default)]
struct ChangedFields {
    fields: HashMap<String, Change>,
    pruned: Option<Instant>,
}

#[derive(Debug, Clone, Default)]
struct Change {
    /// When it was last changed here (none: only written back).
    at: Option<Instant>,
    /// Writes of this field made here that the store has neither refused nor echoed on the
    /// channel, by number ([`Put::id`]). Redis delivers a connection's messages in the order it
    /// published them, so while one is out, any other replica's message about the field was
    /// published before it. By number, not a count: the late echo of a write sent again after
    /// its session timed out (Redis stalled, then ran it) does not stand for another's.
    out: Vec<u64>,
}

impl Changed {
    /// The most fields remembered; past it, those changed more than a resync ago with no write
    /// out are forgotten (at most once a second), and past it still, a change is not remembered
    /// (a flood of signals' source blocks): it is then only as safe as before.
    const MAX: usize = 16 * 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, ChangedFields> {
        self.fields.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds changes here and their checks against the store's records in order (see `order`).
    fn in_order(&self) -> std::sync::MutexGuard<'_, ()> {
        self.order.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change of `field` here, whose write `id` is on its way (`changed`: this, locked).
    fn note(changed: &mut ChangedFields, field: &str, id: u64) {
        let now = Instant::now();
        if changed.fields.len() >= Self::MAX && !changed.fields.contains_key(field) {
            if changed
                .pruned
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1))
            {
                changed.pruned = Some(now);
                changed.fields.retain(|_, c| {
                    !c.out.is_empty() || c.at.is_some_and(|at| now.duration_since(at) < 2 * RESYNC)
                });
            }
            if changed.fields.len() >= Self::MAX {
                return;
            }
        }
        let change = changed.fields.entry(field.to_owned()).or_default();
        change.at = Some(now);
        change.out.push(id);
    }

    /// A write of `field` back to the store (what it lost or holds older), which is no change
    /// here but comes back all the same.
    fn written_back(&self, put: &Put) {
        Self::written_back_in(&mut self.lock(), &put.field, put.id);
    }

    fn written_back_in(changed: &mut ChangedFields, field: &str, id: u64) {
        if changed.fields.len() < Self::MAX || changed.fields.contains_key(field) {
            let change = changed.fields.entry(field.to_owned()).or_default();
            change.out.push(id);
        }
    }

    /// Write `id` of `field` made here has come back (echoed, or refused).
    fn back(&self, field: &str, id: u64) {
        Self::back_in(&mut self.lock(), field, id);
    }

    fn back_in(changed: &mut ChangedFields, field: &str, id: u64) {
        if let Some(change) = changed.fields.get_mut(field)
            && let Some(at) = change.out.iter().position(|out| *out == id)
        {
            change.out.swap_remove(at);
        }
    }

    /// A new subscription: the messages of writes sent before it will not come; those of the
    /// writes still to be sent (`to_send`, the blocks' writes waiting) will. `changed`: this,
    /// locked since the waiting writes were taken from the queue.
    fn all_back<'p>(changed: &mut ChangedFields, to_send: impl Iterator<Item = &'p Put>) {
        for change in changed.fields.values_mut() {
            change.out.clear();
        }
        for put in to_send {
            Self::written_back_in(changed, &put.field, put.id);
        }
    }

    /// Whether `field` was changed here at or after `since`.
    fn since(&self, field: &str, since: Instant) -> bool {
        self.lock()
            .fields
            .get(field)
            .and_then(|c| c.at)
            .is_some_and(|at| at >= since)
    }

    /// Whether a write of `field` made here is still out.
    fn out(&self, field: &str) -> bool {
        self.lock()
            .fields
            .get(field)
            .is_some_and(|c| !c.out.is_empty())
    }
}

/// Why a session ended, as said in the log; `refused` when Redis answered with an error (a
/// replica that became read-only, out of memory under `noeviction`, a key of another type)
/// rather than the connection being lost: reconnecting at once would only be refused again.
#[derive(Debug)]
struct Ended {
    said: String,
    refused: bool,
    /// A script failed on what it read (a runtime error, not a refusal of Redis's).
    script: bool,
}

impl Ended {
    fn redis(what: &str, error: &RedisError) -> Self {
        Self {
            said: format!("{what}: {error}"),
            refused: error.kind() != ErrorKind::Io,
            script: error.to_string().contains("user_script:"),
        }
    }
}

impl From<String> for Ended {
    fn from(said: String) -> Self {
        Self {
            said,
            refused: false,
            script: false,
        }
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.said)
    }
}

/// The Lua scripts' digests, loaded on each connection.
struct Scripts {
    put: String,
    read: String,
    count: String,
    distinct: String,
    delete: String,
}

/// Where the store is: one Redis, or the primary that Redis Sentinel names.
pub enum Target {
    Direct(Box<Client>),
    /// Asked at each connection, and at every ping whether they name another primary (a
    /// session ends when they do, or when its server says it is a replica).
    Sentinel {
        client: Box<SentinelClient>,
        /// The primary's name the sentinels watch.
        name: String,
        /// A connection to a sentinel, for the pings' question.
        watch: Option<MultiplexedConnection>,
    },
}

/// Whether a `ROLE` answer says the server is a replica (only its first element is read: what
/// follows differs between servers speaking Redis's protocol).
fn says_replica(answer: &redis::Value) -> bool {
    let redis::Value::Array(items) = answer else {
        return false;
    };
    match items.first() {
        Some(redis::Value::BulkString(role)) => role == b"slave" || role == b"replica",
        Some(redis::Value::SimpleString(role)) => role == "slave" || role == "replica",
        _ => false,
    }
}

/// How long the sentinels may take to name the primary.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    /// A `redis://`, `rediss://` or `redis+unix://` URL, or
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/<primary name>[/<db>]`
    /// (`rediss+sentinel://`: TLS to the sentinels and the primary). The user and password are
    /// the primary's and the sentinels'. The error never holds the password.
    pub fn open(url: &str) -> Result<Self, String> {
        let Some((scheme, rest)) = url
            .strip_prefix("redis+sentinel://")
            .map(|rest| ("redis", rest))
            .or_else(|| {
                url.strip_prefix("rediss+sentinel://")
                    .map(|rest| ("rediss", rest))
            })
        else {
            return Client::open(url)
                .map(|client| Self::Direct(Box::new(client)))
                .map_err(|e| e.to_string());
        };
        // The user information ends at the last `@` (as `StoreSpec::redacted` reads it).
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (format!("{auth}@"), rest),
            None => (String::new(), rest),
        };
        let (hosts, path) = rest.split_once('/').ok_or(
            "a Sentinel URL names the primary after the sentinels: \
             redis+sentinel://host:26379,host:26379/<primary name>[/<db>]",
        )?;
        let path = path.strip_suffix('/').unwrap_or(path);
        let (name, db) = path.split_once('/').unwrap_or((path, "0"));
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"?#&=".contains(&b))
        {
            return Err(
                "the primary's name after the sentinels is empty, not ASCII, or holds a query"
                    .into(),
            );
        }
        let db: i64 = db
            .parse()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or("the database after the primary's name is not a number")?;
        // A sentinel without a port listens on Sentinel's, not Redis's.
        let with_port = |host: &str| {
            let has_port = match host.strip_prefix('[') {
                Some(v6) => v6.contains("]:"),
                None => host.contains(':'),
            };
            if has_port || host.is_empty() {
                host.to_owned()
            } else {
                format!("{host}:26379")
            }
        };
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(|host| format!("{scheme}://{auth}{}", with_port(host)))
            .collect();
        if hosts.is_empty()
            || sentinels
                .iter()
                .any(|s| s.ends_with('@') || s.ends_with("//"))
        {
            return Err("a Sentinel URL names at least one sentinel, host:port".into());
        }
        let primary = format!(
            "{scheme}://{auth}{}/{db}",
            hosts.split(',').next().unwrap_or("")
        )
        .into_connection_info()
        .map_err(|e| format!("not a usable Sentinel URL: {e}"))?;
        let mut node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(primary.redis_settings().clone());
        if scheme == "rediss" {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        SentinelClient::build(sentinels, name, Some(node), SentinelServerType::Master)
            .map(|client| Self::Sentinel {
                client: Box::new(client),
                name: name.to_owned(),
                watch: None,
            })
            .map_err(|e| format!("not a usable Sentinel URL: {e}"))
    }

    /// Whether the sentinels now name another primary than the one at `addr`; `None` when
    /// none answers (the session goes on: its server is the last primary known).
    async fn names_another(&mut self, addr: &redis::ConnectionAddr) -> Option<bool> {
        let Self::Sentinel {
            client,
            name,
            watch,
        } = self
        else {
            return Some(false);
        };
        if watch.is_none() {
            let sentinel = tokio::time::timeout(TIMEOUT, client.async_get_sentinel_client())
                .await
                .ok()?
                .ok()?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT));
            *watch = sentinel
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .ok();
        }
        let reply: Result<Option<(String, u16)>, RedisError> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(name.as_str())
            .query_async(watch.as_mut()?)
            .await;
        let Ok(Some((host, port))) = reply else {
            *watch = None;
            return None;
        };
        Some(match addr {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => *h != host || *p != port,
            _ => false,
        })
    }

    /// A client of the store: for Sentinel, of the primary the sentinels name now.
    async fn client(&mut self) -> Result<Client, Ended> {
        match self {
            Self::Direct(client) => Ok(Client::clone(client)),
            Self::Sentinel { client, .. } => {
                tokio::time::timeout(SENTINEL_TIMEOUT, client.async_get_client())
                    .await
                    .map_err(|_| Ended::from("asking the sentinels: timed out".to_owned()))?
                    .map_err(|e| Ended::from(format!("asking the sentinels for the primary: {e}")))
            }
        }
    }
}

impl Task {
    async fn run(mut self) {
        let mut target = match Target::open(self.url.as_str()) {
            Ok(target) => target,
            Err(err) => {
                // The policy compiler checked the URL; this is only reached by one it could not.
                tracing::error!(error = %err, "risk.store: not a usable Redis URL; sharing is off");
                return;
            }
        };
        let mut backoff = BACKOFF_FIRST;
        let mut reported = false;
        loop {
            if self.state.strong_count() == 0 {
                return;
            }
            self.read_store = false;
            let session = match target.client().await {
                Ok(client) => self.session(&client, &mut target).await,
                Err(err) => Err(err),
            };
            match session {
                Ok(()) => return,
                Err(err) => {
                    self.refused = err.refused;
                    metrics::global().record_risk_store_error();
                    if !self.down.swap(true, Relaxed) {
                        // At most every 10 s: a store that drops connections (an idle timeout
                        // shorter than the ping) is reconnected to as often.
                        static LOST: Throttle = Throttle::new(WARNING_PERIOD);
                        if let Some(unlogged) = LOST.admit() {
                            tracing::error!(
                                error = %err,
                                unlogged,
                                "lost the Redis risk store: deciding from the last known blocks \
                                 and revocations, counting locally; reconnecting (later losses \
                                 within 10 s are only counted)"
                            );
                        }
                    } else if !reported {
                        tracing::error!(
                            error = %err,
                            "the Redis risk store is unreachable: deciding from the last known \
                             blocks and revocations, counting locally; reconnecting"
                        );
                    }
                    reported = true;
                    metrics::global().set_risk_store_up(false);
                }
            }
            // A session that connected and read the store, then was lost, starts the backoff
            // over: a blip after hours connected waits 100 ms, not what the failures before it
            // had grown to (under `fail_closed`, every request in that time is refused). One
            // that never got that far (refused, or dropped before the store was read) keeps
            // doubling, and so do sessions that Redis ends with an error one after the other: a
            // store that reads but refuses writes (a read-only replica after a failover) would
            // otherwise be read in full ten times a second. The first of them starts over too: a
            // one-off error reply (a script flushed, a moment out of memory) is a blip.
            if self.read_store && !(self.refused && self.refused_before) {
                backoff = BACKOFF_FIRST;
            }
            self.refused_before = self.read_store && self.refused;
            if self.wait(backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Counts a failure of the write script on `put`, the change queued first: whether it has
    /// failed [`MAX_SCRIPT_FAILURES`] times in a row.
    fn failed_again(&mut self, put: &Put) -> bool {
        let count = match self.failing {
            Some((id, count)) if id == put.id => count + 1,
            _ => 1,
        };
        self.failing = Some((put.id, count));
        count >= MAX_SCRIPT_FAILURES
    }

    /// Waits `pause`, queueing the changes that arrive meanwhile. True when the server is gone.
    async fn wait(&mut self, pause: Duration) -> bool {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return false,
                put = self.puts.recv() => match put {
                    None => return true,
                    Some(put) => self.hold(Op::Put(put)),
                },
                op = self.rx.recv() => match op {
                    None => return true,
                    Some(op) => self.hold(op),
                },
            }
        }
    }

    /// Keeps a change for the next connection (a count is only local meanwhile).
    fn hold(&mut self, op: Op) {
        match op {
            Op::Put(put) => {
                if self.pending.len() >= PENDING {
                    self.pending.pop_front();
                }
                self.pending.push_back(put);
            }
            Op::Count { .. } => metrics::global().record_risk_store_unsent(1),
        }
    }

    /// One connection's life: returns `Err` when it fails, or (through Sentinel) when its
    /// server is no longer the primary.
    async fn session(&mut self, client: &Client, target: &mut Target) -> Result<(), Ended> {
        let primary_only = matches!(target, Target::Sentinel { .. });
        // Whether the server answers `ROLE` (an ACL may deny it, a proxy not know it).
        let mut role = primary_only;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| Ended::redis("connecting", &e))?;
        let mut pubsub = tokio::time::timeout(TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| Ended::from("subscribing: timed out".to_owned()))?
            .map_err(|e| Ended::redis("subscribing", &e))?;
        tokio::time::timeout(TIMEOUT, pubsub.subscribe(CHANNEL))
            .await
            .map_err(|_| Ended::from("subscribing: timed out".to_owned()))?
            .map_err(|e| Ended::redis("subscribing", &e))?;
        // The subscription is pinged beside the commands' connection: one dropped without a
        // word (an idle timeout of a load balancer or NAT on the way) would otherwise lose every
        // other replica's change, and every echo of this one's, which keeps its fields from being
        // read back over (`Changed`), until the next reconnection.
        let (mut subscription, mut messages) = pubsub.split();
        let scripts = Scripts {
            put: load(&mut conn, PUT).await?,
            read: load(&mut conn, READ).await?,
            count: load(&mut conn, COUNT).await?,
            distinct: load(&mut conn, DISTINCT).await?,
            delete: load(&mut conn, DELETE).await?,
        };
        // Every change still queued is written on this connection, and its echo comes on this
        // subscription: taken from the queue, and counted out, under the lock `put` notes and
        // queues under. The echoes of writes sent before this subscription will not come.
        {
            let changed = Arc::clone(&self.changed);
            let mut changed = changed.lock();
            while let Ok(put) = self.puts.try_recv() {
                self.hold(Op::Put(put));
            }
            let to_send = self.pending.iter().filter(|p| p.hash == Hash::Blocks);
            Changed::all_back(&mut changed, to_send);
        }
        // Changes made while cut off, then everything Redis holds: a field with a write of
        // this replica's still out is not read back over it (`resync`).
        while let Some(put) = self.pending.front().cloned() {
            let puts = std::slice::from_ref(&put);
            let sent = Instant::now();
            let written = match self.write_puts(&mut conn, &scripts, puts).await {
                Ok(written) => written,
                Err(ended) if ended.script && self.failed_again(&put) => {
                    // The script fails on what the store holds for this field (written by
                    // hand, or by a version that reads it otherwise): dropped, so that one field
                    // does not hold up every other change, and this replica's readiness.
                    self.pending.pop_front();
                    self.changed.back(&put.field, put.id);
                    metrics::global().record_risk_store_error();
                    tracing::error!(
                        field = %put.field,
                        error = %ended,
                        "the risk store's write script failed {MAX_SCRIPT_FAILURES} times on a \
                         change: dropped (it holds here); fix or delete the field in Redis"
                    );
                    continue;
                }
                Err(ended) => return Err(ended),
            };
            self.failing = None;
            self.pending.pop_front();
            self.refused_here(&mut conn, puts, &written, Some(sent))
                .await?;
        }
        self.resync(&mut conn, &scripts).await?;
        if !self.synced.swap(true, Relaxed) {
            // Readiness waited for this: the replica now knows every block and revocation.
            crate::identity::issuer::note_key_sets_changed();
        }
        if self.down.swap(false, Relaxed) {
            static CONNECTED: Throttle = Throttle::new(WARNING_PERIOD);
            if let Some(unlogged) = CONNECTED.admit() {
                tracing::info!(
                    replica = &*self.replica,
                    unlogged,
                    "connected to the Redis risk store (later reconnections within 10 s are \
                     only counted)"
                );
            }
        }
        self.read_store = true;
        metrics::global().set_risk_store_up(true);

        let mut ping = tokio::time::interval(PING);
        let mut resync = tokio::time::interval(RESYNC);
        resync.reset();
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => {
                        if let Some(kept) = self.receive(message.get_payload_bytes()) {
                            self.send(&mut conn, &scripts, vec![Op::Put(kept)]).await?;
                        }
                    }
                    None => return Err(Ended::from("the subscription was closed".to_owned())),
                },
                put = self.puts.recv() => {
                    let Some(put) = put else { return Ok(()) };
                    let mut batch = vec![Op::Put(put)];
                    while batch.len() < BATCH {
                        match self.puts.try_recv() {
                            Ok(put) => batch.push(Op::Put(put)),
                            Err(_) => break,
                        }
                    }
                    self.send(&mut conn, &scripts, batch).await?;
                }
                op = self.rx.recv() => {
                    let Some(op) = op else { return Ok(()) };
                    let mut batch = vec![op];
                    while batch.len() < BATCH {
                        match self.rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    self.send(&mut conn, &scripts, batch).await?;
                }
                _ = ping.tick() => {
                    let answer = if role {
                        redis::cmd("ROLE").query_async::<redis::Value>(&mut conn).await
                    } else {
                        redis::cmd("PING").query_async::<redis::Value>(&mut conn).await
                    };
                    match answer {
                        Ok(answer) if role && says_replica(&answer) => {
                            return Err(Ended::from(
                                "the server is a replica now (a failover): asking the sentinels \
                                 again"
                                    .to_owned(),
                            ));
                        }
                        Ok(_) => {}
                        Err(e) if role && e.kind() != ErrorKind::Io && !e.is_timeout() => {
                            tracing::warn!(
                                error = %e,
                                "the risk store does not answer ROLE (an ACL without it, or a \
                                 proxy): a failover is seen from the sentinels alone"
                            );
                            role = false;
                        }
                        Err(e) => return Err(Ended::redis("ping", &e)),
                    }
                    if primary_only
                        && target.names_another(client.get_connection_info().addr()).await
                            == Some(true)
                    {
                        return Err(Ended::from(
                            "the sentinels name another primary (a failover): connecting to it"
                                .to_owned(),
                        ));
                    }
                    tokio::time::timeout(TIMEOUT, subscription.ping::<redis::Value>())
                        .await
                        .map_err(|_| Ended::from("ping on the subscription: timed out".to_owned()))?
                        .map_err(|e| Ended::redis("ping on the subscription", &e))?;
                }
                _ = resync.tick() => self.resync(&mut conn, &scripts).await?,
            }
        }
    }

    /// Sends a batch: changes first (in order), then the counts, one pipeline each. On failure
    /// the batch's changes wait for the next connection.
    async fn send(
        &mut self,
        conn: &mut MultiplexedConnection,
        scripts: &Scripts,
        batch: Vec<Op>,
    ) -> Result<(), Ended> {
        let mut puts = Vec::new();
        let mut counts: HashMap<CountKey, Counted> = HashMap::new();
        for op in batch {
            match op {
                Op::Put(put) => puts.push(put),
                Op::Count {
                    policy,
                    signal,
                    key,
                    member,
                    at_ms,
                } => {
                    let table = policy.risk.signals[signal].table();
                    let idx = match member {
                        Some(_) => 0,
                        None => table.window_index(at_ms),
                    };
                    let id = Arc::as_ptr(&policy) as usize;
                    let entry = counts.entry((id, signal, key, member, idx)).or_insert((
                        Arc::clone(&policy),
                        at_ms,
                        0,
                    ));
                    entry.1 = entry.1.max(at_ms);
                    entry.2 += 1;
                }
            }
        }
        let sent = Instant::now();
        match self.write_puts(conn, scripts, &puts).await {
            Ok(written) => self.refused_here(conn, &puts, &written, Some(sent)).await?,
            Err(err) => {
                for put in puts.into_iter().rev() {
                    self.pending.push_front(put);
                }
                return Err(err);
            }
        }
        if counts.is_empty() {
            return Ok(());
        }
        let counts: Vec<_> = counts.into_iter().collect();
        let mut pipe = redis::pipe();
        for ((_, signal, key, member, idx), (policy, at_ms, delta)) in &counts {
            let signal = &policy.risk.signals[*signal];
            let window_ms = signal.window_seconds as i64 * 1000;
            let grouping = signal
                .distinct_grouping()
                .map(|g| format!(":{g}"))
                .unwrap_or_default();
            let tag = format!(
                "{{{}:{}s{grouping}:{}}}",
                signal.name,
                signal.window_seconds,
                crate::identity::sha256_hex(key, 32)
            );
            match member {
                Some(member) => pipe
                    .cmd("EVALSHA")
                    .arg(&scripts.distinct)
                    .arg(1)
                    .arg(format!("stepgate:d:{tag}"))
                    .arg(at_ms)
                    .arg(member)
                    .arg(window_ms)
                    .arg(signal.threshold),
                None => pipe
                    .cmd("EVALSHA")
                    .arg(&scripts.count)
                    .arg(2)
                    .arg(format!("stepgate:c:{tag}:{idx}"))
                    .arg(format!("stepgate:c:{tag}:{}", idx - 1))
                    .arg(delta)
                    .arg(2 * window_ms),
            };
        }
        let replies: Vec<(i64, i64)> = match pipe.query_async(conn).await {
            Ok(replies) => replies,
            Err(err) => {
                metrics::global().record_risk_store_unsent(counts.len() as u64);
                return Err(Ended::redis("counting", &err));
            }
        };
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let now = now_ms();
        for (((_, index, key, _, idx), (policy, _, delta)), (cur, prev)) in
            counts.iter().zip(replies)
        {
            let signal = &policy.risk.signals[*index];
            let (cur, prev) = (clamp(cur), clamp(prev));
            let table = signal.table();
            let change = table.merge_remote(key, *idx, cur, prev, now);
            // Whether this reply is the one that took the shared total to the threshold: then
            // this replica tells the others (exactly one replica sees that reply).
            let threshold = u64::from(signal.threshold);
            let shared_after = table.estimate_of(*idx, cur, prev, now);
            let shared_before = match table.counting() {
                Counting::Events => table.estimate_of(*idx, cur.saturating_sub(*delta), prev, now),
                Counting::Distinct => shared_after.saturating_sub(1),
            };
            if shared_before >= threshold || shared_after < threshold {
                continue;
            }
            if change.before < threshold {
                // Not reached in this replica's own view before: act here.
                let crossing = Crossing {
                    signal: *index,
                    key: key.clone(),
                    count: change.after,
                    fresh: true,
                };
                state.crossed(&policy.risk, &crossing, now);
            }
            let message = Message {
                from: self.replica.to_string(),
                put: None,
                count: Some(CountMessage {
                    signal: signal.name.to_string(),
                    window: signal.window_seconds,
                    grouping: signal.distinct_grouping().map(str::to_owned),
                    event: Some(signal.event.as_str().to_owned()),
                    key: key.clone(),
                    idx: *idx,
                    cur,
                    prev,
                }),
            };
            let text = serde_json::to_string(&message).expect("messages serialize");
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(text)
                .query_async::<i64>(conn)
                .await
                .map_err(|e| Ended::redis("publishing", &e))?;
        }
        Ok(())
    }

    /// Writes `puts` through [`PUT`]: whether each was written (or refused, what the store
    /// holds winning over it).
    async fn write_puts(
        &self,
        conn: &mut MultiplexedConnection,
        scripts: &Scripts,
        puts: &[Put],
    ) -> Result<Vec<bool>, Ended> {
        if puts.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let now = unix_now();
        for put in puts {
            let (what, ends) = put.precedence.args();
            let message = Message {
                from: self.replica.to_string(),
                put: Some(PutMessage {
                    hash: put.hash.key().to_owned(),
                    field: put.field.clone(),
                    record: put.record.clone(),
                    id: Some(put.id),
                    at: Some(put.at_ms),
                    evicted: put.precedence == Precedence::Evict,
                }),
                count: None,
            };
            pipe.cmd("EVALSHA")
                .arg(&scripts.put)
                .arg(2)
                .arg(put.hash.key())
                .arg(put.hash.writes_key())
                .arg(&put.field)
                .arg(put.at_ms)
                .arg(&put.record)
                .arg(serde_json::to_string(&message).expect("messages serialize"))
                .arg(CHANNEL)
                .arg(what)
                .arg(ends)
                .arg(now)
                .arg(blocks::RISK_CREATOR_PREFIX)
                .arg(MAX_TTL_SECONDS)
                .arg(revocations::MAX_CLOCK_AHEAD_SECONDS)
                .arg(MAX_RECORD_BYTES)
                .arg(blocks::MAX_REASON_BYTES)
                .arg(blocks::MAX_CREATED_BY_BYTES);
        }
        let written: Vec<i64> = pipe
            .query_async(conn)
            .await
            .map_err(|e| Ended::redis("writing changes", &e))?;
        Ok(written.into_iter().map(|w| w == 1).collect())
    }

    /// After `puts` of blocks made here were written (`written`, one for each): those the store
    /// refused (what it holds won over them) are back, and what the store now holds for their
    /// fields is applied here, unless the field was changed here again `since` (a resync's
    /// start), whose own write is then on its way.
    async fn refused_here(
        &self,
        conn: &mut MultiplexedConnection,
        puts: &[Put],
        written: &[bool],
        since: Option<Instant>,
    ) -> Result<(), Ended> {
        let refused: Vec<&Put> = puts
            .iter()
            .zip(written)
            .filter(|(put, written)| put.hash == Hash::Blocks && !**written)
            .map(|(put, _)| put)
            .collect();
        if refused.is_empty() {
            return Ok(());
        }
        for put in &refused {
            self.changed.back(&put.field, put.id);
        }
        let refused: Vec<&str> = refused.into_iter().map(|p| p.field.as_str()).collect();
        let mut pipe = redis::pipe();
        for field in &refused {
            pipe.cmd("HGET").arg(Hash::Blocks.key()).arg(*field);
        }
        let stored: Vec<Option<Vec<u8>>> = pipe
            .query_async(conn)
            .await
            .map_err(|e| Ended::redis("reading refused changes back", &e))?;
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let now = unix_now();
        for (field, stored) in refused.into_iter().zip(stored) {
            let Some((stamp, record)) = stored
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .and_then(|text| parse_stamped::<BlockRecord>(&text, now))
            else {
                continue;
            };
            // Changed here again since, or another write of the field from here still out:
            // that write, or its own refusal's reading back, decides.
            let _order = self.changed.in_order();
            if since.is_some_and(|since| self.changed.since(field, since))
                || self.changed.out(field)
            {
                continue;
            }
            apply_block(
                &state,
                &self.changed.lifts,
                field,
                &record,
                Some(stamp),
                now,
                Source::Refusal,
            );
        }
        Ok(())
    }

    /// Reads both hashes: applies what Redis holds, writes back what it lacks (a Redis that
    /// restarted empty), and deletes what has expired.
    async fn resync(
        &mut self,
        conn: &mut MultiplexedConnection,
        scripts: &Scripts,
    ) -> Result<(), Ended> {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let now = unix_now();
        let started = Instant::now();
        let blocks = read_hash(conn, scripts, Hash::Blocks, blocks::MAX_BLOCKS).await?;
        let revocations = read_hash(
            conn,
            scripts,
            Hash::Revocations,
            revocations::MAX_REVOCATIONS,
        )
        .await?;
        // A key of another type (set by another client) is read as empty; what this replica
        // holds is not written back into it, which Redis would refuse, ending every session. Nor
        // into a hash holding more than was read (more than a replica holds): what was not read
        // is not missing, and would be written again at every resync.
        let partial: Vec<Hash> = [(Hash::Blocks, &blocks), (Hash::Revocations, &revocations)]
            .into_iter()
            .filter_map(|(hash, read)| read.as_ref().is_none_or(|r| r.cut).then_some(hash))
            .collect();
        let entries = |read: Option<HashRead>| read.map(|r| r.entries).unwrap_or_default();
        let (blocks, revocations) = (entries(blocks), entries(revocations));
        // Parsed, applied and compared off the worker (a store of 70 000 blocks held its
        // connections for a second and more at each resync).
        let changed = Arc::clone(&self.changed);
        let applied = Arc::clone(&state);
        let Reconciled {
            expired,
            mut missing,
            contested,
        } = tokio::task::spawn_blocking(move || {
            // Changed here since the read began, or a write of the field from here not yet
            // echoed nor refused (queued behind the read, or sent): that write, or its
            // refusal's reading back, decides.
            let changed_here = |field: &str| changed.since(field, started) || changed.out(field);
            reconcile(
                &applied,
                &blocks,
                &revocations,
                now,
                &changed_here,
                &changed,
            )
        })
        .await
        .map_err(|e| Ended::from(format!("applying the store's entries failed: {e}")))?;
        missing.retain(|put| !partial.contains(&put.hash));
        for put in missing.iter().filter(|p| p.hash == Hash::Blocks) {
            self.changed.written_back(put);
        }
        let written = self.write_puts(conn, scripts, &missing).await?;
        self.refused_here(conn, &missing, &written, Some(started))
            .await?;
        // The blocks held here that are newer than the store's records: written back, and where
        // the store's record wins over the write (the script refuses it), that record applied.
        let puts = contested;
        for put in puts.iter().filter(|p| p.hash == Hash::Blocks) {
            self.changed.written_back(put);
        }
        let written = self.write_puts(conn, scripts, &puts).await?;
        self.refused_here(conn, &puts, &written, Some(started))
            .await?;
        if !expired.is_empty() {
            let mut pipe = redis::pipe();
            for (hash, field, stored) in &expired {
                pipe.cmd("EVALSHA")
                    .arg(&scripts.delete)
                    .arg(2)
                    .arg(hash.key())
                    .arg(hash.writes_key())
                    .arg(field)
                    .arg(stored)
                    .ignore();
            }
            pipe.query_async::<()>(conn)
                .await
                .map_err(|e| Ended::redis("deleting expired entries", &e))?;
        }
        Ok(())
    }

    /// A change another replica published. Returns what this replica holds instead, to write
    /// back (see [`apply_block`]).
    fn receive(&self, payload: &[u8]) -> Option<Put> {
        if payload.len() > MAX_MESSAGE_BYTES {
            ignored("a message on the risk store's channel", "too long");
            return None;
        }
        let Ok(message) = serde_json::from_slice::<Message>(payload) else {
            ignored("a message on the risk store's channel", "unreadable");
            return None;
        };
        if *message.from == *self.replica {
            if let Some(put) = message.put.filter(|p| p.hash == Hash::Blocks.key())
                && let Some(id) = put.id
            {
                // The record as the store holds it: a signal's block written over an operator's
                // lift carries the lift's time, which a write-back must carry too.
                if let Some(record) = record::<BlockRecord>(&put.record)
                    && record.created_by.starts_with(blocks::RISK_CREATOR_PREFIX)
                    && let Some(at) = stored_operator_at(&record, unix_now())
                {
                    self.changed
                        .lifts
                        .operator_at(&put.field, record.created_at, at);
                }
                self.changed.back(&put.field, id);
            }
            return None;
        }
        let state = self.state.upgrade()?;
        metrics::global().record_risk_store_received();
        let now = unix_now();
        let mut kept = None;
        if let Some(put) = message.put {
            if put.hash == Hash::Blocks.key() {
                // Published before this replica's own write of the field, which is still out.
                let _order = self.changed.in_order();
                if let Some(record) = record::<BlockRecord>(&put.record)
                    && !self.changed.out(&put.field)
                {
                    let lifts = &self.changed.lifts;
                    let from = if put.evicted {
                        Source::Eviction
                    } else {
                        Source::Message
                    };
                    kept = apply_block(&state, lifts, &put.field, &record, put.at, now, from);
                    if let Some(kept) = &kept {
                        // Its write is out from now on: what was published before it is not
                        // applied over what is kept.
                        self.changed.written_back(kept);
                    }
                }
            } else if put.hash == Hash::Revocations.key()
                && let Some(record) = record::<RevocationRecord>(&put.record)
            {
                apply_revocation(&state, &put.field, &record, now);
            }
        }
        if let Some(count) = message.count {
            let Some(policy) = (self.policy)() else {
                return kept;
            };
            if let Some(signal) = policy.risk.signal(&count.signal).filter(|s| {
                s.window_seconds == count.window
                    && s.distinct_grouping() == count.grouping.as_deref()
                    && count.event.as_deref().is_none_or(|e| e == s.event.as_str())
            }) {
                signal
                    .table()
                    .merge_remote(&count.key, count.idx, count.cur, count.prev, now_ms());
            }
        }
        kept
    }
}

/// What [`read_hash`] read of a hash: its entries, and whether it holds more than were read.
struct HashRead {
    entries: HashMap<String, String>,
    cut: bool,
}

/// Reads hash `hash` through [`READ`]: at most `max` fields, none longer than
/// [`MAX_FIELD_BYTES`] nor with a value longer than [`MAX_RECORD_BYTES`].
async fn read_hash(
    conn: &mut MultiplexedConnection,
    scripts: &Scripts,
    hash: Hash,
    max: usize,
) -> Result<Option<HashRead>, Ended> {
    // As bytes: one value that is not UTF-8 (written by another client) must not fail the
    // whole read, and with it every session.
    let (skipped, pairs, cut): (i64, Vec<Vec<u8>>, i64) = redis::cmd("EVALSHA")
        .arg(&scripts.read)
        .arg(1)
        .arg(hash.key())
        .arg(MAX_FIELD_BYTES)
        .arg(MAX_RECORD_BYTES)
        .arg(max)
        .query_async(conn)
        .await
        .map_err(|e| Ended::redis(&format!("reading {}", hash.key()), &e))?;
    if skipped < 0 {
        ignored(
            hash.key(),
            "not a hash (set by another client of the Redis)",
        );
        return Ok(None);
    }
    let mut pairs = pairs.into_iter();
    let mut read = HashMap::new();
    let mut not_text = 0;
    while let (Some(field), Some(value)) = (pairs.next(), pairs.next()) {
        match (String::from_utf8(field), String::from_utf8(value)) {
            (Ok(field), Ok(value)) => {
                read.insert(field, value);
            }
            _ => not_text += 1,
        }
    }
    if skipped > 0 || not_text > 0 {
        ignored(
            "entries of the risk store",
            &format!("{skipped} too long or past {max}, {not_text} not UTF-8"),
        );
    }
    Ok(Some(HashRead {
        entries: read,
        cut: cut == 1,
    }))
}

/// Applies what the store holds (`blocks` and `revocations` by field) to `state`: (the entries
/// past their time, to delete; what `state` holds and the store lost, to write back).
/// What a resync makes of the store's entries.
struct Reconciled {
    /// The entries past their time, to delete unless written since: (hash, field, as read).
    expired: Vec<(Hash, String, String)>,
    /// What this replica holds and the store lost, to write back.
    missing: Vec<Put>,
    /// The blocks held here that are newer than the store's records for them, to write back
    /// (what the store then holds applied here if the write is refused).
    contested: Vec<Put>,
}

/// Applies what the store holds (`blocks` and `revocations` by field) to `state`, but for the
/// blocks' fields `changed_here` since the store was read; each block checked and applied in
/// `changed`'s order (see `Changed::order`).
fn reconcile(
    state: &RiskState,
    blocks: &HashMap<String, String>,
    revocations: &HashMap<String, String>,
    now: i64,
    changed_here: &dyn Fn(&str) -> bool,
    changed: &Changed,
) -> Reconciled {
    let mut expired: Vec<(Hash, String, String)> = Vec::new();
    let mut missing = Vec::new();
    let mut contested = Vec::new();
    for (field, stored) in blocks {
        let _order = changed.in_order();
        match parse_stamped::<BlockRecord>(stored, now) {
            Some((_, record)) if record.expires_at <= now => {
                expired.push((Hash::Blocks, field.clone(), stored.clone()));
            }
            Some(_) if changed_here(field) => {
                // Changed here since the store was read: the change's own write, on its way,
                // decides in the store, and the next resync brings this replica to it.
            }
            Some((stamp, record)) => {
                let from = Source::Resync;
                if let Some(kept) = apply_block(
                    state,
                    &changed.lifts,
                    field,
                    &record,
                    Some(stamp),
                    now,
                    from,
                ) {
                    contested.push(kept);
                }
            }
            None if stamped_ahead(stored, now) => skewed("a block in the risk store"),
            None => ignored("a block in the risk store", "unreadable"),
        }
    }
    // The time of each revocation the store holds, as read.
    let mut stored_before: HashMap<&str, i64> = HashMap::new();
    for (subject, stored) in revocations {
        match parse_stored::<RevocationRecord>(stored, now) {
            Some(record) if record.before.saturating_add(KEEP_SECONDS) <= now => {
                expired.push((Hash::Revocations, subject.clone(), stored.clone()));
            }
            Some(record) => {
                if apply_revocation(state, subject, &record, now) {
                    stored_before.insert(subject, record.before);
                }
            }
            None if stamped_ahead(stored, now) => skewed("a revocation in the risk store"),
            None => ignored("a revocation in the risk store", "unreadable"),
        }
    }
    // What this replica holds and Redis does not: Redis lost it (restarted without
    // persistence, or flushed). Written back, unless a newer write is there by then.
    for block in state.blocks().list(now) {
        let field = block_field(block.kind, &block.value);
        if !blocks.contains_key(&field) {
            let written = changed.lifts.block_written(&field, block.created_at);
            missing.push(block_put(field, &block, written));
        }
    }
    for (field, lift) in changed.lifts.live(now) {
        if !blocks.contains_key(&field) {
            missing.push(lift_put(field, lift));
        }
    }
    // And a revocation held here that covers more than the store's (the store kept a later
    // write that covered less, from a replica that had not heard of this one): written back,
    // the script keeping the one that covers more.
    for revocation in state.revocations().list(now) {
        let put = || Put {
            hash: Hash::Revocations,
            field: revocation.subject.clone(),
            at_ms: revocation.created_at * 1000,
            record: serde_json::to_string(&RevocationRecord {
                before: revocation.before,
                reason_id: revocation.reason_id.to_string(),
                reason: revocation.reason.clone(),
                created_at: revocation.created_at,
                created_by: revocation.created_by.clone(),
            })
            .expect("records serialize"),
            precedence: Precedence::Revocation(revocation.before),
            id: put_id(),
        };
        // One the store holds that no replica applies (unreadable, ahead of the clock) is no
        // revocation, and the script writes over it.
        match stored_before.get(revocation.subject.as_str()) {
            None => missing.push(put()),
            Some(before) if *before < revocation.before => contested.push(put()),
            Some(_) => {}
        }
    }
    Reconciled {
        expired,
        missing,
        contested,
    }
}

/// Says that something read from Redis was ignored, at most every 10 s (whoever can write to
/// the Redis can send it as often as they like).
fn ignored(what: &str, why: &str) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    warn_throttled(
        &WARNINGS,
        what,
        why,
        "ignored what the Redis risk store holds: no replica writes it",
    );
}

/// Says that a block or revocation read from Redis could not be applied here (the table full),
/// at most every 10 s: a store of thousands would otherwise log thousands of lines at each
/// resync.
fn unapplied(what: &str, why: &str) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    warn_throttled(
        &WARNINGS,
        what,
        why,
        "could not apply what the Redis risk store holds",
    );
}

fn warn_throttled(throttle: &Throttle, what: &str, why: &str, said: &str) {
    if let Some(unlogged) = throttle.admit() {
        tracing::warn!(
            what,
            why,
            unlogged,
            "{said} (later ones within 10 s are only counted)"
        );
    }
}

/// `block` written back to the store as its creator wrote it, at the time it was `written` when
/// known (else at its second's start), with the `operator_at` the store gave it.
fn block_put(field: String, block: &Block, written: Option<BlockWritten>) -> Put {
    let mut record = BlockRecord::of(block);
    record.operator_at = written.and_then(|w| w.operator_at).map(Into::into);
    Put {
        hash: Hash::Blocks,
        field,
        at_ms: written.map_or(block.created_at * 1000, |w| w.at_ms),
        record: serde_json::to_string(&record).expect("records serialize"),
        precedence: Precedence::of_block(&record),
        id: put_id(),
    }
}

/// A stored record's `operator_at`, if it is one a replica's clock could have given (the script
/// takes no other: [`PUT`]).
fn stored_operator_at(record: &BlockRecord, now: i64) -> Option<i64> {
    let ahead = now.saturating_add(revocations::MAX_CLOCK_AHEAD_SECONDS);
    record
        .operator_at
        .as_ref()
        .and_then(serde_json::Number::as_i64)
        .filter(|at| *at <= ahead.saturating_mul(1000))
}

/// The record of a lift, as stored.
fn lift_record(lift: Lift) -> BlockRecord {
    BlockRecord {
        removed: true,
        reason_id: String::new(),
        reason: String::new(),
        created_at: lift.at_ms.div_euclid(1000),
        expires_at: lift.until,
        created_by: String::new(),
        operator_at: None,
        evicted_created_at: None,
    }
}

/// A lift known here, written back to the store as it was written.
fn lift_put(field: String, lift: Lift) -> Put {
    Put {
        hash: Hash::Blocks,
        field,
        at_ms: lift.at_ms,
        record: serde_json::to_string(&lift_record(lift)).expect("records serialize"),
        precedence: Precedence::Lift,
        id: put_id(),
    }
}

/// Where a stored record [`apply_block`] applies comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A resync's read of the store.
    Resync,
    /// Another replica's message: a write that has just won in the store.
    Message,
    /// Another replica's message of a signal's block it evicted: a lift, but no operator's.
    Eviction,
    /// The store, after refusing this replica's block in its favour.
    Refusal,
}

/// Applies a block or lift the store holds (`stamp`: its write time in ms, when known: the
/// store's stamp, or the time a message says it was written). Returns
/// the write of what is kept here instead, to write back (the store's record is applied only if
/// that write is refused):
/// - when `from` a resync the store's record is older than the block held here (a lift, or a
///   block, made before it: Redis lost the newer write, restarted from an older snapshot or
///   failed over to a replica behind);
/// - when it is a risk signal's that knows nothing of the operator's block held here
///   ([`BlockRecord::unaware_of`]: Redis lost the operator's, and the signal's, once applied
///   everywhere, would end the operator's block on every replica within minutes);
/// - when it is a block older than a lift known here ([`Lifts`]), but for a refusal's.
fn apply_block(
    state: &RiskState,
    lifts: &Lifts,
    field: &str,
    record: &BlockRecord,
    stamp: Option<i64>,
    now: i64,
    from: Source,
) -> Option<Put> {
    if !record.removed
        && let Err(error) =
            blocks::check_record(&record.reason_id, &record.reason, &record.created_by)
    {
        ignored("a block from the risk store", &error);
        return None;
    }
    let Some((kind, value)) = parse_block_field(field) else {
        ignored("a block in the risk store", "of an unknown kind");
        return None;
    };
    // No replica writes a block ending more than the admin API's longest time after it was
    // made, nor one made ahead of this replica's clock by more than a clock may be: one that is
    // (written into the store by hand) would never end, its end brought back to a bound that
    // moves on at every resync. Ignored, as such a revocation is.
    let ahead = revocations::MAX_CLOCK_AHEAD_SECONDS;
    if !record.removed
        && (record.expires_at > record.created_at.saturating_add(MAX_TTL_SECONDS + ahead)
            || record.created_at > now.saturating_add(ahead))
    {
        ignored(
            "a block from the risk store",
            "it ends further ahead than a replica's block may",
        );
        return None;
    }
    // When it was written: the write's own time, but the store's stamp is later than that when
    // the script gave a held-up operator's write the stored record's time (`operator_at` then
    // holds the write's own; a signal's record keeps there the time of the operator's write it
    // replaced instead).
    let by_signal = record.created_by.starts_with(blocks::RISK_CREATOR_PREFIX);
    let operator_at = record
        .operator_at
        .as_ref()
        .and_then(serde_json::Number::as_i64)
        .filter(|_| !by_signal);
    let written = match (stamp, operator_at) {
        (Some(stamp), Some(at)) => Some(stamp.min(at)),
        (stamp, _) => stamp,
    };
    let second_ms = record.created_at.saturating_mul(1000);
    // Known to the millisecond: not a second's first millisecond, which a write made here is
    // never stamped at (`write_time`).
    let exact = written.filter(|written| *written != second_ms);
    let here = state.blocks().get(kind, value, now);
    if let Some(here) = &here {
        let here_written = lifts.block_written(field, here.created_at);
        // Older than the block here: by their times in ms when both are known to the
        // millisecond, else by their seconds.
        let older = match (exact, here_written) {
            (Some(written), Some(here_written)) => written < here_written.at_ms,
            _ => record.created_at < here.created_at,
        };
        let kept = match from {
            Source::Resync => older || record.unaware_of(here),
            Source::Message => record.unaware_of(here),
            Source::Eviction | Source::Refusal => false,
        };
        if kept {
            return Some(block_put(field.to_owned(), here, here_written));
        }
    }
    if record.removed {
        let at_ms = written.unwrap_or(second_ms);
        let until = record.expires_at;
        // An eviction, however it arrives (its message, a resync's read, a read back): signed
        // by the signal whose block it names. No operator's lift: an operator's block made
        // before it but arriving after it must not be refused as older than a lift.
        let eviction =
            from == Source::Eviction || record.created_by.starts_with(blocks::RISK_CREATOR_PREFIX);
        if eviction {
            lifts.blocked(field, None, 0, now);
        } else {
            lifts.lifted(field, Lift { at_ms, until }, now);
        }
        // Most lifts in the store are of blocks this replica does not hold: looked up under the
        // read lock, not removed under the write lock the request path waits on. Such a lift
        // holds a signal off here all the same (`RiskState::crossed`): this replica may hold the
        // counts of before it.
        if here.is_some() {
            let _ = state.blocks().remove(kind, value, now);
        } else if !eviction {
            state
                .blocks()
                .note_lifted(kind, value, record.created_at, now);
        }
        return None;
    }
    // A block whose time is only its second's (from a version that wrote blocks back at that,
    // or a message without its time) is taken as of the second's end against a lift: of a lift
    // and such a block of one second, the block is taken as the newer (fail closed). Its time
    // is not kept: it is no more than its second, and is written back as such.
    let block_ms = exact.unwrap_or(second_ms.saturating_add(999));
    if from != Source::Refusal
        && let Some(lift) = lifts.newer_than(field, block_ms, now)
    {
        return Some(lift_put(field.to_owned(), lift));
    }
    let written = exact.map(|at_ms| BlockWritten {
        at_ms,
        created_at: record.created_at,
        until: record.expires_at,
        operator_at: stored_operator_at(record, now).filter(|_| by_signal),
    });
    lifts.blocked(field, written, record.expires_at, now);
    let block = Block {
        kind,
        value: value.to_owned(),
        reason_id: Arc::from(record.reason_id.as_str()),
        reason: record.reason.clone(),
        created_at: record.created_at,
        expires_at: record.expires_at,
        created_by: record.created_by.clone(),
    };
    let unchanged = here.is_some_and(|b| *b == block);
    if !unchanged && let Err(err) = state.apply_stored_block(block, now) {
        unapplied("a block from the risk store", &err.to_string());
    }
    None
}

/// Applies a revocation the store holds; whether it is one a replica could have written (and not
/// ignored).
fn apply_revocation(state: &RiskState, subject: &str, record: &RevocationRecord, now: i64) -> bool {
    if let Err(error) = blocks::check_record(&record.reason_id, &record.reason, &record.created_by)
    {
        ignored("a revocation from the risk store", &error);
        return false;
    }
    // No replica writes a revocation further ahead of its own clock than the admin API admits,
    // nor one made ahead of this replica's clock by more than that: one that is (written into
    // the store by hand) would refuse the sign-ins of years to come. Ignored rather than
    // brought back to a bound, which would move on at every resync.
    let ahead = revocations::MAX_CLOCK_AHEAD_SECONDS;
    if record.before > record.created_at.saturating_add(ahead)
        || record.created_at > now.saturating_add(ahead)
    {
        ignored(
            "a revocation from the risk store",
            "its time is further ahead than a replica's clock allows",
        );
        return false;
    }
    let revocation = Revocation {
        subject: subject.to_owned(),
        before: record.before,
        reason_id: Arc::from(record.reason_id.as_str()),
        reason: record.reason.clone(),
        created_at: record.created_at,
        created_by: record.created_by.clone(),
    };
    if let Err(err) = state.revocations().set(revocation, now) {
        unapplied("a revocation from the risk store", &err.to_string());
    }
    true
}

async fn load(conn: &mut MultiplexedConnection, script: &str) -> Result<String, Ended> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(script)
        .query_async(conn)
        .await
        .map_err(|e| Ended::redis("loading a script", &e))
}

/// `"<ms>|<json>"` → the record, read exactly as the write script reads it ([`PUT`]): a stamp
/// of digits no further ahead of `now` than a replica's clock may be, and a JSON object (serde
/// would take an array for a struct too). A stored value the script would write over as absent
/// must not be one the replicas apply, or a signal's short block would replace an operator's
/// long one.
fn parse_stored<T: for<'de> Deserialize<'de>>(stored: &str, now: i64) -> Option<T> {
    parse_stamped(stored, now).map(|(_, record)| record)
}

/// [`parse_stored`], with the stamp: (the write time in ms, the record).
fn parse_stamped<T: for<'de> Deserialize<'de>>(stored: &str, now: i64) -> Option<(i64, T)> {
    let (stamp, json) = stored.split_once('|')?;
    let stamp: i64 = stamp
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| stamp.parse().ok())
        .flatten()?;
    let ahead = now.saturating_add(revocations::MAX_CLOCK_AHEAD_SECONDS);
    if stamp > ahead.saturating_mul(1000) {
        return None;
    }
    Some((stamp, record(json)?))
}

/// Whether a stored value that reads as a record is stamped further ahead of this replica's
/// clock than a replica's clock may be (5 minutes), though by less than a day: most likely
/// written by a replica whose clock is that far ahead. Ignored all the same ([`parse_stored`],
/// [`PUT`]), but said as what it most likely is, with what to do about it.
fn stamped_ahead(stored: &str, now: i64) -> bool {
    let Some((stamp, json)) = stored.split_once('|') else {
        return false;
    };
    let Ok(stamp) = stamp.parse::<i64>() else {
        return false;
    };
    let seconds = stamp / 1000 - now;
    seconds > revocations::MAX_CLOCK_AHEAD_SECONDS
        && seconds <= 24 * 3600
        && record::<serde_json::Map<String, serde_json::Value>>(json).is_some()
}

/// Says, at most every 10 s, that a record was ignored as stamped ahead of this clock.
fn skewed(what: &str) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    warn_throttled(
        &WARNINGS,
        what,
        "stamped more than 5 minutes ahead of this replica's clock",
        "ignored what the Redis risk store holds until this clock catches up: another replica's \
         clock is ahead of this one's by more than the 5 minutes replicas may differ by, so \
         blocks and revocations it writes are not enforced here meanwhile; synchronise the \
         replicas' clocks (NTP)",
    );
}

/// A record's JSON: an object, as the write script reads it.
fn record<T: for<'de> Deserialize<'de>>(json: &str) -> Option<T> {
    json.trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str(json).ok())
        .flatten()
}

fn block_field(kind: Kind, value: &str) -> String {
    format!("{}|{value}", kind.as_str())
}

fn parse_block_field(field: &str) -> Option<(Kind, &str)> {
    let (kind, value) = field.split_once('|')?;
    let kind = [
        Kind::Subject,
        Kind::Tenant,
        Kind::ClientId,
        Kind::Token,
        Kind::TokenId,
        Kind::Source,
    ]
    .into_iter()
    .find(|k| k.as_str() == kind)?;
    Some((kind, value))
}

fn clamp(n: i64) -> u32 {
    n.clamp(0, i64::from(u32::MAX)) as u32
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The time in ms of a write made here: never a second's first millisecond, which a stored
/// stamp holds only when its writer knew no more than the second (a block written back by a
/// version before the blocks' write times were kept).
fn write_time() -> i64 {
    let at = now_ms();
    if at.rem_euclid(1000) == 0 { at + 1 } else { at }
}

/// A random name for this replica, to recognise its own messages.
fn replica_id() -> String {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No replica writes a revocation further ahead of its clock than the admin API admits: one
    /// found in the store (written there by hand) is ignored, at every resync (a bound moving
    /// with the clock would refuse every later sign-in), and a time at the end of the range is
    /// no overflow. One a replica writes, a few minutes ahead at most, is applied.
    #[test]
    fn a_stored_revocation_past_the_clock_bound_is_ignored() {
        let now = 1_800_000_000;
        let ahead = revocations::MAX_CLOCK_AHEAD_SECONDS;
        let record = |before, created_at| RevocationRecord {
            before,
            reason_id: "INC-1".into(),
            reason: String::new(),
            created_at,
            created_by: "san:ops".into(),
        };
        for (before, created_at) in [
            (now + 10 * 365 * 86_400, now),
            (i64::MAX, now),
            (now + 10 * 365 * 86_400, now + 10 * 365 * 86_400),
            (i64::MAX, i64::MAX),
        ] {
            let state = RiskState::default();
            for resync in 0..120 {
                apply_revocation(
                    &state,
                    "alice",
                    &record(before, created_at),
                    now + resync * 30,
                );
            }
            assert!(
                state
                    .revocations()
                    .revoking("alice", Some(now - 1), now)
                    .is_none(),
                "ignored: {before} {created_at}"
            );
        }
        for (before, created_at) in [(now - 10, now - 10), (now + ahead, now), (now, now + ahead)] {
            let state = RiskState::default();
            apply_revocation(&state, "alice", &record(before, created_at), now);
            let revocations = state.revocations();
            assert!(
                revocations
                    .revoking("alice", Some(before - 1), now)
                    .is_some()
            );
            assert!(revocations.revoking("alice", Some(before), now).is_none());
        }
    }

    /// The same for a block: one that ends further after it was made than the admin API's
    /// longest block, or made ahead of the clock, is ignored at every resync (its end brought
    /// back to now + 90 days at each would never come); one a replica writes is applied, and
    /// ends when it says.
    #[test]
    fn a_stored_block_past_the_clock_bound_is_ignored() {
        let now = 1_800_000_000;
        let ahead = revocations::MAX_CLOCK_AHEAD_SECONDS;
        let field = block_field(Kind::Subject, "alice");
        let record = |created_at, expires_at| BlockRecord {
            removed: false,
            reason_id: "INC-1".into(),
            reason: String::new(),
            created_at,
            expires_at,
            created_by: "san:ops".into(),
            operator_at: None,
            evicted_created_at: None,
        };
        for (created_at, expires_at) in [
            (now, now + 10 * 365 * 86_400),
            (now, i64::MAX),
            (0, now + 86_400),
            (now + 10 * 365 * 86_400, now + 10 * 365 * 86_400 + 60),
            (i64::MAX, i64::MAX),
        ] {
            let state = RiskState::default();
            for resync in 0..120 {
                apply_block(
                    &state,
                    &Lifts::default(),
                    &field,
                    &record(created_at, expires_at),
                    None,
                    now + resync * 30,
                    Source::Resync,
                );
            }
            assert!(
                state.blocks().get(Kind::Subject, "alice", now).is_none(),
                "ignored: {created_at} {expires_at}"
            );
        }
        for (created_at, expires_at) in [
            (now - 10, now + 60),
            (now, now + MAX_TTL_SECONDS + ahead),
            (now + ahead, now + ahead + 60),
        ] {
            let state = RiskState::default();
            apply_block(
                &state,
                &Lifts::default(),
                &field,
                &record(created_at, expires_at),
                None,
                now,
                Source::Resync,
            );
            let blocks = state.blocks();
            assert!(blocks.get(Kind::Subject, "alice", expires_at - 1).is_some());
            assert!(blocks.get(Kind::Subject, "alice", expires_at).is_none());
        }
    }

    #[test]
    fn block_fields_round_trip() {
        for kind in [Kind::Subject, Kind::Source, Kind::TokenId] {
            let field = block_field(kind, "a|b");
            assert_eq!(parse_block_field(&field), Some((kind, "a|b")));
        }
        assert_eq!(parse_block_field("nonsense|x"), None);
    }

    #[test]
    fn stored_records_parse_after_their_time_prefix() {
        let now = 1_700_000_000;
        let r: BlockRecord =
            parse_stored(r#"1700000000000|{"removed":true,"expires_at":5}"#, now).unwrap();
        assert!(r.removed && r.expires_at == 5);
        assert!(parse_stored::<BlockRecord>("no-prefix", now).is_none());
    }

    /// What the write script writes over as absent, the replicas do not apply: a stamp that is
    /// not digits or is stamped further ahead than a clock may be, and a record that is no JSON
    /// object (serde reads a struct from an array too). Before, each was applied as a block in
    /// force while the script let a signal's minute replace it.
    #[test]
    fn a_stored_value_the_script_reads_as_absent_is_not_applied() {
        let now = 1_800_000_000;
        let body = r#"{"reason_id":"INC-1","created_at":1799999990,"expires_at":1802592000,"created_by":"san:ops"}"#;
        let array = r#"[false,"INC-1","",1799999990,1802592000,"san:ops"]"#;
        let ok = format!("{}|{body}", now * 1000);
        assert!(parse_stored::<BlockRecord>(&ok, now).is_some());
        let ahead = revocations::MAX_CLOCK_AHEAD_SECONDS;
        for stored in [
            format!("x|{body}"),
            format!("|{body}"),
            format!("-1|{body}"),
            format!("+1|{body}"),
            format!("99999999999999999999|{body}"),
            format!("{}|{body}", (now + ahead + 1) * 1000),
            format!("{}|{array}", now * 1000),
        ] {
            assert!(
                parse_stored::<BlockRecord>(&stored, now).is_none(),
                "{stored}"
            );
        }
        assert!(record::<BlockRecord>(array).is_none());
        assert!(record::<BlockRecord>(body).is_some());
    }

    /// A signal's block the store holds replaces an operator's block here only when it knows of
    /// an operator's write as new as that block (a lift this replica missed, which the signal's
    /// block was written over); one that knows of none (Redis lost the operator's) is kept out,
    /// and the operator's block written back.
    #[test]
    fn a_signals_stored_block_replaces_an_operators_only_past_a_newer_operators_write() {
        let now = 1_800_000_000;
        let operators = Block {
            kind: Kind::Subject,
            value: "mallory".into(),
            reason_id: Arc::from("INC-1"),
            reason: String::new(),
            created_at: now - 600,
            expires_at: now + 3600,
            created_by: "san:ops".into(),
        };
        let field = block_field(Kind::Subject, "mallory");
        let signals = |operator_at: Option<i64>| {
            let mut record = serde_json::json!({
                "reason_id": "risk.x", "created_at": now, "expires_at": now + 60,
                "created_by": "risk:x",
            });
            if let Some(at) = operator_at {
                record["operator_at"] = at.into();
            }
            format!("{}|{record}", now * 1000)
        };
        for (operator_at, replaced) in [
            (None, false),
            (Some((now - 601) * 1000), false),
            // Within the block's own second: which came first is not known, and the block is
            // kept (fail closed).
            (Some((now - 600) * 1000 + 999), false),
            (Some((now - 599) * 1000), true),
            (Some((now - 60) * 1000), true),
        ] {
            let state = RiskState::default();
            state.set_block(operators.clone(), now).unwrap();
            let stored = HashMap::from([(field.clone(), signals(operator_at))]);
            let missing = reconcile(
                &state,
                &stored,
                &HashMap::new(),
                now,
                &|_| false,
                &Changed::default(),
            )
            .contested;
            let here = state.blocks().get(Kind::Subject, "mallory", now).unwrap();
            assert_eq!(here.created_by == "risk:x", replaced, "{operator_at:?}");
            let written_back: Vec<_> = missing.iter().map(|p| p.precedence).collect();
            let expected = if replaced {
                vec![]
            } else {
                vec![Precedence::Operator(now + 3600)]
            };
            assert_eq!(written_back, expected, "{operator_at:?}");
        }
    }

    /// A revocation the store holds that no replica applies (ahead of the clock) is no
    /// revocation: the one held here is written back over it, as where the store has none; one
    /// that covers less than the one held here is written over too; one that covers as much is
    /// left.
    #[test]
    fn a_revocation_held_here_is_written_over_one_no_replica_applies_or_covering_less() {
        let now = 1_800_000_000;
        let state = RiskState::default();
        let revocation = Revocation {
            subject: "erin".into(),
            before: now - 60,
            reason_id: Arc::from("INC-9"),
            reason: String::new(),
            created_at: now - 60,
            created_by: "san:ops".into(),
        };
        state.revocations().set(revocation, now).unwrap();
        let stored = |before: i64, created_at: i64| {
            let record = serde_json::json!({
                "before": before, "reason_id": "INC-9", "reason": "",
                "created_at": created_at, "created_by": "san:ops",
            });
            HashMap::from([("erin".to_owned(), format!("{}|{record}", created_at * 1000))])
        };
        for (store, missing, contested) in [
            (stored(now + 86_400, now), 1, 0),
            (stored(now - 3600, now - 30), 0, 1),
            (stored(now - 60, now - 30), 0, 0),
            (HashMap::new(), 1, 0),
        ] {
            let blocks = HashMap::new();
            let r = reconcile(
                &state,
                &blocks,
                &store,
                now,
                &|_| false,
                &Changed::default(),
            );
            assert_eq!(
                (r.missing.len(), r.contested.len()),
                (missing, contested),
                "{store:?}"
            );
        }
    }

    /// What a resync makes of `blocks` (no revocations), nothing changed here since the read.
    fn resync_blocks(
        state: &RiskState,
        blocks: &HashMap<String, String>,
        now: i64,
        changed: &Changed,
    ) -> Reconciled {
        reconcile(state, blocks, &HashMap::new(), now, &|_| false, changed)
    }

    /// A hash as a resync reads it, holding `record` at `field`, written at `at_ms`.
    fn stored_at(field: &str, at_ms: i64, record: &impl Serialize) -> HashMap<String, String> {
        let json = serde_json::to_string(record).unwrap();
        HashMap::from([(field.to_owned(), format!("{at_ms}|{json}"))])
    }

    /// A block older than a lift known here, from a resync (by its stamp) or a message (by its
    /// creation's second: one of the lift's own second is taken as newer), is not applied: the
    /// lift is written back instead. A newer block is applied and the lift forgotten; the block
    /// the store answers a refused write with always applies. A lift the store lacks is written
    /// back, until the block lifted would have ended.
    #[test]
    fn an_eviction_read_from_the_store_is_no_operators_lift() {
        let now = 1_800_000_000;
        let field = block_field(Kind::Source, "192.0.2.0/24");
        let ms = |ago: i64| (now - ago) * 1000;
        // Another replica's eviction of a signal's block, 10 s ago, read by a resync (not its
        // message, which says so) and read back after a refusal.
        let eviction = BlockRecord {
            reason_id: "risk.x".into(),
            created_by: "risk:x".into(),
            evicted_created_at: Some(now - 60),
            ..lift_record(Lift {
                at_ms: ms(10),
                until: now + 600,
            })
        };
        let operators = BlockRecord {
            removed: false,
            reason_id: "INC-1".into(),
            reason: String::new(),
            created_at: now - 20,
            expires_at: now + 3600,
            created_by: "san:ops".into(),
            operator_at: None,
            evicted_created_at: None,
        };
        for from in [Source::Resync, Source::Refusal, Source::Message] {
            let state = RiskState::default();
            let lifts = Lifts::default();
            apply_block(&state, &lifts, &field, &eviction, Some(ms(10)), now, from);
            assert_eq!(lifts.newer_than(&field, 0, now), None, "{from:?}");
            // An operator's block made before it, arriving after it: applied, not refused as
            // older than a lift.
            let kept = apply_block(&state, &lifts, &field, &operators, Some(ms(20)), now, from);
            assert!(kept.is_none(), "{from:?}");
            assert!(
                state
                    .blocks()
                    .get(Kind::Source, "192.0.2.0/24", now)
                    .is_some(),
                "{from:?}"
            );
        }
    }

    #[test]
    fn a_block_older_than_a_lift_here_is_not_taken_back() {
        let now = 1_800_000_000;
        let field = block_field(Kind::Subject, "mallory");
        let block = |created_at| BlockRecord {
            removed: false,
            reason_id: "INC-1".into(),
            reason: String::new(),
            created_at,
            expires_at: now + 3600,
            created_by: "san:ops".into(),
            operator_at: None,
            evicted_created_at: None,
        };
        let lift = Lift {
            at_ms: (now - 100) * 1000 + 500,
            until: now + 3600,
        };
        for (stamp, from, created_at, applied) in [
            (Some((now - 200) * 1000), Source::Resync, now - 200, false),
            (
                Some((now - 101) * 1000 + 999),
                Source::Resync,
                now - 101,
                false,
            ),
            // Of the lift's own second: written back, a block keeps only its second's start,
            // and is taken as the newer (fail closed).
            (Some((now - 100) * 1000), Source::Resync, now - 100, true),
            (
                Some((now - 100) * 1000 + 501),
                Source::Resync,
                now - 100,
                true,
            ),
            (None, Source::Message, now - 101, false),
            (Some((now - 101) * 1000), Source::Message, now - 101, false),
            (None, Source::Message, now - 100, true),
            (None, Source::Message, now - 50, true),
            (Some((now - 200) * 1000), Source::Refusal, now - 200, true),
        ] {
            let state = RiskState::default();
            let lifts = Lifts::default();
            lifts.lifted(&field, lift, now);
            let record = block(created_at);
            let kept = apply_block(&state, &lifts, &field, &record, stamp, now, from);
            let case = format!("{from:?} {stamp:?} {created_at}");
            let held = state.blocks().get(Kind::Subject, "mallory", now).is_some();
            assert_eq!(held, applied, "{case}");
            assert_eq!(
                kept.map(|p| (p.precedence, p.at_ms, p.field)),
                (!applied).then(|| (Precedence::Lift, lift.at_ms, field.clone())),
                "{case}"
            );
            assert_eq!(lifts.newer_than(&field, 0, now), (!applied).then_some(lift));
        }
        // A held-up operator's write the script gave the stored record's time: its own time,
        // `operator_at`, is what counts. A lift made 150 s ago stored at 100 s ago does not hold
        // off an operator's block made 120 s ago (stored at 100 s ago too); a signal's block
        // keeps there the time of the operator's write it replaced, not its own.
        let ms = |ago: i64| (now - ago) * 1000;
        let lifts = Lifts::default();
        let mut stored_lift = lift_record(Lift {
            at_ms: ms(150),
            until: now + 60,
        });
        stored_lift.operator_at = Some(ms(150).into());
        let state = RiskState::default();
        let resync = Source::Resync;
        apply_block(
            &state,
            &lifts,
            &field,
            &stored_lift,
            Some(ms(100)),
            now,
            resync,
        );
        assert_eq!(
            lifts.newer_than(&field, 0, now).map(|l| l.at_ms),
            Some(ms(150))
        );
        let mut operators = block(now - 120);
        operators.operator_at = Some(ms(120).into());
        let kept = apply_block(
            &state,
            &lifts,
            &field,
            &operators,
            Some(ms(100)),
            now,
            resync,
        );
        assert!(kept.is_none() && state.blocks().get(Kind::Subject, "mallory", now).is_some());
        let lifts = Lifts::default();
        lifts.lifted(&field, lift, now);
        let mut signals = block(now - 50);
        signals.created_by = "risk:x".into();
        signals.operator_at = Some(ms(300).into());
        assert!(apply_block(&state, &lifts, &field, &signals, Some(ms(50)), now, resync).is_none());

        // A block held here, written at .700 of its second: a lift of .500 that second, read
        // from the store, is older, and the block is written back at .700, not at its second's
        // start (which the lift would beat in the store); so where the store lost it.
        let state = RiskState::default();
        let changed = Changed::default();
        let second = now - 10;
        let held = Block {
            kind: Kind::Subject,
            value: "mallory".into(),
            reason_id: Arc::from("INC-4"),
            reason: String::new(),
            created_at: second,
            expires_at: now + 600,
            created_by: "san:ops".into(),
        };
        state.blocks().set(held.clone(), now).unwrap();
        let written = BlockWritten {
            at_ms: second * 1000 + 700,
            created_at: second,
            until: now + 600,
            operator_at: None,
        };
        changed.lifts.blocked(&field, Some(written), now + 600, now);
        let early = lift_record(Lift {
            at_ms: second * 1000 + 500,
            until: now + 600,
        });
        let stored = stored_at(&field, second * 1000 + 500, &early);
        let r = resync_blocks(&state, &stored, now, &changed);
        let written_back: Vec<_> = r.contested.iter().map(|p| p.at_ms).collect();
        assert_eq!(written_back, vec![second * 1000 + 700]);
        assert!(state.blocks().get(Kind::Subject, "mallory", now).is_some());
        let r = resync_blocks(&state, &HashMap::new(), now, &changed);
        let written_back: Vec<_> = r.missing.iter().map(|p| p.at_ms).collect();
        assert_eq!(written_back, vec![second * 1000 + 700]);

        // A block known only to its second (stamped at its start: written back by a version
        // that knew no more) is applied, but its time is not kept as the end of the second, nor
        // taken as older than itself at the next read: nothing is written back over it.
        let state = RiskState::default();
        let changed = Changed::default();
        let stored = stored_at(&field, second * 1000, &BlockRecord::of(&held));
        for _ in 0..2 {
            let r = resync_blocks(&state, &stored, now, &changed);
            assert!(r.contested.is_empty() && r.missing.is_empty());
            assert!(state.blocks().get(Kind::Subject, "mallory", now).is_some());
            assert_eq!(changed.lifts.block_written(&field, second), None);
        }

        // Another replica's eviction of a signal's block is applied, but is no lift to keep.
        let lifts = Lifts::default();
        let evicted = lift_record(lift);
        let from = Source::Eviction;
        apply_block(
            &state,
            &lifts,
            &field,
            &evicted,
            Some(lift.at_ms),
            now,
            from,
        );
        assert_eq!(lifts.newer_than(&field, 0, now), None);
        assert!(state.blocks().get(Kind::Subject, "mallory", now).is_none());

        // A lift of a block this replica does not hold still holds a signal off here, from the
        // lift's time; an eviction does not.
        let state = RiskState::default();
        let lifted = lift_record(Lift {
            at_ms: (now - 30) * 1000,
            until: now + 600,
        });
        let from = Source::Message;
        apply_block(&state, &Lifts::default(), &field, &lifted, None, now, from);
        assert_eq!(
            state.blocks().lifted_at(Kind::Subject, "mallory"),
            Some(now - 30)
        );
        let other = block_field(Kind::Subject, "nina");
        let from = Source::Eviction;
        apply_block(&state, &Lifts::default(), &other, &lifted, None, now, from);
        assert_eq!(state.blocks().lifted_at(Kind::Subject, "nina"), None);

        // A newer block that ends before the lift would have is applied, and the lift kept: once
        // the block ends and the store forgets it, the lift is written back. One that outlasts
        // the lift ends it.
        let lifts = Lifts::default();
        lifts.lifted(&field, lift, now);
        lifts.blocked(&field, None, lift.until - 1, now);
        assert_eq!(lifts.newer_than(&field, 0, now), Some(lift));
        lifts.blocked(&field, None, lift.until, now);
        assert_eq!(lifts.newer_than(&field, 0, now), None);

        // A stored lift newer than the one known here replaces it; an older one does not.
        let lifts = Lifts::default();
        lifts.lifted(&field, lift, now);
        let newer = Lift {
            at_ms: lift.at_ms + 1,
            until: now + 60,
        };
        lifts.lifted(&field, newer, now);
        lifts.lifted(&field, lift, now);
        assert_eq!(lifts.newer_than(&field, 0, now), Some(newer));
        // Missing from the store: written back while the block would have lasted.
        let state = RiskState::default();
        let changed = Changed::default();
        changed.lifts.lifted(&field, lift, now);
        let missing = |now| {
            resync_blocks(&state, &HashMap::new(), now, &changed)
                .missing
                .into_iter()
                .map(|p| (p.precedence, p.at_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(missing(now), vec![(Precedence::Lift, lift.at_ms)]);
        assert_eq!(missing(now + 3600), vec![]);
        assert!(changed.lifts.live(now).is_empty(), "forgotten once over");
    }

    /// A resync's snapshot read before a block changed here reached the store (or a message
    /// delayed past it) holds an older record: an old lift does not remove the block set since,
    /// an older block does not shorten it; the change's own write decides in the store. A block
    /// held here that is newer than the store's record, and not changed since the store was
    /// read (Redis lost its write: restarted from an older snapshot, failed over to a replica
    /// behind), is written back, and the store's record applied only if the write is refused.
    #[test]
    fn a_record_older_than_the_block_here_does_not_undo_it() {
        let now = 1_800_000_000;
        let block = |by: &str, expires_at| Block {
            kind: Kind::Subject,
            value: "mallory".into(),
            reason_id: Arc::from("INC-2"),
            reason: String::new(),
            created_at: now,
            expires_at,
            created_by: by.into(),
        };
        let field = block_field(Kind::Subject, "mallory");
        let lift = serde_json::json!({
            "removed": true, "created_at": now - 600, "expires_at": now + 3000,
        });
        let older = serde_json::json!({
            "reason_id": "INC-1", "created_at": now - 600, "expires_at": now + 600,
            "created_by": "san:ops",
        });
        for (here, stored) in [
            (block("san:ops", now + 86_400), &lift),
            (block("risk:x", now + 60), &lift),
            (block("san:ops", now + 86_400), &older),
        ] {
            let snapshot =
                HashMap::from([(field.clone(), format!("{}|{stored}", (now - 600) * 1000))]);
            for changed_since in [true, false] {
                let state = RiskState::default();
                state.set_block(here.clone(), now).unwrap();
                let reconciled = reconcile(
                    &state,
                    &snapshot,
                    &HashMap::new(),
                    now,
                    &|f| changed_since && f == field,
                    &Changed::default(),
                );
                let after = state.blocks().get(Kind::Subject, "mallory", now);
                assert_eq!(after.as_deref(), Some(&here), "{stored}");
                // Written back unless changed since (its own write is on its way).
                assert_eq!(reconciled.contested.len(), usize::from(!changed_since));
                // The store refusing the write, what it holds applies.
                for _ in &reconciled.contested {
                    let record = parse_stored::<BlockRecord>(&snapshot[&field], now).unwrap();
                    let lifts = Lifts::default();
                    apply_block(&state, &lifts, &field, &record, None, now, Source::Refusal);
                    let after = state.blocks().get(Kind::Subject, "mallory", now);
                    assert_ne!(after.as_deref(), Some(&here), "{stored}");
                }
            }
        }
        // A newer record than the block here is the store's word.
        let newer = serde_json::json!({
            "removed": true, "created_at": now + 1, "expires_at": now + 3000,
        });
        let state = RiskState::default();
        state
            .set_block(block("san:ops", now + 86_400), now)
            .unwrap();
        let snapshot = HashMap::from([(field.clone(), format!("{}|{newer}", (now + 1) * 1000))]);
        let reconciled = reconcile(
            &state,
            &snapshot,
            &HashMap::new(),
            now + 1,
            &|_| false,
            &Changed::default(),
        );
        assert!(reconciled.contested.is_empty());
        assert!(
            state
                .blocks()
                .get(Kind::Subject, "mallory", now + 1)
                .is_none()
        );
        // What a change here notes, for a while.
        let changed = Changed::default();
        let before = Instant::now();
        assert!(!changed.since(&field, before));
        Changed::note(&mut changed.lock(), &field, 1);
        assert!(changed.since(&field, before));
        assert!(!changed.since(&field, Instant::now() + Duration::from_millis(1)));
        assert!(
            changed.out(&field),
            "its write is out until echoed or refused"
        );
        // A new subscription: what was sent before is never echoed; what waits to be sent is.
        Changed::all_back(&mut changed.lock(), std::iter::empty());
        assert!(!changed.out(&field));
        let waiting = |id| Put {
            hash: Hash::Blocks,
            field: field.clone(),
            at_ms: 0,
            record: String::new(),
            precedence: Precedence::Lift,
            id,
        };
        Changed::all_back(&mut changed.lock(), [waiting(2), waiting(3)].iter());
        changed.back(&field, 2);
        assert!(
            changed.out(&field),
            "one of the two waiting writes is still out"
        );
        // The late echo of a write sent before (Redis stalled past the session's timeout, then
        // ran it), or of another of its writes' again: not the waiting one's.
        changed.back(&field, 1);
        changed.back(&field, 2);
        assert!(changed.out(&field));
        changed.back(&field, 3);
        assert!(!changed.out(&field));
    }

    /// A record stamped a little further ahead than replicas' clocks may differ by is ignored,
    /// and said to be what it most likely is: another replica's clock running ahead.
    #[test]
    fn a_record_stamped_minutes_ahead_is_said_to_be_a_clock_ahead() {
        let now = 1_800_000_000;
        let json = r#"{"reason_id":"INC-1","created_at":1800000000,"expires_at":1800003600}"#;
        for (ahead, read, skewed) in [
            (0, true, false),
            (300, true, false),
            (301, false, true),
            (3600, false, true),
            (2 * 86_400, false, false),
        ] {
            let stored = format!("{}|{json}", (now + ahead) * 1000);
            assert_eq!(
                parse_stored::<BlockRecord>(&stored, now).is_some(),
                read,
                "{ahead}"
            );
            assert_eq!(stamped_ahead(&stored, now), skewed, "{ahead}");
        }
        assert!(!stamped_ahead(
            &format!("{}|not json", (now + 600) * 1000),
            now
        ));
    }

    #[test]
    fn digests_are_hex_of_the_asked_length() {
        let d = crate::identity::sha256_hex("abc", 16);
        assert_eq!(d, "ba7816bf8f01cfea");
    }
}
