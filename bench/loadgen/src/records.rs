//! Decision records for the replay row (`loadgen records`): a week of mixed traffic against a
//! policy (the demo's by default), each request decided by stepgate's own engine and written by
//! its own record formatter, so that the file is exactly what `stepgate serve --records` would
//! have written for that traffic.
//!
//! The mix, per 100 requests: 45 order reads by signed-in users, 10 wire transfers (half through
//! `Decide` with an amount), 10 reads of personal data, 7 customer records, 5 administration
//! calls, 10 health probes, 5 calls without a token, 4 forged and 4 expired tokens. Subjects are
//! drawn skewed towards the first ones (a few users make most requests), with their sessions'
//! authentication strength fixed per subject and their sign-in age drawn per request.

use std::{
    io::Write as _,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use stepgate::{
    decision,
    demo::{self, TokenSpec},
    identity::{Principal, VerifiedToken},
    policy::Policy,
    request::{
        AccessRequest, Door, Established, Headers, HttpAttributes, Peer, PresentedCredential,
    },
    telemetry::records::{RecordsPolicy, format_record},
};

use crate::tokens;

/// 2026-11-23T00:00:00Z: where the recorded week starts.
pub const START: i64 = 1_795_392_000;

/// What a generated file holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordsSummary {
    pub records: u64,
    pub bytes: u64,
    pub allow: u64,
    pub step_up: u64,
    pub deny: u64,
    pub subjects: u64,
}

/// A small deterministic generator (SplitMix64): the same seed gives the same file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The fixed facts of one subject's session.
struct Subject {
    principal: Arc<Principal>,
    capabilities: Arc<[Arc<str>]>,
    issuer: &'static str,
}

fn words(list: &[&str]) -> Arc<[Arc<str>]> {
    list.iter().map(|s| Arc::from(*s)).collect()
}

/// Subject `n`: every fifth an RFC 9470 (OIDC) user, the rest Entra users; two thirds of the Entra
/// users signed in with MFA (`c1`), some on a compliant device (`c2`) or with a phishing-resistant
/// method (`c3`); a few OIDC users are administrators.
fn subject(n: u64) -> Subject {
    let oidc = n.is_multiple_of(5);
    let acrs: &[&str] = match (oidc, n % 6) {
        (true, _) => &[],
        (false, 0 | 3) => &[],
        (false, 1) => &["c1", "c2"],
        (false, 2) => &["c1", "c3"],
        _ => &["c1"],
    };
    let (acr, amr): (Option<&str>, &[&str]) = match (oidc, n % 2) {
        (true, 0) => (Some("urn:okta:loa:2fa:any"), &["pwd", "mfa"]),
        (true, _) => (Some("urn:okta:loa:1fa:any"), &["pwd"]),
        (false, _) if acrs.is_empty() => (None, &["pwd"]),
        (false, _) => (None, &["pwd", "mfa"]),
    };
    let scopes: &[&str] = if n.is_multiple_of(4) {
        &["user_impersonation", "customers.read"]
    } else {
        &["user_impersonation"]
    };
    let roles: &[&str] = if oidc && n.is_multiple_of(10) {
        &["Admin"]
    } else {
        &[]
    };
    let issuer = if oidc { "demo-oidc" } else { "demo-entra" };
    Subject {
        principal: Arc::new(Principal {
            issuer_id: Arc::from(issuer),
            issuer: Arc::from(if oidc {
                demo::DEMO_OIDC_ISSUER
            } else {
                demo::DEMO_ENTRA_ISSUER
            }),
            subject: Arc::from(format!("user-{n}")),
            tenant: (!oidc).then(|| Arc::from("72f988bf-86f1-41af-91ab-2d7cd011db47")),
            client_id: Some(Arc::from(if n.is_multiple_of(3) {
                "mobile"
            } else {
                "web"
            })),
            acrs: words(acrs),
            acr: acr.map(Arc::from),
            amr: words(amr),
            auth_time: None,
            issued_at: None,
            token_id: None,
            claims_challenge_capable: !oidc && !n.is_multiple_of(7),
            scopes: words(scopes),
            roles: words(roles),
            app_only: false,
            expires_at: i64::MAX,
        }),
        capabilities: if !oidc && !n.is_multiple_of(7) {
            words(&["cp1"])
        } else {
            words(&[])
        },
        issuer,
    }
}

