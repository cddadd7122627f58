//! The serving workers, through the real binary: with `--balance connections` (the default) each
//! connection is given to the worker holding the fewest and served there, every worker answers,
//! and `stepgate_worker_connections` shows the spread; with `--balance calls` one shared runtime
//! serves them all; either way SIGTERM drains every worker and the process exits with success.

mod common;

use std::time::Duration;

use common::{Server, Spawn, check_on, demo_policy_path, entra, mint};

/// Serves the demo with `args` and metrics, ready.
async fn serve(args: &[&str]) -> Server {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: args.iter().map(|a| a.to_string()).collect(),
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    server
}

/// `stepgate_worker_connections`, by worker number.
fn worker_connections(metrics: &str) -> Vec<(usize, i64)> {
    let mut workers: Vec<(usize, i64)> = metrics
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("stepgate_worker_connections{worker=\"")?;
            let (worker, value) = rest.split_once("\"} ")?;
            Some((worker.parse().ok()?, value.trim().parse().ok()?))
        })
        .collect();
    workers.sort_unstable();
    workers
}

/// Polls the metrics until `wanted` holds of the worker gauges (connections close, and are
/// counted, a little after the client drops them); returns the last gauges.
async fn wait_for_workers(
    server: &Server,
    wanted: impl Fn(&[(usize, i64)]) -> bool,
) -> Vec<(usize, i64)> {
    let mut last = Vec::new();
    for _ in 0..100 {
        last = worker_connections(&server.scrape().await);
        if wanted(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// Opens `count` connections and sends one allowed `Check` on each; returns the open channels.
async fn allowed_on_fresh_connections(
    server: &Server,
    count: usize,
) -> Vec<tonic::transport::Channel> {
    let token = mint(&entra(&[], &[]));
    let mut channels = Vec::new();
    for i in 0..count {
        let channel = server.channel().await;
        let (status, ..) = check_on(
            channel.clone(),
            &format!("/api/orders/{i}"),
            "203.0.113.9",
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "connection {i}: ALLOW expected");
        channels.push(channel);
    }
    channels
}

#[tokio::test]
async fn each_connection_goes_to_the_least_loaded_worker_and_every_worker_answers() {
    let server = serve(&["--workers", "3"]).await;
    // The readiness probe's connection closes first, so that the six below are all there is.
    let idle = wait_for_workers(&server, |w| w.iter().all(|&(_, n)| n == 0)).await;
    assert_eq!(
        idle,
        [(0, 0), (1, 0), (2, 0)],
        "one gauge per worker, all idle"
    );

    let channels = allowed_on_fresh_connections(&server, 6).await;
    let spread = worker_connections(&server.scrape().await);
    assert_eq!(
        spread,
        [(0, 2), (1, 2), (2, 2)],
        "six connections, two per worker: each answered its ALLOW on the worker it was given\n{}",
        server.logs_text()
    );

    // A closed connection frees its worker's share: the next one goes there.
    drop(channels);
    let idle = wait_for_workers(&server, |w| w.iter().all(|&(_, n)| n == 0)).await;
    assert_eq!(idle, [(0, 0), (1, 0), (2, 0)], "every connection closed");
    let _channels = allowed_on_fresh_connections(&server, 2).await;
    let spread = worker_connections(&server.scrape().await);
    assert_eq!(spread.iter().map(|&(_, n)| n).sum::<i64>(), 2, "{spread:?}");
    assert!(
        spread.iter().all(|&(_, n)| n <= 1),
        "two connections on two different workers: {spread:?}"
    );
}

#[tokio::test]
async fn with_balance_calls_one_shared_runtime_serves_every_connection() {
    let server = serve(&["--workers", "2", "--balance", "calls"]).await;
    let _channels = allowed_on_fresh_connections(&server, 4).await;
    let gauges = wait_for_workers(&server, |w| w == [(0, 4)]).await;
    assert_eq!(
        gauges,
        [(0, 4)],
        "one queue, the shared runtime's, holds the four connections"
    );
    assert!(
        server.logs_text().contains("\"balance\":\"Calls\""),
        "the start is logged with its balance:\n{}",
        server.logs_text()
    );
}

#[tokio::test]
async fn sigterm_drains_every_worker_and_exits_with_success() {
    let mut server = serve(&["--workers", "3", "--drain-delay", "1s"]).await;
    let channels = allowed_on_fresh_connections(&server, 3).await;
    let spread = worker_connections(&server.scrape().await);
    assert!(spread.iter().all(|&(_, n)| n == 1), "{spread:?}");

    server.signal("TERM");
    // During the drain delay each worker still answers on its open connection.
    let token = mint(&entra(&[], &[]));
    for (i, channel) in channels.iter().enumerate() {
        let (status, ..) = check_on(
            channel.clone(),
            "/api/orders/drain",
            "203.0.113.9",
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "worker of connection {i} during the drain");
    }
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", server.logs_text()));
    assert!(status.success(), "{status:?}\n{}", server.logs_text());
    assert!(
        server.logs_text().contains("stepgate stopped"),
        "{}",
        server.logs_text()
    );
}
