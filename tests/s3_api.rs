//! The S3 API through a real SDK against an in-process cluster: each test
//! is one family of operations, told as a short story.

mod common;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use common::{bytes, code, s3, status};
use md5::{Digest, Md5};

const MIB: usize = 1024 * 1024;

async fn body(out: aws_sdk_s3::operation::get_object::GetObjectOutput) -> Vec<u8> {
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn buckets_objects_lists_and_multipart_behave_like_s3() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = common::cluster(dir.path(), 8).await;
    let c = s3(&cluster.env);

    bucket_lifecycle(&c).await;
    objects_ranges_and_conditions(&c).await;
    listings_paginate_and_roll_up(&c).await;
    multipart_uploads(&c).await;
    copies_and_batch_deletes(&c).await;
    bad_requests_change_nothing(&c, &cluster.env).await;
    presigned_urls_work_and_expire(&c, &cluster.env).await;

    cluster.stop().await;
}

async fn bucket_lifecycle(c: &aws_sdk_s3::Client) {
    c.create_bucket().bucket("photos").send().await.unwrap();
    let again = c.create_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&again), "BucketAlreadyOwnedByYou");
    let names: Vec<_> = c
        .list_buckets()
        .send()
        .await
        .unwrap()
        .buckets()
        .iter()
        .filter_map(|b| b.name().map(str::to_string))
        .collect();
    assert_eq!(names, ["demo", "photos"]);
    c.head_bucket().bucket("photos").send().await.unwrap();
    let missing = c.head_bucket().bucket("nope").send().await.unwrap_err();
    assert_eq!(status(&missing), 404);

    c.put_object()
        .bucket("photos")
        .key("a")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap();
    let not_empty = c.delete_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&not_empty), "BucketNotEmpty");
    c.delete_object()
        .bucket("photos")
        .key("a")
        .send()
        .await
        .unwrap();
    c.delete_bucket().bucket("photos").send().await.unwrap();
    let gone = c.delete_bucket().bucket("photos").send().await.unwrap_err();
    assert_eq!(code(&gone), "NoSuchBucket");
    let put_missing = c
        .put_object()
        .bucket("photos")
        .key("a")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&put_missing), "NoSuchBucket");
}

async fn objects_ranges_and_conditions(c: &aws_sdk_s3::Client) {
    // Inline (small) and chunked (several chunks) bodies take different paths.
    for (key, len) in [("small", 1000), ("large", 9 * MIB + 17)] {
        let data = bytes(len as u64, len);
        let put = c
            .put_object()
            .bucket("demo")
            .key(key)
            .content_type("text/plain")
            .metadata("colour", "blue")
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap();
        let md5 = hex::encode(Md5::digest(&data));
        assert_eq!(put.e_tag(), Some(format!("\"{md5}\"").as_str()));

        let got = c.get_object().bucket("demo").key(key).send().await.unwrap();
        assert_eq!(got.content_type(), Some("text/plain"));
        assert_eq!(
            got.metadata().unwrap().get("colour").map(String::as_str),
            Some("blue")
        );
        assert_eq!(body(got).await, data);

        let ranged = c
            .get_object()
            .bucket("demo")
            .key(key)
            .range("bytes=100-899")
            .send()
            .await
            .unwrap();
        assert_eq!(
            ranged.content_range(),
            Some(format!("bytes 100-899/{len}").as_str())
        );
        assert_eq!(body(ranged).await, data[100..900]);
        let suffix = c
            .get_object()
            .bucket("demo")
            .key(key)
            .range("bytes=-10")
            .send()
            .await
            .unwrap();
        assert_eq!(body(suffix).await, data[len - 10..]);
        let beyond = c
            .get_object()
            .bucket("demo")
            .key(key)
            .range(format!("bytes={len}-"))
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&beyond), 416);

        let etag = format!("\"{md5}\"");
        let not_modified = c
            .get_object()
            .bucket("demo")
            .key(key)
            .if_none_match(&etag)
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&not_modified), 304);
        let failed = c
            .get_object()
            .bucket("demo")
            .key(key)
            .if_match("\"0000\"")
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&failed), 412);
        c.get_object()
            .bucket("demo")
            .key(key)
            .if_match(&etag)
            .send()
            .await
            .unwrap();

        let head = c
            .head_object()
            .bucket("demo")
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(len as i64));
    }
    let missing = c
        .get_object()
        .bucket("demo")
        .key("nothing")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&missing), "NoSuchKey");
    let no_bucket = c
        .get_object()
        .bucket("nobucket")
        .key("x")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&no_bucket), "NoSuchBucket");
}

