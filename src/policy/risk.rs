//! The policy's `risk:` section → [`RiskPolicy`], and the check that every `risk.<name>` a CEL
//! condition reads names a declared signal.

use std::{collections::BTreeMap, sync::Arc};

use super::{AuthContext, Rule, compile::compile_requirement};
use crate::{
    config::{
        ConfigError,
        schema::{
            RiskConfig, SignalActionConfig, SignalEventConfig, SignalKeyConfig, StoreFailureConfig,
        },
    },
    risk::{
        blocks::MAX_TTL_SECONDS,
        counters::MAX_DISTINCT,
        signals::{Action, Event, KeyKind, RiskPolicy, Signal, StoreFailure, StoreSpec},
    },
};

type Result<T> = std::result::Result<T, ConfigError>;

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T> {
    Err(ConfigError::new(path, message))
}

/// Longest window a signal may count over.
const MAX_WINDOW_SECONDS: u64 = 24 * 3600;
/// Bounds on `risk.max_keys`.
const MAX_KEYS: std::ops::RangeInclusive<usize> = 100..=10_000_000;

pub fn compile_risk(
    config: &RiskConfig,
    cel: &Arc<cel::Env>,
    auth_contexts: &BTreeMap<String, AuthContext>,
) -> Result<RiskPolicy> {
    let store = match config.store.as_deref() {
        None => StoreSpec::Memory,
        Some(text) => StoreSpec::parse(text).map_err(|m| ConfigError::new("risk.store", m))?,
    };
    if !MAX_KEYS.contains(&config.max_keys) {
        return err(
            "risk.max_keys",
            format!(
                "must be between {} and {}",
                MAX_KEYS.start(),
                MAX_KEYS.end()
            ),
        );
    }
    let mut signals = Vec::with_capacity(config.signals.len());
    for (name, s) in &config.signals {
        let path = format!("risk.signals.{name}");
        if !is_cel_identifier(name) {
            return err(
                path,
                "a signal's name is what CEL reads as risk.<name>: letters, digits and _, \
                 not starting with a digit, at most 64",
            );
        }
        let event = match s.count {
            SignalEventConfig::Deny => Event::Deny,
            SignalEventConfig::StepUp => Event::StepUp,
            SignalEventConfig::InvalidToken => Event::InvalidToken,
            SignalEventConfig::Sources => Event::Sources,
        };
        let key = match s.key {
            SignalKeyConfig::Subject => KeyKind::Subject,
            SignalKeyConfig::Source => KeyKind::Source,
            SignalKeyConfig::ClientId => KeyKind::ClientId,
            SignalKeyConfig::Tenant => KeyKind::Tenant,
            SignalKeyConfig::Token => KeyKind::Token,
        };
        if event == Event::InvalidToken && key != KeyKind::Source {
            return err(
                format!("{path}.key"),
                "an invalid token's subject, tenant and client are whatever its sender wrote \
                 (counting them would let anyone push a victim over the threshold): count \
                 invalid tokens per source",
            );
        }
        if event == Event::Sources && key == KeyKind::Source {
            return err(
                format!("{path}.key"),
                "`sources` counts the distinct sources of a token or subject: key it by token, \
                 subject, client_id or tenant",
            );
        }
        if s.window.0 == 0 || s.window.0 > MAX_WINDOW_SECONDS {
            return err(format!("{path}.window"), "must be between 1s and 24h");
        }
        let max_threshold = match event {
            Event::Sources => MAX_DISTINCT as u32,
            _ => 1_000_000,
        };
        if s.threshold == 0 || s.threshold > max_threshold {
            return err(
                format!("{path}.threshold"),
                format!("must be between 1 and {max_threshold}"),
            );
        }
        if key != KeyKind::Source
            && event != Event::Sources
            && (s.ipv4_prefix != 32 || s.ipv6_prefix != 64)
        {
            return err(
                format!("{path}.ipv4_prefix"),
                "prefixes group source addresses: only with key: source or count: sources",
            );
        }
        if s.ipv4_prefix == 0 || s.ipv4_prefix > 32 {
            return err(format!("{path}.ipv4_prefix"), "must be between 1 and 32");
        }
        if s.ipv6_prefix == 0 || s.ipv6_prefix > 128 {
            return err(format!("{path}.ipv6_prefix"), "must be between 1 and 128");
        }
        let action = match s.action {
            SignalActionConfig::Log => Action::Log,
            SignalActionConfig::StepUp => {
                let Some(require) = &s.require else {
                    return err(
                        format!("{path}.require"),
                        "action: step_up needs the authentication to ask: auth_contexts, acr, \
                         amr or max_age",
                    );
                };
                let rpath = format!("{path}.require");
                let require = compile_requirement(require, &rpath, cel, auth_contexts)?;
                if !require.scopes.is_empty()
                    || !require.roles.is_empty()
                    || !require.claims.is_empty()
                    || require.when.is_some()
                {
                    return err(
                        rpath,
                        "a risk step-up asks for stronger authentication: auth_contexts, acr, \
                         amr or max_age (scopes, roles, claims and when belong to rules)",
                    );
                }
                if require.is_empty() {
                    return err(rpath, "a risk step-up must require something");
                }
                if !require.amr.is_empty()
                    && require.acr.is_empty()
                    && require.auth_contexts.is_empty()
                {
                    // No challenge asks for a method: a fresh token lacking it would be refused
                    // (`step_up_not_expressible`) on every request while the count lasts, a block
                    // its user cannot lift.
                    return err(
                        format!("{rpath}.amr"),
                        "no challenge can ask for an amr: require the level or the context that \
                         brings the method (acr for RFC 9470 issuers, auth_contexts for Entra ID)",
                    );
                }
                Action::StepUp(Box::new(require))
            }
            SignalActionConfig::Block => {
                let Some(duration) = s.block_for else {
                    return err(
                        format!("{path}.block_for"),
                        "action: block needs how long the key is blocked, e.g. 15m",
                    );
                };
                if duration.0 == 0 || duration.0 as i64 > MAX_TTL_SECONDS {
                    return err(format!("{path}.block_for"), "must be between 1s and 90d");
                }
                Action::Block {
                    seconds: duration.0 as i64,
                }
            }
        };
        if s.require.is_some() && !matches!(action, Action::StepUp(_)) {
            return err(format!("{path}.require"), "only with action: step_up");
        }
        if s.block_for.is_some() && !matches!(action, Action::Block { .. }) {
            return err(format!("{path}.block_for"), "only with action: block");
        }
        signals.push(Signal::new(
            name,
            s.description.clone(),
            event,
            key,
            s.window.0,
            s.threshold,
            action,
            (s.ipv4_prefix, s.ipv6_prefix),
            config.max_keys,
        ));
    }
    Ok(RiskPolicy {
        store,
        on_store_failure: match config.on_store_failure {
            StoreFailureConfig::KeepLast => StoreFailure::KeepLast,
            StoreFailureConfig::FailClosed => StoreFailure::FailClosed,
        },
        max_keys: config.max_keys,
        signals,
    })
}