/// Writes `count` records decided under `policy` to `out`; `subjects` distinct users.
pub fn generate(
    policy: &Policy,
    keys_dir: &Path,
    out: &Path,
    count: u64,
    subjects: u64,
    seed: u64,
) -> Result<RecordsSummary, String> {
    let mut rng = Rng(seed);
    let entra = |alg, lifetime: i64, now: i64| -> Result<String, String> {
        let spec = TokenSpec {
            lifetime,
            ..TokenSpec::default()
        };
        let (pem, kid) = tokens::demo_key(keys_dir, alg)?;
        demo::sign(&spec.claims(now), &pem, alg, kid)
    };
    let forged = tokens::tamper_signature(&entra(Algorithm::ES256, 30 * 86_400, START)?);
    let expired = entra(Algorithm::ES256, 600, START - 86_400)?;
    let records_policy = RecordsPolicy {
        attributes: vec!["amount".into(), "currency".into()],
        ..RecordsPolicy::default()
    };
    let file =
        std::fs::File::create(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut summary = RecordsSummary::default();
    let mut seen = vec![false; subjects as usize];
    let step_us = (7 * 86_400 * 1_000_000) / count.max(1);
    let people: Vec<Subject> = (0..subjects).map(subject).collect();
    for i in 0..count {
        let at_us = START as u64 * 1_000_000 + i * step_us + rng.below(step_us.max(1));
        let at = (at_us / 1_000_000) as i64;
        // Skewed: the smaller of two draws.
        let who = rng.below(subjects).min(rng.below(subjects));
        let kind = rng.below(100);
        let id = rng.below(1_000_000);
        let mut door = Door::Check;
        let mut signed_in = true;
        let mut request = AccessRequest {
            source: Some(Peer {
                address: format!("203.0.113.{}", who % 250 + 1),
                principal: String::new(),
            }),
            ..AccessRequest::default()
        };
        let http = |method: &str, path: String| {
            Some(HttpAttributes::new(
                method,
                "api.example.com",
                path,
                Headers::default(),
            ))
        };
        match kind {
            0..45 => request.http = http("GET", format!("/api/orders/{id}?expand=items")),
            45..50 => request.http = http("POST", "/payments/wire".into()),
            50..55 => {
                door = Door::Decide;
                request.operation = Some("payments.wire_transfer".into());
                let mut attributes = Map::new();
                attributes.insert("amount".into(), json!((rng.below(400) * 100) as f64));
                attributes.insert("currency".into(), json!("EUR"));
                request.attributes = attributes;
            }
            55..65 => request.http = http("GET", format!("/customers/{id}/pii")),
            65..72 => request.http = http("GET", format!("/customers/{id}")),
            72..77 => {
                door = Door::Decide;
                request.operation = Some("admin.users.update".into());
            }
            77..87 => {
                request.http = http("GET", "/healthz".into());
                signed_in = false;
            }
            87..92 => {
                request.http = http("GET", format!("/api/orders/{id}"));
                signed_in = false;
            }
            92..96 => {
                request.http = http("GET", format!("/api/orders/{id}"));
                request.credential = PresentedCredential::Token(forged.clone());
                signed_in = false;
            }
            _ => {
                request.http = http("GET", format!("/api/orders/{id}"));
                request.credential = PresentedCredential::Token(expired.clone());
                signed_in = false;
            }
        }
        if signed_in {
            let person = &people[who as usize];
            let issuer = policy
                .issuers
                .by_id(person.issuer)
                .ok_or_else(|| format!("the policy has no issuer {}", person.issuer))?;
            // Each user signs in every two hours (at their own offset); every request of the
            // session carries that sign-in time.
            let mut principal = (*person.principal).clone();
            principal.auth_time = Some(at - (at + who as i64 * 7919).rem_euclid(7200) - 30);
            request.credential =
                PresentedCredential::Verified(Established(Arc::new(VerifiedToken {
                    issuer: Arc::clone(issuer),
                    kid: None,
                    key_binding: [0; 32],
                    admin_only: false,
                    principal: Arc::new(principal),
                    client_capabilities: Arc::clone(&person.capabilities),
                    claims: Map::new(),
                    fingerprint_digest: None,
                    certificate_binding: None,
                })));
            seen[who as usize] = true;
        }
        let decision = decision::decide(policy, &request, at);
        match decision.outcome.as_str() {
            "ALLOW" => summary.allow += 1,
            "STEP_UP" => summary.step_up += 1,
            _ => summary.deny += 1,
        }
        let time = UNIX_EPOCH + Duration::from_micros(at_us);
        let line = format_record(&records_policy, door, &request, &decision, time, 1);
        writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("writing {}: {e}", out.display()))?;
        summary.records += 1;
        summary.bytes += line.len() as u64;
    }
    writer
        .flush()
        .map_err(|e| format!("writing {}: {e}", out.display()))?;
    summary.subjects = seen.iter().filter(|s| **s).count() as u64;
    Ok(summary)
}

