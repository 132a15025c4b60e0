//! Writes that a retry cannot turn into a wrong answer, against an
//! in-process cluster:
//!
//! - conditional writes (`If-None-Match: *`, `If-Match`) on PutObject and
//!   CompleteMultipartUpload, checked when the index shard applies them;
//! - a proposal applied and then proposed again, as `ShardHost::route`
//!   does after a timeout or a leader change, answers as the first time:
//!   a create-only put is not refused by its own object, a completed
//!   upload is not "no such upload", a created bucket is not "exists";
//! - a chunk counts only on a node whose layout lists it as a holder.

mod common;

use aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use common::{bytes, code, s3, status};
use lumbung::dev::DevCluster;
use lumbung::rpc::pb;
use lumbung::shard::command::{ETagMatch, Precondition};
use lumbung::shard::{Command, ShardError, Value};
use lumbung::types::{ChunkId, ShardId, WriteId};

const TENANT: &str = "demo";
const BUCKET: &str = "demo";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_and_conditions_answer_as_s3_would() {
    common::log_if_asked();
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let c = s3(&cluster.env);

    conditional_puts_hold_for_inline_and_chunked_bodies(&c).await;
    conditional_completes_keep_the_upload_when_refused(&c).await;
    a_copy_onto_itself_is_a_new_write(&c).await;
    a_retried_put_is_not_refused_by_its_own_object(&cluster, &c).await;
    a_retried_complete_answers_the_object_it_made(&cluster, &c).await;
    a_retried_bucket_creation_succeeds(&cluster, &c).await;
    // Last: it takes one node's data replicas away.
    chunks_count_only_on_nodes_holding_their_shard(&cluster, &c).await;

    cluster.stop().await;
}

/// A PutObject of `body` as `key`, to add conditions to.
fn put(c: &Client, key: &str, body: Vec<u8>) -> PutObjectFluentBuilder {
    c.put_object()
        .bucket(BUCKET)
        .key(key)
        .body(ByteStream::from(body))
}

async fn read(c: &Client, key: &str) -> Vec<u8> {
    let got = c.get_object().bucket(BUCKET).key(key).send().await.unwrap();
    got.body.collect().await.unwrap().into_bytes().to_vec()
}

async fn conditional_puts_hold_for_inline_and_chunked_bodies(c: &Client) {
    // Create-only: the first succeeds, the second (inline or chunked) is
    // refused and changes nothing.
    let first = put(c, "once", bytes(1, 10))
        .if_none_match("*")
        .send()
        .await
        .unwrap();
    for len in [10, 300 * 1024] {
        let again = put(c, "once", bytes(2, len))
            .if_none_match("*")
            .send()
            .await;
        let e = again.unwrap_err();
        assert_eq!(
            (status(&e), code(&e).as_str()),
            (412, "PreconditionFailed"),
            "{len} bytes"
        );
    }
    assert_eq!(read(c, "once").await, bytes(1, 10));

    // If-Match on a missing key is NoSuchKey, as AWS answers.
    let missing = put(c, "never", bytes(3, 10))
        .if_match(first.e_tag().unwrap())
        .send()
        .await;
    let e = missing.unwrap_err();
    assert_eq!((status(&e), code(&e).as_str()), (404, "NoSuchKey"));

    // If-Match with a stale ETag is refused; with the current one it writes.
    let stale = put(c, "once", bytes(4, 300 * 1024))
        .if_match("\"0123456789abcdef0123456789abcdef\"")
        .send()
        .await;
    assert_eq!(code(&stale.unwrap_err()), "PreconditionFailed");
    put(c, "once", bytes(5, 300 * 1024))
        .if_match(first.e_tag().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(read(c, "once").await, bytes(5, 300 * 1024));
}

/// Starts an upload of `key` with one (last, so small) part.
async fn upload_one_part(c: &Client, key: &str) -> (String, CompletedMultipartUpload) {
    let upload = c
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let upload_id = upload.upload_id().unwrap().to_string();
    let part = c
        .upload_part()
        .bucket(BUCKET)
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .body(ByteStream::from(bytes(6, 1000)))
        .send()
        .await
        .unwrap();
    let parts = CompletedMultipartUpload::builder()
        .parts(
            CompletedPart::builder()
                .part_number(1)
                .e_tag(part.e_tag().unwrap())
                .build(),
        )
        .build();
    (upload_id, parts)
}

async fn conditional_completes_keep_the_upload_when_refused(c: &Client) {
    let current = put(c, "assembled", bytes(7, 10)).send().await.unwrap();
    let (upload_id, parts) = upload_one_part(c, "assembled").await;
    let complete = || {
        c.complete_multipart_upload()
            .bucket(BUCKET)
            .key("assembled")
            .upload_id(&upload_id)
            .multipart_upload(parts.clone())
    };
    let refused = complete().if_none_match("*").send().await.unwrap_err();
    assert_eq!(
        (status(&refused), code(&refused).as_str()),
        (412, "PreconditionFailed")
    );
    // The refusal changed nothing: the upload and its part are still there.
    let listed = c
        .list_parts()
        .bucket(BUCKET)
        .key("assembled")
        .upload_id(&upload_id)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.parts().len(), 1);
    assert_eq!(read(c, "assembled").await, bytes(7, 10));

    complete()
        .if_match(current.e_tag().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(read(c, "assembled").await, bytes(6, 1000));
}

async fn a_copy_onto_itself_is_a_new_write(c: &Client) {
    put(c, "self", bytes(8, 10)).send().await.unwrap();
    c.copy_object()
        .bucket(BUCKET)
        .key("self")
        .copy_source(format!("{BUCKET}/self"))
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .metadata("colour", "blue")
        .send()
        .await
        .unwrap();
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("self")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata()
            .and_then(|m| m.get("colour"))
            .map(String::as_str),
        Some("blue")
    );
}