/// Every two `acr` lists that apply together share a value: a rule's and each of its
/// escalations', each risk signal's step-up with those and with every other signal's. A token
/// carries one `acr`, and each list in force must accept it, so two that share none could never
/// be met. Two escalations of one rule are not compared: their conditions may never hold
/// together. Whatever combination still narrows to nothing is answered
/// `403 step_up_not_expressible` by the engine.
pub fn check_acr_lists(rules: &[Rule], risk: &RiskPolicy) -> Result<()> {
    let signals: Vec<(String, &[String])> = risk
        .signals
        .iter()
        .filter_map(|s| match &s.action {
            Action::StepUp(require) if !require.acr.is_empty() => Some((
                format!("risk.signals.{}.require.acr", s.name),
                require.acr.as_slice(),
            )),
            _ => None,
        })
        .collect();
    let disjoint = |(path, list): &(String, &[String]),
                    (other_path, other): &(String, &[String])| {
        if list.iter().any(|v| other.contains(v)) {
            return Ok(());
        }
        Err(ConfigError::new(
            path.clone(),
            format!(
                "shares no value with {other_path} ({}): a token has one acr, and every list in \
                 force must accept it, so no token could meet both; list the stronger levels \
                 among those the other accepts",
                other.join(", ")
            ),
        ))
    };
    for (n, signal) in signals.iter().enumerate() {
        for other in &signals[..n] {
            disjoint(signal, other)?;
        }
    }
    for (i, rule) in rules.iter().enumerate() {
        let own = (!rule.require.acr.is_empty()).then(|| {
            (
                format!("rules[{i}].require.acr"),
                rule.require.acr.as_slice(),
            )
        });
        let escalations: Vec<(String, &[String])> = rule
            .escalate
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.require.acr.is_empty())
            .map(|(k, e)| {
                (
                    format!("rules[{i}].escalate[{k}].require.acr"),
                    e.require.acr.as_slice(),
                )
            })
            .collect();
        if let Some(own) = &own {
            for escalation in &escalations {
                disjoint(escalation, own)?;
            }
        }
        for list in own.iter().chain(&escalations) {
            for signal in &signals {
                disjoint(list, signal)?;
            }
        }
    }
    Ok(())
}