async fn listings_paginate_and_roll_up(c: &aws_sdk_s3::Client) {
    c.create_bucket().bucket("tree").send().await.unwrap();
    let keys = ["a/1", "a/2", "a/b/3", "b/4", "c", "d+e f", "z"];
    for k in keys {
        c.put_object()
            .bucket("tree")
            .key(k)
            .body(ByteStream::from_static(b""))
            .send()
            .await
            .unwrap();
    }
    let top = c
        .list_objects_v2()
        .bucket("tree")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let prefixes: Vec<_> = top
        .common_prefixes()
        .iter()
        .filter_map(|p| p.prefix())
        .collect();
    let names: Vec<_> = top.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(prefixes, ["a/", "b/"]);
    assert_eq!(names, ["c", "d+e f", "z"]);

    let under_a = c
        .list_objects_v2()
        .bucket("tree")
        .prefix("a/")
        .delimiter("/")
        .send()
        .await
        .unwrap();
    let names: Vec<_> = under_a.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(names, ["a/1", "a/2"]);
    assert_eq!(under_a.common_prefixes()[0].prefix(), Some("a/b/"));

    // Two keys a page: every key exactly once, in order.
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = c
            .list_objects_v2()
            .bucket("tree")
            .max_keys(2)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        seen.extend(
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        token = page.next_continuation_token().map(str::to_string);
        if !page.is_truncated().unwrap_or(false) {
            break;
        }
    }
    assert_eq!(seen, keys);

    let after = c
        .list_objects_v2()
        .bucket("tree")
        .start_after("b/4")
        .send()
        .await
        .unwrap();
    let names: Vec<_> = after.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(names, ["c", "d+e f", "z"]);

    let v1 = c
        .list_objects()
        .bucket("tree")
        .marker("a/b/3")
        .max_keys(2)
        .send()
        .await
        .unwrap();
    let names: Vec<_> = v1.contents().iter().filter_map(|o| o.key()).collect();
    assert_eq!(names, ["b/4", "c"]);
    assert_eq!(v1.is_truncated(), Some(true));
}

async fn multipart_uploads(c: &aws_sdk_s3::Client) {
    let parts_data = [bytes(1, 5 * MIB), bytes(2, 5 * MIB), bytes(3, MIB + 3)];
    let up = c
        .create_multipart_upload()
        .bucket("demo")
        .key("mp")
        .send()
        .await
        .unwrap();
    let id = up.upload_id().unwrap().to_string();
    let mut done = Vec::new();
    let mut md5s = Vec::new();
    for (i, data) in parts_data.iter().enumerate() {
        let n = i as i32 + 1;
        let r = c
            .upload_part()
            .bucket("demo")
            .key("mp")
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap();
        md5s.extend_from_slice(&Md5::digest(data));
        done.push(
            CompletedPart::builder()
                .part_number(n)
                .e_tag(r.e_tag().unwrap())
                .build(),
        );
    }
    let listed = c
        .list_parts()
        .bucket("demo")
        .key("mp")
        .upload_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.parts().len(), 3);
    let uploads = c
        .list_multipart_uploads()
        .bucket("demo")
        .send()
        .await
        .unwrap();
    assert!(uploads
        .uploads()
        .iter()
        .any(|u| u.upload_id() == Some(id.as_str())));

    let reversed = CompletedMultipartUpload::builder()
        .set_parts(Some(done.iter().rev().cloned().collect()))
        .build();
    let err = c
        .complete_multipart_upload()
        .bucket("demo")
        .key("mp")
        .upload_id(&id)
        .multipart_upload(reversed)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "InvalidPartOrder");
    let mut with_ghost = done.clone();
    with_ghost.push(
        CompletedPart::builder()
            .part_number(9)
            .e_tag("\"00\"")
            .build(),
    );
    let err = c
        .complete_multipart_upload()
        .bucket("demo")
        .key("mp")
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(with_ghost))
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "InvalidPart");

    let complete = c
        .complete_multipart_upload()
        .bucket("demo")
        .key("mp")
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .unwrap();
    let expected = format!("\"{}-3\"", hex::encode(Md5::digest(&md5s)));
    assert_eq!(complete.e_tag(), Some(expected.as_str()));
    let all: Vec<u8> = parts_data.concat();
    let got = c
        .get_object()
        .bucket("demo")
        .key("mp")
        .send()
        .await
        .unwrap();
    assert_eq!(body(got).await, all);
    let gone = c
        .list_parts()
        .bucket("demo")
        .key("mp")
        .upload_id(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&gone), "NoSuchUpload");

    // UploadPartCopy of a range, then abort.
    let up = c
        .create_multipart_upload()
        .bucket("demo")
        .key("mp2")
        .send()
        .await
        .unwrap();
    let id2 = up.upload_id().unwrap();
    let copied = c
        .upload_part_copy()
        .bucket("demo")
        .key("mp2")
        .upload_id(id2)
        .part_number(1)
        .copy_source("demo/mp")
        .copy_source_range("bytes=10-5242889")
        .send()
        .await
        .unwrap();
    let want = hex::encode(Md5::digest(&all[10..5_242_890]));
    assert_eq!(
        copied.copy_part_result().unwrap().e_tag(),
        Some(format!("\"{want}\"").as_str())
    );
    c.abort_multipart_upload()
        .bucket("demo")
        .key("mp2")
        .upload_id(id2)
        .send()
        .await
        .unwrap();
    let aborted = c
        .list_parts()
        .bucket("demo")
        .key("mp2")
        .upload_id(id2)
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&aborted), "NoSuchUpload");
}

