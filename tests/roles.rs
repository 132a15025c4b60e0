//! Certificate roles: every internal RPC is refused to a peer whose
//! certificate carries the wrong role, and to a peer from another CA.

mod common;

use lumbung::config::TlsFiles;
use lumbung::rpc::{pb, NodeClient, Pool};
use lumbung::tls::{write_pem, Authority, Role};
use std::path::Path;
use tonic::Code;

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

fn client(tls: &TlsFiles, node: std::net::SocketAddr) -> NodeClient {
    Pool::new(tls).unwrap().client(node).unwrap()
}

/// The gRPC code of a call's outcome; `Ok` when it succeeded.
fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn raft_msg() -> pb::RaftMessage {
    pb::RaftMessage {
        shard: 0,
        kind: "vote".into(),
        payload: Default::default(),
    }
}

fn bucket(name: &str) -> pb::BucketRequest {
    pb::BucketRequest {
        tenant: "demo".into(),
        bucket: name.into(),
        ..Default::default()
    }
}

fn tenant() -> pb::TenantSpec {
    pb::TenantSpec {
        tenant: "intruder".into(),
        ..Default::default()
    }
}

/// A certificate the cluster CA signed without any Lumbung role in it.
fn roleless_certificate(dir: &Path) -> (String, String) {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&read("ca.key")).unwrap();
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&read("ca.pem"))
        .unwrap()
        .self_signed(&ca_key)
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_calls_only_its_own_rpcs() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = common::cluster(tmp.path(), 4).await;
    let dir = tmp.path().join("cluster");
    let admin: lumbung::config::AdminConfig =
        lumbung::config::load(&dir.join("admin.toml")).unwrap();
    let node = admin.nodes[0];
    let denied = Code::PermissionDenied;

    // A gateway: the object API only.
    let mut gw = client(&files(&dir, "gateway"), node);
    assert_eq!(code_of(gw.head_bucket(bucket("demo")).await), Code::Ok);
    assert_eq!(code_of(gw.raft(raft_msg()).await), denied);
    let call = pb::ShardCall {
        shard: 0,
        payload: Default::default(),
    };
    assert_eq!(code_of(gw.query(call.clone()).await), denied);
    assert_eq!(code_of(gw.propose(call.clone()).await), denied);
    assert_eq!(code_of(gw.status(pb::Empty {}).await), denied);
    assert_eq!(code_of(gw.create_tenant(tenant()).await), denied);
    assert_eq!(code_of(gw.rotate_master_key(pb::Empty {}).await), denied);
    let err = gw.raft(raft_msg()).await.unwrap_err();
    assert!(
        err.message()
            .contains("gateway certificate may not call Raft"),
        "{}",
        err.message()
    );

    // The admin CLI: the admin API only.
    let mut adm = client(&files(&dir, "admin"), node);
    assert_eq!(code_of(adm.status(pb::Empty {}).await), Code::Ok);
    assert_eq!(code_of(adm.raft(raft_msg()).await), denied);
    assert_eq!(code_of(adm.query(call.clone()).await), denied);
    assert_eq!(code_of(adm.head_bucket(bucket("demo")).await), denied);
    assert_eq!(code_of(adm.create_bucket(bucket("sneaky")).await), denied);

    // Another node: Raft and replication, neither the object nor the admin API.
    let mut peer = client(&files(&dir, "node2"), node);
    assert_eq!(
        code_of(
            peer.get_chunk(pb::ChunkRef {
                id: vec![0; 32].into()
            })
            .await
        ),
        Code::NotFound,
        "a node may read chunks (this one is missing)"
    );
    assert_eq!(code_of(peer.head_bucket(bucket("demo")).await), denied);
    assert_eq!(code_of(peer.status(pb::Empty {}).await), denied);
    assert_eq!(code_of(peer.create_tenant(tenant()).await), denied);

    // Signed by the cluster CA but with no role: nothing at all.
    let (cert_pem, key_pem) = roleless_certificate(&dir);
    write_pem(&tmp.path().join("stray.pem"), &cert_pem, false).unwrap();
    write_pem(&tmp.path().join("stray.key"), &key_pem, true).unwrap();
    let stray_files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: tmp.path().join("stray.pem"),
        key: tmp.path().join("stray.key"),
    };
    let mut stray = client(&stray_files, node);
    assert_eq!(code_of(stray.head_bucket(bucket("demo")).await), denied);
    assert_eq!(code_of(stray.raft(raft_msg()).await), denied);
    assert_eq!(code_of(stray.status(pb::Empty {}).await), denied);

    // An admin certificate from another CA: the handshake itself fails.
    let other = Authority::generate("other").unwrap();
    let forged = other
        .issue("admin", &["127.0.0.1".into()], Role::Admin)
        .unwrap();
    write_pem(&tmp.path().join("forged.pem"), &forged.cert_pem, false).unwrap();
    write_pem(&tmp.path().join("forged.key"), &forged.key_pem, true).unwrap();
    let forged_files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: tmp.path().join("forged.pem"),
        key: tmp.path().join("forged.key"),
    };
    let err = client(&forged_files, node)
        .status(pb::Empty {})
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_ne!(err.code(), denied, "refused by TLS, before any RPC: {err}");

    // The other way round: a server holding a gateway certificate of the
    // cluster CA, posing as a node, is refused by the caller.
    let impostor =
        lumbung::tls::ReloadableIdentity::load(&dir.join("gateway.pem"), &dir.join("gateway.key"))
            .unwrap();
    let server = lumbung::tls::rpc_server_config(&dir.join("ca.pem"), impostor).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_node = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = acceptor.accept(tcp).await;
        }
    });
    let err = client(&files(&dir, "admin"), fake_node)
        .status(pb::Empty {})
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("not a node's"),
        "refused for its role: {err:?}"
    );

    cluster.stop().await;
}