/// Every `risk.<name>` in the rules' conditions names a signal of `risk`.
pub fn check_risk_reads(rules: &[Rule], risk: &RiskPolicy) -> Result<()> {
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        let mut conditions = Vec::new();
        for (j, m) in rule.matchers.iter().enumerate() {
            let mpath = if rule.matchers.len() == 1 {
                format!("{path}.match.when")
            } else {
                format!("{path}.match[{j}].when")
            };
            conditions.extend(m.when.as_deref().map(|c| (mpath, c)));
        }
        conditions.extend(
            rule.require
                .when
                .as_deref()
                .map(|c| (format!("{path}.require.when"), c)),
        );
        for (k, e) in rule.escalate.iter().enumerate() {
            conditions.push((format!("{path}.escalate[{k}].when"), &e.when));
            conditions.extend(
                e.require
                    .when
                    .as_deref()
                    .map(|c| (format!("{path}.escalate[{k}].require.when"), c)),
            );
        }
        for (cpath, condition) in conditions {
            for name in condition.risk_reads() {
                if risk.signal(&name).is_none() {
                    let declared: Vec<&str> = risk.signals.iter().map(|s| &*s.name).collect();
                    return err(
                        cpath,
                        format!(
                            "risk.{name}: no signal of that name is declared under risk.signals \
                             (declared: {declared:?})"
                        ),
                    );
                }
            }
        }
    }
    Ok(())
}

fn is_cel_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config, policy::compile};

    const BASE: &str = r#"