fn node(cluster: &DevCluster, i: usize) -> &lumbung::node::RunningNode {
    cluster.nodes[i].as_ref().expect("node running")
}

fn index_shard(cluster: &DevCluster) -> ShardId {
    node(cluster, 0)
        .host
        .layout()
        .shard_for_bucket(TENANT, BUCKET)
}

async fn a_retried_put_is_not_refused_by_its_own_object(cluster: &DevCluster, c: &Client) {
    let n = node(cluster, 0);
    // A sealed manifest to reuse under another key: seals bind the tenant,
    // not the key.
    let mut manifest = n.objects.manifest(TENANT, BUCKET, "once").await.unwrap();
    manifest.write_id = Some(WriteId::random());
    let cmd = Command::PutObject {
        tenant: TENANT.into(),
        bucket: BUCKET.into(),
        key: "retried".into(),
        manifest,
        limit: None,
        precondition: Precondition {
            if_none_match: Some(ETagMatch::Any),
            ..Default::default()
        },
        // Reused chunks as a copy would, touched now (no collection ran).
        touched_ms: Some(lumbung::types::now_ms()),
    };
    // Applied, then proposed again as a retry after a timeout would be.
    for attempt in 0..2 {
        let reply = n.host.propose(index_shard(cluster), &cmd).await;
        assert!(
            matches!(reply, Ok(Value::Done)),
            "attempt {attempt}: {reply:?}"
        );
    }
    assert_eq!(read(c, "retried").await, bytes(5, 300 * 1024));
    // Another request is still refused.
    let other = put(c, "retried", bytes(9, 10))
        .if_none_match("*")
        .send()
        .await;
    assert_eq!(code(&other.unwrap_err()), "PreconditionFailed");
}

