//! Bounded fuzzing, run with the suite: every decoder a node runs on bytes
//! from the wire, and the gateway's request parsing (before and after the
//! signature check), fed random and mutated input. Nothing may panic,
//! no connection may hang, and the gateway must serve normally afterwards.
//!
//! Iterations per target: `FUZZ_ITERATIONS` (default 20,000 for decoders,
//! a fortieth of it for gateway requests, which each cost a TLS
//! connection). Raise it to fuzz for longer.

mod common;

use lumbung::admin::S3Env;
use lumbung::rpc::pb;
use lumbung::shard::command::MembershipOp;
use lumbung::shard::{Command, Query, Reply, TypeConfig};
use prost::Message;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// A small deterministic generator, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Input that parsers tend to trip on.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"%",
    b"%zz",
    b"%00",
    b"?",
    b"&",
    b"=",
    b"/",
    b"../",
    b":",
    b";",
    b"\xff\xfe",
    b"\x00",
    b"<",
    b">",
    b"</",
    b"<![CDATA[",
    b"&amp;",
    b"0",
    b"-1",
    b"18446744073709551616",
    b"chunked",
    b"aws-chunked",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked\r\n",
    b"Range: bytes=",
    b"x-amz-",
    b"AWS4-HMAC-SHA256",
];

/// One to four random edits of `seed`.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + rng.below(64)).min(v.len());
                v.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(32)).min(v.len());
                let piece = v[at..end].repeat(1 + rng.below(200));
                v.splice(at..at, piece);
            }
            4 => {
                let len = rng.below(16);
                let noise = rng.bytes(len);
                v.splice(at..at, noise);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Every decoder a node applies to bytes a peer sent.
fn decode_everything(bytes: &[u8]) {
    macro_rules! prost_decode {
        ($($t:ty),*) => { $( let _ = <$t>::decode(bytes); )* };
    }
    prost_decode!(
        pb::RaftMessage,
        pb::ShardCall,
        pb::ShardReply,
        pb::Chunk,
        pb::ChunkRef,
        pb::ChunkWrite,
        pb::ChunkStored,
        pb::AccessKeyRequest,
        pb::TenantRequest,
        pb::BucketRequest,
        pb::ObjectRequest,
        pb::PutFrame,
        pb::GetRequest,
        pb::CopyRequest,
        pb::ListRequest,
        pb::CreateUploadRequest,
        pb::UploadRequest,
        pb::CompleteRequest,
        pb::ListPartsRequest,
        pb::ListUploadsRequest,
        pb::TenantSpec,
        pb::MasterKeyStepRequest,
        pb::NodeStatus,
        pb::GetFrame,
        pb::ShardRequest,
        pb::AddNodeRequest,
        pb::NodeRequest,
        pb::RemoveNodeRequest,
        pb::RebalanceRequest
    );
    let _ = lumbung::shard::decode::<Command>(bytes);
    let _ = lumbung::shard::decode::<Query>(bytes);
    let _ = lumbung::shard::decode::<Reply>(bytes);
    let _ = lumbung::shard::decode::<MembershipOp>(bytes);
    let _ = lumbung::shard::decode::<lumbung::placement::Layout>(bytes);
    let _ = lumbung::shard::command::from_msgpack::<openraft::raft::AppendEntriesRequest<TypeConfig>>(
        bytes,
    );
    let _ = lumbung::shard::command::from_msgpack::<openraft::raft::VoteRequest<u64>>(bytes);
    let _ = lumbung::shard::command::from_msgpack::<
        openraft::raft::InstallSnapshotRequest<TypeConfig>,
    >(bytes);
}

#[test]
fn internal_rpc_decoding_never_panics() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // Seeds: valid encodings, which mutation turns into near-misses.
    let seeds: Vec<Vec<u8>> = vec![
        pb::RaftMessage {
            shard: 3,
            kind: "append".into(),
            payload: lumbung::shard::encode(&Query::Tenants).into(),
        }
        .encode_to_vec(),
        pb::PutFrame {
            frame: Some(pb::put_frame::Frame::Header(pb::PutHeader {
                tenant: "demo".into(),
                bucket: "b".into(),
                key: "k".into(),
                ..Default::default()
            })),
        }
        .encode_to_vec(),
        lumbung::shard::encode(&Query::Tenants),
        lumbung::shard::encode(&Command::ForgetTenant { tenant: "t".into() }),
        lumbung::shard::encode(&MembershipOp::AddLearner {
            node: 4,
            addr: "127.0.0.1:7484".into(),
        }),
    ];
    let n = iterations();
    for i in 0..n {
        let input = if i % 2 == 0 {
            let len = rng.below(512);
            rng.bytes(len)
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        decode_everything(&input);
    }
    println!("{n} inputs through every internal decoder, no panic");
}

/// A POST of `body` to `target`, signed with the tenant's key (unsigned
/// payload), so the gateway gets as far as parsing the body.
fn signed_post(env: &S3Env, host: &str, target: &str, body: &[u8]) -> Vec<u8> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let identity = aws_credential_types::Credentials::new(
        &env.access_key,
        &env.secret_key,
        None,
        None,
        "fuzz",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(&env.region)
        .name("s3")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let url = format!("https://{host}{target}");
    let headers = [("host", host), ("x-amz-content-sha256", "UNSIGNED-PAYLOAD")];
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.iter().copied(),
        SignableBody::UnsignedPayload,
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(&url)
        .body(())
        .unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(name, value.parse().unwrap());
    }
    instructions.apply_to_request_http1x(&mut req);
    let mut head = format!(
        "POST {target} HTTP/1.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in req.headers() {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");
    [head.into_bytes(), body.to_vec()].concat()
}

