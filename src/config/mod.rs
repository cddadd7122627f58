//! Loading the policy file: YAML → [`schema::PolicyFile`], with errors that name the field path.
//!
//! Turning a `PolicyFile` into something that can be served is `policy::compile`; both report
//! problems as a [`ConfigError`], so a user sees `rules[2].require.max_age: …` whichever step failed.

pub mod byte_size;
pub mod duration;
pub mod schema;

use std::{
    fmt,
    io::{self, Read as _},
    path::Path,
};

pub use schema::PolicyFile;

/// A policy that cannot be served, with the field path of the first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Dotted path to the offending field, e.g. `rules[2].require.max_age`; empty for the file itself.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parses policy YAML text.
pub fn parse(text: &str) -> Result<PolicyFile, ConfigError> {
    parse_yaml(text)
}

/// Parses YAML text into `T` (a policy, a test suite), an error naming the field path.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = err.into_inner().to_string();
        // serde_yaml_ng prefixes its own (shorter or equal) path; ours is the precise one.
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if !prefix.is_empty() && path.starts_with(prefix) => {
                rest.to_owned()
            }
            _ => message,
        };
        ConfigError::new(path, message)
    })
}

/// The largest file read (a policy of 100 000 rules is about 27 MB).
pub const MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// The content of the regular file at `path` (through every link), if it holds at most
/// [`MAX_FILE_BYTES`]. Anything else — a FIFO, a socket, a device, a folder, a larger file — is
/// an error, found before a byte is read: opening does not wait for a FIFO's writer.
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    read_file_at_most(path, MAX_FILE_BYTES)
}

/// [`read_file`] with another bound: a file over `max` bytes is refused unread.
pub fn read_file_at_most(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            if max.is_multiple_of(1 << 20) {
                format!("larger than {} MiB", max >> 20)
            } else {
                format!("larger than {} KiB", max >> 10)
            },
        )
    };
    if metadata.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads and parses a policy file.
