//! The gateway against clients that ask too much, too fast or too slowly:
//! each limit of gateway.toml answers with the S3 error a client expects,
//! and a client that trickles or stalls is cut off.

mod common;

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use common::{code, status};
use lumbung::admin::{init_cluster, S3Env};
use lumbung::config::GatewayConfig;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const MAX_BODY: u64 = 1 << 20;

/// A cluster whose gateway has small limits, so each can be reached.
fn init_strict_cluster(dir: &Path, base_port: u16) {
    init_cluster(&common::init_options(dir, base_port, 4)).unwrap();
    let path = dir.join("gateway.toml");
    let mut cfg: GatewayConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let l = &mut cfg.limits;
    l.tenant_requests_per_sec = 10;
    l.address_requests_per_sec = 50;
    l.max_connections_per_address = 8;
    l.max_header_bytes = 8192;
    l.max_uri_bytes = 1024;
    l.max_body_bytes = MAX_BODY;
    l.header_timeout_secs = 2;
    l.min_body_bytes_per_window = 1000;
    l.body_window_secs = 2;
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
}

/// An SDK client that does not retry, so every refusal is seen.
fn no_retries(env: &S3Env, secret: &str) -> Client {
    Client::from_conf(
        common::s3_config(env, &env.access_key, secret)
            .retry_config(RetryConfig::disabled())
            .build(),
    )
}

/// Everything the server sends until it closes (or 10 s pass), and when
/// it closed, measured from `since`.
async fn read_until_closed(conn: &mut TlsStream<TcpStream>, since: Instant) -> (String, Duration) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = since + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the gateway kept the connection open for 10 s; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), since.elapsed())
}

/// Waits for the token buckets to fill again.
async fn refill() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_limit_answers_with_its_s3_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    init_strict_cluster(&dir, common::free_ports(4));
    let cluster = lumbung::dev::start(&lumbung::dev::DevOptions::new(dir.clone(), 0))
        .await
        .unwrap();
    let env = cluster.env.clone();
    let c = no_retries(&env, &env.secret_key);

    // Body size: up to the limit is fine, one byte more is EntityTooLarge.
    c.put_object()
        .bucket("demo")
        .key("max")
        .body(ByteStream::from(vec![7u8; MAX_BODY as usize]))
        .send()
        .await
        .unwrap();
    let err = c
        .put_object()
        .bucket("demo")
        .key("too-large")
        .body(ByteStream::from(vec![7u8; MAX_BODY as usize + 1]))
        .send()
        .await
        .unwrap_err();
    assert_eq!((status(&err), code(&err).as_str()), (400, "EntityTooLarge"));

    // A request signed 20 minutes in the past.
    let skewed = Client::from_conf(
        common::s3_config(&env, &env.access_key, &env.secret_key)
            .retry_config(RetryConfig::disabled())
            .time_source(aws_smithy_async::time::StaticTimeSource::new(
                std::time::SystemTime::now() - Duration::from_secs(20 * 60),
            ))
            .build(),
    );
    let err = skewed
        .list_objects_v2()
        .bucket("demo")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        (status(&err), code(&err).as_str()),
        (403, "RequestTimeTooSkewed")
    );

    // The tenant's rate: 10 a second, the rest SlowDown.
    refill().await;
    let (mut ok, mut slow) = (0, 0);
    for _ in 0..25 {
        match c.list_objects_v2().bucket("demo").send().await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!((status(&e), code(&e).as_str()), (503, "SlowDown"));
                let msg = e.as_service_error().and_then(|s| s.meta().message());
                assert!(msg.unwrap_or("").contains("tenant"), "{msg:?}");
                slow += 1;
            }
        }
    }
    println!("tenant limit 10/s: {ok} served, {slow} SlowDown");
    assert!(
        (10..=14).contains(&ok) && slow >= 11,
        "{ok} served, {slow} SlowDown"
    );

    // The address's rate applies before any signature is checked, so a
    // flood of badly signed requests is cut short too.
    refill().await;
    let forged = no_retries(&env, "not-the-secret");
    let (mut bad_sig, mut slow) = (0, 0);
    for _ in 0..80 {
        let e = forged
            .list_objects_v2()
            .bucket("demo")
            .send()
            .await
            .unwrap_err();
        match code(&e).as_str() {
            "SignatureDoesNotMatch" => bad_sig += 1,
            "SlowDown" => {
                let msg = e.as_service_error().and_then(|s| s.meta().message());
                assert!(msg.unwrap_or("").contains("address"), "{msg:?}");
                slow += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    println!("address limit 50/s: {bad_sig} refused for their signature, {slow} SlowDown");
    assert!(bad_sig >= 50 && slow >= 20, "{bad_sig} / {slow}");

    // A URI over 1 KiB.
    refill().await;
    let err = c
        .get_object()
        .bucket("demo")
        .key("k".repeat(1100))
        .send()
        .await
        .unwrap_err();
    assert_eq!((status(&err), code(&err).as_str()), (414, "UriTooLong"));

    // Headers over 8 KiB: 431 from the HTTP layer.
    let mut conn = common::tls_connect(&env).await.unwrap();
    let big = format!(
        "GET /demo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}\r\n\r\n",
        "f".repeat(10_000)
    );
    conn.write_all(big.as_bytes()).await.unwrap();
    let (reply, _) = read_until_closed(&mut conn, Instant::now()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");

    // Headers that never finish, and a connection that never sends a
    // byte: both closed after the 2 s header timeout.
    let mut slow_head = common::tls_connect(&env).await.unwrap();
    let mut silent = common::tls_connect(&env).await.unwrap();
    let since = Instant::now();
    slow_head
        .write_all(b"GET /demo HTTP/1.1\r\nHost: 127.")
        .await
        .unwrap();
    let (_, head_closed) = read_until_closed(&mut slow_head, since).await;
    let (_, silent_closed) = read_until_closed(&mut silent, since).await;
    println!("unfinished headers cut off after {head_closed:?}, a silent connection after {silent_closed:?}");
    assert!(head_closed >= Duration::from_millis(1500) && head_closed < Duration::from_secs(5));
    assert!(silent_closed < Duration::from_secs(5));

    // A body trickled at 5 bytes a second, under 1000 bytes per 2 s.
    let presigned = c
        .put_object()
        .bucket("demo")
        .key("trickled")
        .presigned(PresigningConfig::expires_in(Duration::from_secs(300)).unwrap())
        .await
        .unwrap();
    let uri: http::Uri = presigned.uri().parse().unwrap();
    let mut conn = common::tls_connect(&env).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: {}\r\nContent-Length: 100000\r\n\r\n",
        uri.path_and_query().unwrap(),
        uri.authority().unwrap()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let since = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(conn);
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"x").await.is_ok() && writer.flush().await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut reply)).await;
    let cut_after = since.elapsed();
    trickle.abort();
    let reply = String::from_utf8_lossy(&reply);
    println!("a body trickled at 5 B/s cut off after {cut_after:?}");
    assert!(reply.contains("RequestTimeout"), "{reply}");
    assert!(cut_after < Duration::from_secs(5), "{cut_after:?}");
    let err = c
        .head_object()
        .bucket("demo")
        .key("trickled")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&err), 404, "nothing of the trickled body is stored");

    // Connections: 8 per address; the 9th is closed before its handshake
    // completes, and one can connect again once a slot is free.
    drop((c, skewed, forged));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(common::tls_connect(&env).await.unwrap());
    }
    assert!(
        common::tls_connect(&env).await.is_err(),
        "a 9th connection is refused"
    );
    held.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(common::tls_connect(&env).await.is_ok());
    drop(held);

    cluster.stop().await;
}