/// One timed `stepgate replay` (`loadgen replay`): the command's wall time and CPU, its peak RSS,
/// and the counts of its JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRun {
    pub label: String,
    pub title: String,
    pub records: u64,
    pub changed: u64,
    pub wall_seconds: f64,
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    pub records_per_second: f64,
    /// Records per CPU second: the rate on one core whatever else ran beside it.
    pub records_per_cpu_second: f64,
}

/// Runs `command` (a `stepgate replay … --json`), waits for it, and measures it.
pub fn time_replay(label: &str, title: &str, command: &[String]) -> Result<ReplayRun, String> {
    let (program, args) = command
        .split_first()
        .ok_or("no command to time (give it after --)")?;
    let started = SystemTime::now();
    let output = std::process::Command::new(program)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    let wall = started.elapsed().unwrap_or_default().as_secs_f64();
    if !output.status.success() {
        return Err(format!("{program} failed: {}", output.status));
    }
    let usage = children_usage();
    let report: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("{program} did not print a JSON report: {e}"))?;
    let records = report["records"]
        .as_u64()
        .ok_or("the report has no `records` count")?;
    let changed = report["changes"]["total"].as_u64().unwrap_or(0);
    let unreadable = report["unreadable_lines"].as_u64().unwrap_or(0);
    if unreadable > 0 {
        return Err(format!("{unreadable} records were unreadable"));
    }
    Ok(ReplayRun {
        label: label.to_owned(),
        title: title.to_owned(),
        records,
        changed,
        wall_seconds: wall,
        cpu_seconds: usage.0,
        peak_rss_mib: usage.1,
        records_per_second: records as f64 / wall.max(1e-9),
        records_per_cpu_second: records as f64 / usage.0.max(1e-9),
    })
}

/// The CPU seconds (user and system) and the peak RSS (MiB) of the waited-for children.
fn children_usage() -> (f64, f64) {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        seconds(usage.ru_utime) + seconds(usage.ru_stime),
        usage.ru_maxrss as f64 / 1024.0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_policy() -> Policy {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/stepgate.yaml");
        let file = stepgate::config::load(&path).unwrap();
        stepgate::policy::compile(&file, path.parent().unwrap()).unwrap()
    }

    /// The generated records are what the engine answered: replayed under the same policy,
    /// nothing changes, and every outcome of the mix is there.
    #[test]
    fn records_replay_to_their_own_answers() {
        let policy = demo_policy();
        let dir = std::env::temp_dir().join(format!("loadgen-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("records.jsonl");
        let summary = generate(&policy, &tokens::default_keys_dir(), &out, 5_000, 300, 7).unwrap();
        assert_eq!(summary.records, 5_000);
        assert!(
            summary.allow > 0 && summary.step_up > 0 && summary.deny > 0,
            "{summary:?}"
        );
        let mut replayer = stepgate::replay::Replayer::new(&policy, None);
        let file = std::fs::File::open(&out).unwrap();
        replayer
            .feed("records.jsonl", std::io::BufReader::new(file))
            .unwrap();
        let replay = replayer.finish();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(replay.records, 5_000);
        assert_eq!(replay.bad_line_count, 0, "{:?}", replay.bad_lines);
        assert!(replay.changes.is_empty(), "{:?}", replay.changes);
        assert_eq!(replay.overall[1].step_up, summary.step_up);
        assert_eq!(replay.overall[1].deny, summary.deny);
        assert!(
            replay.as_recorded > 0,
            "forged and expired tokens keep their answer"
        );
    }

    /// The same seed writes the same file.
    #[test]
    fn the_seed_fixes_the_file() {
        let policy = demo_policy();
        let dir = std::env::temp_dir().join(format!("loadgen-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, seed| {
            let out = dir.join(name);
            generate(&policy, &tokens::default_keys_dir(), &out, 500, 50, seed).unwrap();
            std::fs::read(out).unwrap()
        };
        let (a, b, c) = (write("a", 3), write("b", 3), write("c", 4));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
