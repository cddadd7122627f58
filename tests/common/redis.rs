//! A real `redis-server` (Debian package `redis-server`, installed by `scripts/setup-peers`) on a
//! loopback port, without persistence, killed on drop. It can be killed and started again on the
//! same port, as an outage.
#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

/// The `redis-server` binary, or a failure saying how to install it.
pub fn redis_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    let usual = PathBuf::from("/usr/bin/redis-server");
    assert!(
        usual.is_file(),
        "redis-server is not installed: run scripts/setup-peers (it installs the Debian package \
         redis-server), or `apt-get install redis-server`"
    );
    usual
}

impl Redis {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_on(super::envoy::free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let child = Command::new(redis_binary())
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let redis = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether the server answers PING.
    pub fn ping(&self) -> bool {
        self.command("PING\r\n")
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one inline command; the raw reply.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(line.as_bytes()).ok()?;
        let mut buf = [0u8; 64 * 1024];
        let n = stream.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Kills the server at once (SIGKILL: an outage, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One command in Redis's protocol (RESP), whatever its arguments hold.
pub fn resp(args: &[&str]) -> String {
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    out
}

/// The field `field` of stepgate's blocks hash as `redis` holds it: (write time in ms, record).
pub fn stored_block(redis: &Redis, field: &str) -> Option<(i64, serde_json::Value)> {
    let reply = redis.command(&resp(&["HGET", "stepgate:blocks", field]))?;
    // A bulk string: `$<length>\r\n<ms>|<record>\r\n`, or `$-1` when there is none.
    let value = reply.split_once("\r\n")?.1.trim_end_matches("\r\n");
    let (at, record) = value.split_once('|')?;
    Some((at.parse().ok()?, serde_json::from_str(record).ok()?))
}