async fn a_retried_complete_answers_the_object_it_made(cluster: &DevCluster, c: &Client) {
    let (upload_id, listed) = upload_one_part(c, "multi").await;
    let parts = listed
        .parts()
        .iter()
        .map(|p| {
            (
                p.part_number().unwrap() as u32,
                p.e_tag().unwrap().to_string(),
            )
        })
        .collect();
    let cmd = Command::CompleteUpload {
        tenant: TENANT.into(),
        bucket: BUCKET.into(),
        key: "multi".into(),
        upload_id: upload_id.clone(),
        parts,
        modified_ms: 1_700_000_000_000,
        limit: None,
        write_id: Some(WriteId::random()),
        precondition: Precondition::default(),
    };
    let n = node(cluster, 1);
    let mut etags = Vec::new();
    for attempt in 0..2 {
        match n.host.propose(index_shard(cluster), &cmd).await {
            Ok(Value::Object(Some(m))) => etags.push(m.etag),
            other => panic!("attempt {attempt}: {other:?}"),
        }
    }
    assert_eq!(etags[0], etags[1]);
    let head = c
        .head_object()
        .bucket(BUCKET)
        .key("multi")
        .send()
        .await
        .unwrap();
    assert_eq!(head.e_tag(), Some(format!("\"{}\"", etags[0]).as_str()));
    // A new request for the same upload finds it gone, as in S3.
    let again = c
        .complete_multipart_upload()
        .bucket(BUCKET)
        .key("multi")
        .upload_id(&upload_id)
        .multipart_upload(listed)
        .send()
        .await;
    assert_eq!(code(&again.unwrap_err()), "NoSuchUpload");
}

async fn a_retried_bucket_creation_succeeds(cluster: &DevCluster, c: &Client) {
    let n = node(cluster, 2);
    let creation = WriteId::random();
    for attempt in 0..2 {
        let made = n.objects.create_bucket(TENANT, "twice", creation).await;
        assert_eq!(made, Ok(()), "attempt {attempt}");
    }
    c.head_bucket().bucket("twice").send().await.unwrap();
    let other = c.create_bucket().bucket("twice").send().await.unwrap_err();
    assert_eq!(code(&other), "BucketAlreadyOwnedByYou");
    assert_eq!(
        n.objects
            .create_bucket(TENANT, "twice", WriteId::random())
            .await,
        Err(ShardError::BucketExists)
    );
}

async fn chunks_count_only_on_nodes_holding_their_shard(cluster: &DevCluster, c: &Client) {
    // Node 3's layout moves every data shard off it (as a rebalance
    // would); the other nodes have not heard of it yet.
    let gone = node(cluster, 2);
    let mut moved = (*gone.host.layout()).clone();
    moved.epoch += 1;
    for voters in moved.voters.iter_mut().skip(1) {
        voters.retain(|n| *n != gone.host.id);
    }
    // The node's own follower may reconcile at the same moment; a step
    // that failed is tried again.
    let mut adopted = gone.host.adopt(moved.clone()).await;
    for _ in 0..3 {
        if adopted.is_ok() {
            break;
        }
        adopted = gone.host.adopt(moved.clone()).await;
    }
    adopted.unwrap();

    let data = Bytes::from(bytes(10, 1000));
    let id = ChunkId::of(&data);
    let shard = moved.shard_for_chunk(&id);
    let coordinator = node(cluster, 0);
    let refused = gone
        .objects
        .chunks
        .accept(pb::ChunkWrite {
            id: Bytes::copy_from_slice(&id.0),
            data: data.clone(),
            epoch: coordinator.host.layout().epoch,
            shard: shard.0,
        })
        .await;
    assert!(
        matches!(refused, Err(ShardError::NotHolder { node: 3, epoch, .. }) if epoch == moved.epoch),
        "{refused:?}"
    );

    // The coordinator still lists node 3, which refuses; the other two
    // are a majority.
    assert_eq!(coordinator.objects.chunks.replicate(data).await, Ok(id));
    assert!(
        !gone.objects.chunks.store.contains(&id),
        "node 3 stored a chunk of a shard it left"
    );
    for i in [0, 1] {
        assert!(
            node(cluster, i).objects.chunks.store.contains(&id),
            "node {} lacks it",
            i + 1
        );
    }

    // And through S3.
    for i in 0..3 {
        let key = format!("after-move-{i}");
        put(c, &key, bytes(11 + i, 200 * 1024))
            .send()
            .await
            .unwrap();
        assert_eq!(read(c, &key).await, bytes(11 + i, 200 * 1024));
    }
}