async fn copies_and_batch_deletes(c: &aws_sdk_s3::Client) {
    let data = bytes(7, 3 * MIB);
    c.put_object()
        .bucket("demo")
        .key("orig")
        .metadata("k", "v")
        .body(ByteStream::from(data.clone()))
        .send()
        .await
        .unwrap();
    c.copy_object()
        .bucket("demo")
        .key("copy")
        .copy_source("demo/orig")
        .send()
        .await
        .unwrap();
    let got = c
        .get_object()
        .bucket("demo")
        .key("copy")
        .send()
        .await
        .unwrap();
    assert_eq!(
        got.metadata().unwrap().get("k").map(String::as_str),
        Some("v")
    );
    assert_eq!(body(got).await, data);
    c.copy_object()
        .bucket("demo")
        .key("copy")
        .copy_source("demo/copy")
        .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
        .metadata("k", "w")
        .send()
        .await
        .unwrap();
    let head = c
        .head_object()
        .bucket("demo")
        .key("copy")
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.metadata().unwrap().get("k").map(String::as_str),
        Some("w")
    );

    let ids = ["orig", "copy", "never-existed"]
        .map(|k| ObjectIdentifier::builder().key(k).build().unwrap())
        .to_vec();
    let out = c
        .delete_objects()
        .bucket("demo")
        .delete(Delete::builder().set_objects(Some(ids)).build().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(out.deleted().len(), 3);
    let gone = c
        .head_object()
        .bucket("demo")
        .key("orig")
        .send()
        .await
        .unwrap_err();
    assert_eq!(status(&gone), 404);
}

async fn bad_requests_change_nothing(c: &aws_sdk_s3::Client, env: &lumbung::admin::S3Env) {
    let wrong = common::s3_with(env, &env.access_key, "not-the-secret");
    let err = wrong
        .put_object()
        .bucket("demo")
        .key("intruder")
        .body(ByteStream::from_static(b"x"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "SignatureDoesNotMatch");
    let unknown = common::s3_with(env, "LKNOBODY", "secret");
    let err = unknown.list_buckets().send().await.unwrap_err();
    assert_eq!(code(&err), "InvalidAccessKeyId");

    let err = c
        .put_object()
        .bucket("demo")
        .key("digest")
        .content_md5("AAAAAAAAAAAAAAAAAAAAAA==")
        .body(ByteStream::from_static(b"payload"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(&err), "BadDigest");
    for key in ["intruder", "digest"] {
        let e = c
            .head_object()
            .bucket("demo")
            .key(key)
            .send()
            .await
            .unwrap_err();
        assert_eq!(status(&e), 404, "{key} must not exist");
    }
}

/// `curl` with the cluster CA: a client that knows nothing of SigV4.
fn curl(env: &lumbung::admin::S3Env, args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&env.ca_cert)
        .args(args)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn presigned_urls_work_and_expire(c: &aws_sdk_s3::Client, env: &lumbung::admin::S3Env) {
    use aws_sdk_s3::presigning::PresigningConfig;
    use std::time::Duration;
    let hour = PresigningConfig::expires_in(Duration::from_secs(3600)).unwrap();
    let put = c
        .put_object()
        .bucket("demo")
        .key("presigned")
        .presigned(hour.clone())
        .await
        .unwrap();
    let file = std::env::temp_dir().join(format!("lumbung-presign-{}", std::process::id()));
    std::fs::write(&file, b"sent without credentials").unwrap();
    let status = curl(env, &["-X", "PUT", "-T", file.to_str().unwrap(), put.uri()]);
    assert_eq!(status, "200", "presigned PUT");
    let get = c
        .get_object()
        .bucket("demo")
        .key("presigned")
        .presigned(hour)
        .await
        .unwrap();
    assert_eq!(curl(env, &[get.uri()]), "200", "presigned GET");
    let got = c
        .get_object()
        .bucket("demo")
        .key("presigned")
        .send()
        .await
        .unwrap();
    assert_eq!(body(got).await, b"sent without credentials");

    let short = PresigningConfig::expires_in(Duration::from_secs(1)).unwrap();
    let stale = c
        .get_object()
        .bucket("demo")
        .key("presigned")
        .presigned(short)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(curl(env, &[stale.uri()]), "403", "expired presigned GET");
    let _ = std::fs::remove_file(file);
}
