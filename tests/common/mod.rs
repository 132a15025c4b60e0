//! Shared by the integration tests: free ports, in-process clusters and an
//! S3 client (the AWS SDK for Rust) that trusts the cluster's CA.

#![allow(dead_code)]

pub mod processes;

use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::Client;
use lumbung::admin::S3Env;
use lumbung::dev::{DevCluster, DevOptions};
use std::net::TcpListener;
use std::path::Path;

/// Sends the cluster's logs to stderr when RUST_LOG is set, to debug a
/// failing test; otherwise does nothing.
pub fn log_if_asked() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// A block of `n` consecutive free ports on loopback.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..500 {
        // Below Linux's ephemeral range (32768 and up), so the cluster's
        // own outgoing connections cannot take a port before it binds.
        let base = 20_000 + (rand_u16() % 12_000);
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == n as usize {
            return base;
        }
    }
    panic!("no block of {n} free ports");
}

fn rand_u16() -> u16 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (t ^ (std::process::id() << 8)) as u16
}

/// What `init_cluster` needs for 3 nodes (RF 3) on loopback in `dir`.
pub fn init_options(dir: &Path, base_port: u16, shards: u32) -> lumbung::admin::InitOptions {
    lumbung::admin::InitOptions {
        nodes: 3,
        dir: dir.to_path_buf(),
        base_port,
        shards,
        replication: 3,
        host: "127.0.0.1".parse().unwrap(),
        node_hosts: vec![],
        public_host: None,
        region: "us-east-1".into(),
    }
}

/// A rustls client trusting `ca`, presenting no certificate.
pub fn tls_client(ca: &Path) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// A raw TLS connection to the gateway of `env` (for HTTP by hand).
pub async fn tls_connect(
    env: &S3Env,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(env.endpoint.trim_start_matches("https://")).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tls_client(&env.ca_cert).connect(name, tcp).await
}

/// Starts a small in-process dev cluster (3 nodes, RF 3) in `dir`.
pub async fn cluster(dir: &Path, shards: u32) -> DevCluster {
    let mut opts = DevOptions::new(dir.join("cluster"), free_ports(4));
    opts.shards = shards;
    lumbung::dev::start(&opts)
        .await
        .expect("dev cluster starts")
}

/// Starts a dev cluster (3 nodes, RF 3) in `dir` whose nodes collect
/// garbage with a grace of `grace_secs`, and only when asked (`Gc::collect`,
/// `admin gc`), never on their own timers.
pub async fn cluster_collecting(dir: &Path, shards: u32, grace_secs: u64) -> DevCluster {
    let dir = dir.join("cluster");
    lumbung::admin::init_cluster(&init_options(&dir, free_ports(4), shards)).unwrap();
    for id in 1..=3 {
        let p = dir.join(format!("node{id}.toml"));
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("grace_secs = 3600", &format!("grace_secs = {grace_secs}"))
            .replace("interval_secs = 900", "interval_secs = 86400");
        std::fs::write(&p, text).unwrap();
    }
    let mut opts = DevOptions::new(dir, 0);
    opts.shards = shards;
    lumbung::dev::start(&opts)
        .await
        .expect("dev cluster starts")
}

/// An S3 client for the credentials in `env`, over TLS with the cluster CA.
pub fn s3(env: &S3Env) -> Client {
    s3_with(env, &env.access_key, &env.secret_key)
}

/// The same endpoint with other credentials.
pub fn s3_with(env: &S3Env, access: &str, secret: &str) -> Client {
    Client::from_conf(s3_config(env, access, secret).build())
}

/// The SDK configuration of [`s3_with`], for tests that change a setting.
pub fn s3_config(env: &S3Env, access: &str, secret: &str) -> aws_sdk_s3::config::Builder {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let pem = std::fs::read(&env.ca_cert).expect("CA readable");
    let tls_context = TlsContext::builder()
        .with_trust_store(TrustStore::empty().with_pem_certificate(pem.as_slice()))
        .build()
        .expect("TLS context");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .tls_context(tls_context)
        .build_https();
    aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .endpoint_url(&env.endpoint)
        .region(Region::new(env.region.clone()))
        .credentials_provider(Credentials::new(access, secret, None, None, "test"))
        .force_path_style(true)
        .http_client(http)
}

/// Deterministic pseudo-random bytes, different for each `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads `key` from `bucket` and fails the test unless it is exactly the
/// bytes `bytes(seed, len)` wrote.
pub async fn assert_reads_back(client: &Client, bucket: &str, key: &str, seed: u64, len: usize) {
    let got = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{key}: {}", code(&e)));
    let body = got.body.collect().await.unwrap().into_bytes();
    assert!(body == bytes(seed, len), "{key} differs");
}

/// Every shard has `rf` voters, none of them in `gone`, and a leader.
pub async fn assert_at_rf(admin: &lumbung::config::AdminConfig, rf: usize, gone: &[u64]) {
    let view = lumbung::admin::status::collect(admin).await.unwrap();
    for s in &view.shards {
        assert_eq!(
            s.voters.len(),
            rf,
            "shard {} voters {:?}",
            s.shard,
            s.voters
        );
        assert!(
            s.voters.iter().all(|v| !gone.contains(v)),
            "shard {} still on {:?}: {:?}",
            s.shard,
            gone,
            s.voters
        );
        assert!(s.leader.is_some(), "shard {} has no leader", s.shard);
    }
}

/// The S3 error code of a failed SDK call, e.g. "NoSuchKey".
pub fn code<E, R>(err: &aws_sdk_s3::error::SdkError<E, R>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::fmt::Debug,
    R: std::fmt::Debug,
{
    match err {
        aws_sdk_s3::error::SdkError::ServiceError(e) => e.err().code().unwrap_or("").to_string(),
        other => format!("not a service error: {other:?}"),
    }
}

/// The HTTP status of a failed SDK call.
pub fn status<E>(
    err: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> u16 {
    err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0)
}

/// The shards whose state on node `id` is behind what the cluster applied.
pub async fn shards_behind(
    admin: &lumbung::config::AdminConfig,
    id: usize,
    view: &lumbung::admin::status::ClusterView,
) -> Vec<u32> {
    let pool = lumbung::rpc::Pool::new(&admin.tls).unwrap();
    let mut client = pool.client(admin.nodes[id - 1]).unwrap();
    let Ok(status) = client.status(lumbung::rpc::pb::Empty {}).await else {
        return vec![u32::MAX];
    };
    let applied: std::collections::HashMap<u32, u64> = status
        .into_inner()
        .shards
        .iter()
        .map(|s| (s.shard, s.last_applied))
        .collect();
    view.shards
        .iter()
        .filter(|s| s.voters.contains(&(id as u64)))
        .filter(|s| applied.get(&s.shard).copied().unwrap_or(0) < s.last_applied)
        .map(|s| s.shard)
        .collect()
}

/// Runs a command that must succeed (`ip`, `mount`, ...); returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