issuers:
  - id: demo
    issuer: https://idp.example
    jwks_file: keys.json
    audiences: [api://x]
auth_contexts:
  c1: { description: MFA }
  c3: { description: Phishing-resistant MFA }
rules:
  - id: wire
    match: { operation: payments.wire_transfer }
    require: { auth_contexts: [c1] }
    escalate:
      - when: risk.failed_step_ups > 2
        require: { auth_contexts: [c3], max_age: 5m }
risk:
  signals:
    failed_step_ups:
      count: step_up
      key: subject
      window: 10m
      threshold: 5
      action: step_up
      require: { auth_contexts: [c3] }
"#;

    fn compile_text(text: &str) -> std::result::Result<crate::policy::Policy, ConfigError> {
        compile(&config::parse(text)?, Path::new("/etc/stepgate"))
    }

    #[test]
    fn a_risk_section_compiles() {
        let policy = compile_text(BASE).unwrap();
        let signal = policy.risk.signal("failed_step_ups").unwrap();
        assert_eq!((signal.threshold, signal.window_seconds), (5, 600));
        assert!(matches!(&signal.action, Action::StepUp(r) if r.auth_contexts == ["c3"]));
        assert_eq!(policy.risk.store, StoreSpec::Memory);
    }

    #[test]
    fn mistakes_are_refused_with_their_field_path() {
        let cases = [
            (
                "key: subject\n      window",
                "key: tenant\n      window",
                "",
            ),
            (
                "count: step_up",
                "count: invalid_token",
                "risk.signals.failed_step_ups.key",
            ),
            (
                "count: step_up",
                "count: deny\n      ipv4_prefix: 24",
                "risk.signals.failed_step_ups.ipv4_prefix",
            ),
            (
                "window: 10m",
                "window: 2d",
                "risk.signals.failed_step_ups.window",
            ),
            (
                "threshold: 5",
                "threshold: 0",
                "risk.signals.failed_step_ups.threshold",
            ),
            (
                "require: { auth_contexts: [c3] }",
                "require: { scopes: [x] }",
                "risk.signals.failed_step_ups.require",
            ),
            (
                "require: { auth_contexts: [c3] }",
                "require: { auth_contexts: [c9] }",
                "risk.signals.failed_step_ups.require.auth_contexts[0]",
            ),
            (
                "require: { auth_contexts: [c3] }",
                "require: { amr: [mfa], max_age: 5m }",
                "risk.signals.failed_step_ups.require.amr",
            ),
            (
                "      require: { auth_contexts: [c3] }\n",
                "",
                "risk.signals.failed_step_ups.require",
            ),
            (
                "action: step_up",
                "action: block",
                "risk.signals.failed_step_ups.block_for",
            ),
            (
                "failed_step_ups:\n",
                "failed-step-ups:\n",
                "risk.signals.failed-step-ups",
            ),
            (
                "risk.failed_step_ups > 2",
                "risk.failed_stepups > 2",
                "rules[0].escalate[0].when",
            ),
            ("signals:", "store: memcached://x\n  signals:", "risk.store"),
            (
                "threshold: 5",
                "threshold: 5\n      actoin: log",
                "risk.signals.failed_step_ups",
            ),
        ];
        for (from, to, path) in cases {
            let text = BASE.replace(from, to);
            assert_ne!(text, BASE, "{from:?} not in the base policy");
            match compile_text(&text) {
                Ok(_) if path.is_empty() => {}
                Ok(_) => panic!("{to:?} was accepted"),
                Err(e) => assert!(e.path.starts_with(path) && !path.is_empty(), "{to:?}: {e}"),
            }
        }
    }

    #[test]
    fn risk_reads_come_from_the_syntax_tree() {
        let env = crate::policy::condition::environment();
        let reads = |source: &str| {
            crate::policy::condition::Condition::compile(&env, source)
                .unwrap()
                .risk_reads()
        };
        assert_eq!(
            reads("risk.a > 1 && x.risk.b == 'risk.c' || (risk['d_2'] >= 3) || has(risk.e)"),
            ["a", "d_2", "e"]
        );
        assert_eq!(reads("[1, 2].exists(n, risk.f > n)"), ["f"]);
        assert!(reads("claims.risk_level == 'high' && request.path == 'risk.x'").is_empty());
    }

    #[test]
    fn a_reload_keeps_the_counters_of_unchanged_signals() {
        let old = compile_text(BASE).unwrap();
        old.risk.signals[0].table().record("alice", None, 1_000);
        let same = compile_text(&BASE.replace("threshold: 5", "threshold: 7")).unwrap();
        same.risk.inherit(&old.risk);
        assert_eq!(same.risk.signals[0].count("alice", 1_000), 1);
        let other = compile_text(&BASE.replace("window: 10m", "window: 5m")).unwrap();
        other.risk.inherit(&old.risk);
        assert_eq!(other.risk.signals[0].count("alice", 1_000), 0);
    }
}
