//! The benchmark load generator of stepgate (`bench/run` drives it; `bench/README.md` explains the
//! scenarios): gRPC to stepgate, the empty server and Cerbos, HTTP to Envoy. The binary is `src/main.rs`; everything it measures or computes lives here so that
//! the pure parts are unit-tested.

pub mod cerbos;
pub mod grpc;
pub mod http;
pub mod otlp;
pub mod pacing;
pub mod procfs;
pub mod records;
pub mod report;
pub mod rules;
pub mod run;
pub mod scenario;
pub mod stats;
pub mod tokens;
pub mod verify;

use std::time::Duration;

/// `10s`, `500ms`, `2m`, `1.5s`, or a plain number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("expected a duration like 10s, 500ms or 2m, got {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use ms, s or m)"
            ));
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("a duration must be positive, got {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
