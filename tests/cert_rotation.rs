//! Certificates are replaced while the cluster serves: new files, then a
//! reload (SIGHUP for processes). New connections get the new
//! certificates, and a client writing and reading all along sees no error.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use lumbung::config::{GatewayConfig, TlsFiles};
use lumbung::rpc::{pb, Pool};
use lumbung::tls::{write_pem, Authority, Role};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Replaces `name.pem`/`name.key` in `dir` with a fresh certificate.
fn reissue(ca: &Authority, dir: &Path, name: &str, role: Role) -> Vec<u8> {
    let id = ca
        .issue(name, &["127.0.0.1".into(), "localhost".into()], role)
        .unwrap();
    write_pem(&dir.join(format!("{name}.pem")), &id.cert_pem, false).unwrap();
    write_pem(&dir.join(format!("{name}.key")), &id.key_pem, true).unwrap();
    der_of(&id.cert_pem)
}

fn der_of(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// The certificate a server at `addr` presents to a new connection;
/// `client` is the identity to present back (nodes require one).
async fn served_certificate(addr: &str, ca: &Path, client: Option<&TlsFiles>) -> Vec<u8> {
    let connector = match client {
        None => common::tls_client(ca),
        Some(files) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
                roots.add(c.unwrap()).unwrap();
            }
            let read = |p: &Path| std::fs::read(p).unwrap();
            let certs = rustls_pemfile::certs(&mut read(&files.cert).as_slice())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut read(&files.key).as_slice())
                .unwrap()
                .unwrap();
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
        }
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_are_replaced_while_a_client_keeps_working() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = common::cluster(tmp.path(), 4).await;
    let dir = tmp.path().join("cluster");
    let ca_pem = dir.join("ca.pem");
    let ca = Authority::load(&ca_pem, &dir.join("ca.key")).unwrap();
    let admin: lumbung::config::AdminConfig =
        lumbung::config::load(&dir.join("admin.toml")).unwrap();

    // A second gateway, as its own process, on the same cluster.
    let mut second: GatewayConfig = lumbung::config::load(&dir.join("gateway.toml")).unwrap();
    second.listen = format!("127.0.0.1:{}", common::free_ports(1))
        .parse()
        .unwrap();
    let second_toml = dir.join("gateway2.toml");
    std::fs::write(&second_toml, toml::to_string(&second).unwrap()).unwrap();
    let mut process = std::process::Command::new(env!("CARGO_BIN_EXE_lumbung"))
        .args(["gateway", "--config", second_toml.to_str().unwrap()])
        .stderr(std::fs::File::create(tmp.path().join("gateway2.log")).unwrap())
        .spawn()
        .unwrap();
    let second_addr = second.listen.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&second_addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the second gateway never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A client writes and reads back through the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (written, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let worker = {
        let (c, stop, written, failures) = (
            common::s3(&cluster.env),
            stop.clone(),
            written.clone(),
            failures.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = common::bytes(i, 20_000);
                let key = format!("rot/{i}");
                let put = c
                    .put_object()
                    .bucket("demo")
                    .key(&key)
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await;
                let ok = match put {
                    Ok(_) => match c.get_object().bucket("demo").key(&key).send().await {
                        Ok(got) => got.body.collect().await.unwrap().into_bytes() == body,
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if ok {
                    written.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // New certificates for everyone, then a reload.
    let gateway = cluster.gateway.as_ref().unwrap();
    let old_public = gateway.certificate();
    let new_public = reissue(&ca, &dir, "gateway-public", Role::Gateway);
    reissue(&ca, &dir, "gateway", Role::Gateway);
    let mut new_node_certs = Vec::new();
    for id in 1..=3 {
        new_node_certs.push(reissue(&ca, &dir, &format!("node{id}"), Role::Node));
    }
    assert_ne!(old_public, new_public);
    gateway.reload_certificates().unwrap();
    for node in cluster.nodes.iter().flatten() {
        node.reload_certificates().unwrap();
    }
    // SAFETY: a signal to the child this test started, by its PID.
    assert_eq!(unsafe { libc::kill(process.id() as i32, libc::SIGHUP) }, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New connections see the new certificates, on both gateways and on
    // every node.
    let gw_addr = cluster
        .env
        .endpoint
        .trim_start_matches("https://")
        .to_string();
    assert_eq!(
        served_certificate(&gw_addr, &ca_pem, None).await,
        new_public
    );
    assert_eq!(
        served_certificate(&second_addr, &ca_pem, None).await,
        new_public,
        "the gateway process reloaded on SIGHUP"
    );
    for (i, node) in admin.nodes.iter().enumerate() {
        let served = served_certificate(&node.to_string(), &ca_pem, Some(&admin.tls)).await;
        assert_eq!(served, new_node_certs[i], "node {}", i + 1);
    }

    // The clients the nodes and the gateway open after the reload present
    // the new identity: a pool whose files now hold a gateway certificate
    // instead of an admin one is refused the admin API, allowed objects.
    let files = TlsFiles {
        ca: ca_pem.clone(),
        cert: tmp.path().join("who.pem"),
        key: tmp.path().join("who.key"),
    };
    std::fs::copy(&admin.tls.cert, &files.cert).unwrap();
    std::fs::copy(&admin.tls.key, &files.key).unwrap();
    let pool = Pool::new(&files).unwrap();
    assert!(pool
        .client(admin.nodes[0])
        .unwrap()
        .status(pb::Empty {})
        .await
        .is_ok());
    reissue(&ca, tmp.path(), "who", Role::Gateway);
    pool.reload().unwrap();
    let refused = pool
        .client(admin.nodes[0])
        .unwrap()
        .status(pb::Empty {})
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied);

    // A reload with a broken file is refused and changes nothing.
    std::fs::write(dir.join("gateway-public.key"), "not a key").unwrap();
    assert!(gateway.reload_certificates().is_err());
    assert_eq!(
        served_certificate(&gw_addr, &ca_pem, None).await,
        new_public
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    let (written, failures) = (
        written.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    println!("{written} objects written and read back during the rotation, {failures} failures");
    assert!(written > 5, "the client made progress: {written}");
    assert_eq!(failures, 0);

    let _ = process.kill();
    let _ = process.wait();
    cluster.stop().await;
}
