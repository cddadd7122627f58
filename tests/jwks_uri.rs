//! Keys from a `jwks_uri`: a real HTTP server on loopback plays the identity provider, and the real
//! binary fetches its key set at start-up before reporting SERVING.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, TempPolicy, edit, entra, mint};
use http_body_util::Full;
use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use stepgate::api::v1::{
    DecideRequest, decide_request::Credential, decision_service_client::DecisionServiceClient,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A loopback identity provider serving the demo JWKS at `/keys`, or HTTP 503 while `failing`.
struct IdentityProvider {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl IdentityProvider {
    async fn start(failing: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the IdP");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(failing));
        let jwks = Bytes::from(std::fs::read(common::jwks_path()).expect("demo JWKS"));
        let (count, fail) = (Arc::clone(&requests), Arc::clone(&failing));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (count, fail, jwks) = (Arc::clone(&count), Arc::clone(&fail), jwks.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (count, fail, jwks) =
                            (Arc::clone(&count), Arc::clone(&fail), jwks.clone());
                        async move {
                            count.fetch_add(1, Ordering::SeqCst);
                            let response = if fail.load(Ordering::SeqCst) {
                                Response::builder()
                                    .status(503)
                                    .body(Full::new(Bytes::from_static(b"down")))
                            } else if req.uri().path() == "/keys" {
                                Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(jwks))
                            } else {
                                Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::new()))
                            };
                            Ok::<_, hyper::http::Error>(response.unwrap())
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            failing,
        }
    }

    fn policy(&self) -> TempPolicy {
        let text = std::fs::read_to_string(common::demo_policy_path()).unwrap();
        let uri = format!("jwks_uri: http://{}/keys", self.addr);
        let text = edit(&text, "jwks_file: demo-keys/jwks.json", &uri);
        let text = edit(&text, "jwks_file: demo-keys/jwks.json", &uri);
        TempPolicy::new("jwks-uri", &text)
    }
}

async fn decide(server: &Server, token: &str) -> stepgate::api::v1::DecideResponse {
    let mut client = DecisionServiceClient::new(server.channel().await);
    client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: "payments.wire_transfer".to_owned(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_fetched_from_the_jwks_uri_before_serving() {
    let idp = IdentityProvider::start(false).await;
    let policy = idp.policy();
    let server = Server::start(&policy.path).await;
    assert!(
        idp.requests.load(Ordering::SeqCst) >= 2,
        "each issuer fetched its keys before SERVING"
    );
    let response = decide(&server, &mint(&entra(&["c1"], &["cp1"]))).await;
    assert_eq!(response.reason, "allowed", "{response:?}");
    let oidc_token = decide(&server, &mint(&common::oidc(&[], None, &[]))).await;
    assert_eq!(
        oidc_token.rule, "wire-transfer",
        "the oidc issuer's keys came from the same URI"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_provider_down_at_start_means_not_serving_and_every_token_refused() {
    let idp = IdentityProvider::start(true).await;
    let policy = idp.policy();
    let server = Server::spawn(&policy.path);
    let mut health = HealthClient::new(server.channel().await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            Ok(r) => break r.into_inner().status,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("health never answered: {e}\n{}", server.logs_text()),
        }
    };
    assert_eq!(
        status,
        ServingStatus::NotServing as i32,
        "no keys, not ready"
    );
    // Liveness probes ask `liveness`: the process is alive, and restarting it would not bring
    // the identity provider back.
    let liveness = health
        .check(HealthCheckRequest {
            service: "liveness".into(),
        })
        .await
        .expect("health answers for liveness")
        .into_inner()
        .status;
    assert_eq!(liveness, ServingStatus::Serving as i32, "alive");
    let response = decide(&server, &mint(&entra(&["c1"], &["cp1"]))).await;
    assert_eq!(
        response.reason, "unknown_kid",
        "fails closed without keys: {response:?}"
    );
    assert!(idp.failing.load(Ordering::SeqCst));
    assert!(
        server.logs_text().contains("could not load signing keys"),
        "the failed fetch is logged:\n{}",
        server.logs_text()
    );
}