/// Sends `request` on a new TLS connection and returns what the gateway
/// answers. A request the gateway still waits on after 0.5 s (cut short by
/// a mutation) gets the connection closed by us, after which the gateway
/// must close too; `None` if it held the connection 10 s longer.
async fn exchange(env: &S3Env, request: &[u8]) -> Option<String> {
    let connector = common::tls_client(&env.ca_cert);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut attempts = 0;
    let mut tls = loop {
        // The gateway closes connections beyond its per-address rate.
        let tcp = tokio::net::TcpStream::connect(env.endpoint.trim_start_matches("https://"))
            .await
            .unwrap();
        match connector.connect(name.clone(), tcp).await {
            Ok(tls) => break tls,
            Err(_) if attempts < 50 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no TLS connection: {e}"),
        }
    };
    if tls.write_all(request).await.is_err() {
        return Some(String::new());
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    let mut closed_by_us = false;
    loop {
        let wait = if closed_by_us || !reply.is_empty() {
            10_000
        } else {
            500
        };
        match tokio::time::timeout(Duration::from_millis(wait), tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                reply.extend_from_slice(&buf[..n]);
                // One response is all we asked for.
                if reply.windows(4).any(|w| w == b"\r\n\r\n") {
                    let _ = tls.shutdown().await;
                    closed_by_us = true;
                }
            }
            Err(_) if !closed_by_us && reply.is_empty() => {
                let _ = tls.shutdown().await;
                closed_by_us = true;
            }
            Err(_) => return None,
        }
    }
    Some(String::from_utf8_lossy(&reply).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_request_parsing_never_panics_or_hangs() {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let tmp = tempfile::tempdir().unwrap();
    let cluster = common::cluster(tmp.path(), 4).await;
    let env = cluster.env.clone();
    let c = common::s3(&env);
    let host = env.endpoint.trim_start_matches("https://").to_string();

    // Before the signature check: the request line, headers and framing.
    let mut seeds: Vec<Vec<u8>> = vec![
        format!("GET /demo?list-type=2&prefix=a%2Fb&max-keys=10 HTTP/1.1\r\nHost: {host}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AK/20260101/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=00\r\nx-amz-date: 20260101T000000Z\r\n\r\n").into_bytes(),
        format!("PUT /demo/key HTTP/1.1\r\nHost: {host}\r\nx-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER\r\nContent-Encoding: aws-chunked\r\nx-amz-decoded-content-length: 5\r\nx-amz-trailer: x-amz-checksum-crc32\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n").into_bytes(),
        format!("POST /demo?delete HTTP/1.1\r\nHost: {host}\r\nContent-Length: 60\r\n\r\n<Delete><Object><Key>a</Key></Object><Quiet>true</Quiet></Delete>").into_bytes(),
        format!("GET /demo/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=00 HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-10\r\n\r\n").into_bytes(),
    ];

    // After it: XML bodies of validly signed requests.
    let upload = c
        .create_multipart_upload()
        .bucket("demo")
        .key("fuzz-mp")
        .send()
        .await
        .unwrap();
    let complete_uri = format!("/demo/fuzz-mp?uploadId={}", upload.upload_id().unwrap());
    let signed_bodies = [
        (complete_uri.as_str(), "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"abc\"</ETag></Part></CompleteMultipartUpload>"),
        ("/demo?delete", "<Delete><Object><Key>x</Key></Object><Object><Key>y</Key><VersionId>1</VersionId></Object></Delete>"),
    ];

    // Unmutated, the signed requests pass the signature check.
    for (target, body) in signed_bodies {
        let reply = exchange(&env, &signed_post(&env, &host, target, body.as_bytes()))
            .await
            .unwrap();
        let status = reply.split(' ').nth(1).unwrap_or("");
        assert!(status == "200" || status == "400", "{target}: {reply}");
    }

    let n = (iterations() / 40).max(20);
    let mut rng = Rng(0x5eed_9876_0000_0002);
    let (mut hung, mut answered) = (0, 0);
    for i in 0..n {
        let request = if i % 3 == 2 {
            let (target, body) = signed_bodies[rng.below(signed_bodies.len())];
            signed_post(&env, &host, target, &mutate(&mut rng, body.as_bytes()))
        } else if i % 3 == 1 {
            let len = rng.below(2048);
            rng.bytes(len)
        } else {
            let seed = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &seed)
        };
        match exchange(&env, &request).await {
            None => hung += 1,
            Some(reply) if reply.starts_with("HTTP/1.1 ") => answered += 1,
            Some(_) => {}
        }
        // Interesting survivors join the seeds, a little like coverage.
        if i % 50 == 0 && seeds.len() < 32 {
            seeds.push(request);
        }
    }
    println!(
        "{n} malformed requests to the gateway: {answered} answered with a status, {hung} hung, {} panics",
        PANICS.load(Ordering::SeqCst)
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "the gateway or a node panicked"
    );
    assert_eq!(hung, 0, "a connection was held for more than 10 s");

    // And it still serves.
    c.put_object()
        .bucket("demo")
        .key("after-fuzz")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(
            b"still here",
        ))
        .send()
        .await
        .unwrap();
    cluster.stop().await;
}