pub fn load(path: &Path) -> Result<PolicyFile, ConfigError> {
    let cannot = |e: &dyn std::fmt::Display| {
        ConfigError::new("", format!("cannot read {}: {e}", path.display()))
    };
    let bytes = read_file(path).map_err(|e| cannot(&e))?;
    let text = String::from_utf8(bytes).map_err(|_| cannot(&"not UTF-8"))?;
    parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_bound_are_read() {
        let dir = std::env::temp_dir().join(format!("stepgate-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("policy.yaml");
        std::fs::write(&plain, "rules: []\n").unwrap();
        assert_eq!(read_file(&plain).unwrap(), b"rules: []\n");

        // A FIFO with no writer: refused at once rather than waited on.
        let fifo = dir.join("fifo.yaml");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path and a mode; mkfifo reads nothing else.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let refused = read_file(&fifo).unwrap_err();
        assert_eq!(refused.to_string(), "not a regular file");
        assert_eq!(
            read_file(&dir).unwrap_err().to_string(),
            "not a regular file"
        );

        // One byte past the bound (a sparse file: nothing is written).
        let large = dir.join("large.yaml");
        std::fs::File::create(&large)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        assert_eq!(
            read_file(&large).unwrap_err().to_string(),
            "larger than 32 MiB"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const MINIMAL: &str = r#"
issuers:
  - id: demo
    issuer: https://idp.example
    jwks_file: keys.json
    audiences: [api://x]
rules:
  - id: all
    match: { path: "/**" }
"#;

    #[test]
    fn minimal_policy_gets_defaults() {
        let file = parse(MINIMAL).unwrap();
        assert_eq!(file.realm, "stepgate");
        assert_eq!(file.issuers[0].leeway.0, 60);
        assert_eq!(file.issuers[0].algorithms, vec!["RS256"]);
        assert_eq!(file.limits.max_token_bytes, 16 * 1024);
        assert_eq!(file.default, schema::DefaultAction::Deny);
        assert_eq!(file.rules[0].matchers.0.len(), 1);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_path() {
        let text = MINIMAL.replace("match:", "requires: {}\n    match:");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "rules[0].requires");
        assert!(err.message.contains("unknown field `requires`"), "{err}");
    }

    /// A key given twice in one of the policy's maps is refused with its path: YAML readers
    /// differ on which entry holds (serde's map took the last, silently).
    #[test]
    fn a_key_given_twice_in_a_map_is_refused_with_its_path() {
        for (extra, path, key) in [
            (
                "upstream:\n  identity_headers:\n    x-sub: subject\n    x-sub: tenant\n",
                "upstream.identity_headers",
                "x-sub",
            ),
            (
                "auth_contexts:\n  c2: { max_age: 15m }\n  c2: {}\n",
                "auth_contexts",
                "c2",
            ),
            (
                "risk:\n  signals:\n    f: { count: deny, key: subject, window: 1m, threshold: 5 }\n    f: { count: deny, key: subject, window: 1h, threshold: 5 }\n",
                "risk.signals",
                "f",
            ),
        ] {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert_eq!(err.path, path, "{err}");
            assert!(
                err.message.contains(&format!("{key:?} is given twice")),
                "{err}"
            );
        }
        let text = format!("{MINIMAL}    require: {{ claims: {{ tid: a, tid: b }} }}\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "rules[0].require.claims", "{err}");
        // Given once each, they load.
        let once = format!("{MINIMAL}    require: {{ claims: {{ tid: a, dept: b }} }}\n");
        assert!(parse(&once).is_ok());
    }

    #[test]
    fn bad_duration_names_the_field() {
        let text = format!("{MINIMAL}    require: {{ max_age: fifteen }}\n");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "rules[0].require.max_age");
        assert!(err.message.contains("\"fifteen\""), "{err}");
        assert!(
            err.message.starts_with("expected a duration"),
            "the path is not repeated: {err}"
        );
    }

    #[test]
    fn match_accepts_a_list_and_keeps_inner_paths() {
        let text = MINIMAL.replace(
            "match: { path: \"/**\" }",
            "match:\n      - { operation: a }\n      - { methodz: [GET] }",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.path, "rules[0].match[1].methodz");
        assert!(err.message.contains("unknown field `methodz`"), "{err}");
    }

    /// Every file a policy names is read as a regular file of bounded size: a FIFO (or a
    /// device) in a key file's or CA bundle's place is refused at once, naming the field, rather
    /// than stalling the compile (a reload's thread, or the start) or filling the memory.
    #[test]
    fn a_fifo_named_by_the_policy_is_refused_not_read() {
        let dir = std::env::temp_dir().join(format!("stepgate-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("keys.json"), "{\"keys\":[]}").unwrap();
        let fifo = dir.join("named.pipe");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        for (extra, field) in [
            (
                "records:\n  subject_key_file: named.pipe\n",
                "records.subject_key_file",
            ),
            ("", "issuers[0].ca_file"),
        ] {
            let text = if extra.is_empty() {
                MINIMAL.replace(
                    "    jwks_file: keys.json\n",
                    "    jwks_uri: https://idp.example/keys\n    ca_file: named.pipe\n",
                )
            } else {
                format!("{MINIMAL}{extra}")
            };
            let file = parse(&text).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let base = dir.clone();
            std::thread::spawn(move || {
                let _ = tx.send(
                    crate::policy::compile(&file, &base)
                        .err()
                        .map(|e| e.to_string()),
                );
            });
            let answered = rx.recv_timeout(std::time::Duration::from_secs(5));
            if answered.is_err() {
                // Let the stuck reader go before failing.
                let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
            }
            let error = answered
                .unwrap_or_else(|_| panic!("{field}: compiling did not return"))
                .unwrap_or_else(|| panic!("{field}: compiled"));
            assert!(error.contains(field), "{error}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
