//! The object coordinator: how a node turns one S3 operation into chunk
//! writes and shard commands.
//!
//! A PUT streams the body into chunks of [`CHUNK_SIZE`], replicates each to
//! a majority of its chunk shard (a few in flight at once, so memory stays
//! bounded whatever the object's size), records them in their shards' logs,
//! and only then commits the manifest to the bucket's index shard. Bodies up
//! to [`INLINE_MAX`] skip the chunks and ride in the manifest. Until the
//! manifest commits, nothing of the new object is visible; a failed upload
//! leaves only unreferenced chunks for the collector.
//!
//! This is also where tenant data is sealed (see [`crate::crypto`]): every
//! chunk, inline body and metadata record leaves here encrypted with the
//! tenant's current DEK, and reads open them again on the way out.

use super::chunks::Chunks;
use super::ingest::{collected, Ingested};
use super::keys::KeyCache;
use crate::crypto::tenant_keys::TenantKeys;
use crate::crypto::Purpose;
use crate::shard::command::{
    decode, encode, Body, ChunkSpan, Limit, ListPage, Manifest, ObjectMeta, Part, Precondition,
    Quota, Upload, Usage,
};
use crate::shard::{Command, Query, ShardError, Value};
use crate::types::{now_ms, ShardId, WriteId};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Size of one chunk of object content.
pub const CHUNK_SIZE: usize = 4 * 1024 * 1024;
/// Bodies up to this size are stored inside their manifest.
pub const INLINE_MAX: usize = 64 * 1024;
/// Chunks of one download read ahead.
const READ_AHEAD: usize = 2;
/// S3's largest part number.
pub const MAX_PART_NUMBER: u32 = 10_000;

type Result<T> = std::result::Result<T, ShardError>;

/// What a new object or part is called and described as.
pub struct Target {
    pub tenant: String,
    pub bucket: String,
    pub key: String,
    pub content_type: String,
    pub user_metadata: BTreeMap<String, String>,
    /// `(upload_id, part_number)` for UploadPart.
    pub part: Option<(String, u32)>,
    /// Names the request in the manifest, so a retried commit is
    /// recognised (unused for parts).
    pub write_id: WriteId,
    /// What the object being replaced must be (PutObject only).
    pub precondition: Precondition,
}

/// Coordinates object operations from this node.
#[derive(Clone)]
pub struct Objects {
    pub chunks: Chunks,
    pub keys: Arc<KeyCache>,
    /// A write touches its chunks again once they are this old: half the
    /// garbage-collection grace.
    pub retouch_ms: i64,
    pub gc: Arc<super::gc::Gc>,
    pub scrub: Arc<super::scrub::Scrub>,
}

fn unexpected(v: Value) -> ShardError {
    ShardError::Internal(format!("unexpected reply {v:?}"))
}

impl Objects {
    fn host(&self) -> &crate::shard::ShardHost {
        &self.chunks.host
    }

    fn index(&self, tenant: &str, bucket: &str) -> ShardId {
        self.host().layout().shard_for_bucket(tenant, bucket)
    }

    pub async fn access_key(
        &self,
        access_key: &str,
    ) -> Result<Option<crate::shard::command::AccessKey>> {
        let q = Query::AccessKey {
            access_key: access_key.to_string(),
        };
        match self.host().query(ShardId::META, &q).await? {
            Value::AccessKey(k) => Ok(k),
            v => Err(unexpected(v)),
        }
    }

    pub async fn list_buckets(&self, tenant: &str) -> Result<Vec<(String, i64)>> {
        let q = Query::Buckets {
            tenant: tenant.to_string(),
        };
        match self.host().query(ShardId::META, &q).await? {
            Value::Buckets(b) => Ok(b),
            v => Err(unexpected(v)),
        }
    }

    /// Opens the index first, then adds the catalogue entry: a crash in
    /// between leaves an index that a retry adopts. Both carry `creation`,
    /// so the same request applied twice (a retried proposal) succeeds
    /// while another request for the same name is told it exists.
    pub async fn create_bucket(&self, tenant: &str, bucket: &str, creation: WriteId) -> Result<()> {
        let (t, b) = (tenant.to_string(), bucket.to_string());
        let open = Command::OpenIndex {
            tenant: t.clone(),
            bucket: b.clone(),
            creation: Some(creation),
        };
        match self.host().propose(self.index(tenant, bucket), &open).await {
            Ok(_) | Err(ShardError::BucketExists) => {}
            Err(e) => return Err(e),
        }
        let add = Command::AddBucket {
            tenant: t,
            bucket: b,
            created_ms: now_ms(),
            creation: Some(creation),
        };
        self.host().propose(ShardId::META, &add).await.map(|_| ())
    }

    /// Closes the index (refused unless empty), then drops the catalogue
    /// entry.
    pub async fn delete_bucket(&self, tenant: &str, bucket: &str) -> Result<()> {
        let close = Command::CloseIndex {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
        };
        let closed = self
            .host()
            .propose(self.index(tenant, bucket), &close)
            .await;
        if let Err(e) = &closed {
            if *e != ShardError::NoSuchBucket {
                return closed.map(|_| ());
            }
        }
        let remove = Command::RemoveBucket {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
        };
        self.host().propose(ShardId::META, &remove).await?;
        closed.map(|_| ())
    }

    pub async fn head_bucket(&self, tenant: &str, bucket: &str) -> Result<()> {
        let q = Query::IndexExists {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::Exists(true) => Ok(()),
            Value::Exists(false) => Err(ShardError::NoSuchBucket),
            v => Err(unexpected(v)),
        }
    }

    /// Seals what the client said about an object.
    fn seal_meta(
        keys: &TenantKeys,
        content_type: String,
        user_metadata: BTreeMap<String, String>,
    ) -> Vec<u8> {
        let meta = ObjectMeta {
            content_type,
            user_metadata,
        };
        keys.seal(Purpose::Metadata, &encode(&meta))
    }

    /// Opens an object's content type and user metadata.
    pub async fn open_meta(&self, tenant: &str, sealed: &[u8]) -> Result<ObjectMeta> {
        let generation = crate::crypto::generation_of(sealed).map_err(sealed_err)?;
        let keys = self.tenant_keys(tenant, Some(generation)).await?;
        decode(&keys.open(Purpose::Metadata, sealed).map_err(sealed_err)?)
    }

    /// The room a write to `bucket` may take, when the tenant has a quota:
    /// what the tenant's other buckets hold, read now.
    pub async fn limit_for(&self, tenant: &str, bucket: &str) -> Result<Option<Limit>> {
        let quota = self.tenant_quota(tenant).await?;
        if quota == Quota::default() {
            return Ok(None);
        }
        let mut elsewhere = Usage::default();
        for (other, usage) in self.usage_by_bucket(tenant).await? {
            if other != bucket {
                elsewhere.bytes += usage.bytes;
                elsewhere.objects += usage.objects;
                elsewhere.garbage += usage.garbage;
            }
        }
        Ok(Some(Limit { quota, elsewhere }))
    }

    /// Stores an ingested body as an object or a part and returns its ETag.
    pub async fn commit(
        &self,
        target: Target,
        keys: &TenantKeys,
        data: Ingested,
    ) -> Result<(String, u64, i64)> {
        let modified_ms = now_ms();
        let shard = self.index(&target.tenant, &target.bucket);
        let limit = self.limit_for(&target.tenant, &target.bucket).await?;
        let spans = data.body.chunks().to_vec();
        let touched_ms = data.touched_ms;
        let cmd = match target.part {
            Some((upload_id, part_number)) => {
                let Body::Chunks(chunks) = data.body else {
                    return Err(ShardError::Internal("parts are never inline".into()));
                };
                Command::PutPart {
                    tenant: target.tenant,
                    bucket: target.bucket,
                    key: target.key,
                    upload_id,
                    part_number,
                    part: Part {
                        etag: data.md5_hex.clone(),
                        size: data.size,
                        modified_ms,
                        chunks,
                    },
                    limit,
                    touched_ms,
                }
            }
            None => Command::PutObject {
                tenant: target.tenant,
                bucket: target.bucket,
                key: target.key,
                manifest: Manifest {
                    size: data.size,
                    etag: data.md5_hex.clone(),
                    meta: Self::seal_meta(keys, target.content_type, target.user_metadata),
                    modified_ms,
                    body: data.body,
                    write_id: Some(target.write_id),
                },
                limit,
                precondition: target.precondition,
                touched_ms,
            },
        };
        self.propose_touched(shard, cmd, &spans).await?;
        Ok((data.md5_hex, data.size, modified_ms))
    }

    /// Proposes a write naming the chunks `spans`; if a collection began
    /// since they were last touched, touches them and proposes it again.
    async fn propose_touched(
        &self,
        shard: ShardId,
        mut cmd: Command,
        spans: &[ChunkSpan],
    ) -> Result<Value> {
        match self.host().propose(shard, &cmd).await {
            Err(ShardError::ChunksStale) => {
                let stamp = self.chunks.touch(spans).await.map_err(collected)?;
                if let Command::PutObject { touched_ms, .. } | Command::PutPart { touched_ms, .. } =
                    &mut cmd
                {
                    *touched_ms = Some(stamp);
                }
                self.host().propose(shard, &cmd).await.map_err(collected)
            }
            reply => reply,
        }
    }

    /// Checks that the bucket (and upload, for a part) exist, and that a
    /// body of `declared_size` bytes fits the tenant's quota, before any
    /// byte is stored, so a bad request costs no chunk writes. The commit
    /// checks the quota again, atomically.
    pub async fn check_target(&self, target: &Target, declared_size: Option<u64>) -> Result<()> {
        if let Some(size) = declared_size {
            if let Some(q) = self.tenant_quota(&target.tenant).await?.bytes {
                let usage = self.usage_by_bucket(&target.tenant).await?;
                let stored: u64 = usage.iter().map(|(_, u)| u.stored()).sum();
                let garbage: u64 = usage.iter().map(|(_, u)| u.garbage).sum();
                // A PUT sent again after it landed already counts in
                // `stored`: the index shard answers it as the first time.
                if stored + size > q && !self.already_written(target).await? {
                    let of_which = match garbage {
                        0 => String::new(),
                        g => format!(" ({g} of them freed and awaiting garbage collection)"),
                    };
                    return Err(ShardError::QuotaExceeded(format!(
                        "the tenant's quota of {q} bytes would be exceeded: {stored} bytes stored{of_which}, this request adds {size}"
                    )));
                }
            }
        }
        match &target.part {
            None if target.precondition.is_none() => {
                self.head_bucket(&target.tenant, &target.bucket).await
            }
            // Only to spare the chunk writes of a write bound to fail: the
            // index shard checks again when it applies the manifest.
            None => {
                let current = match self
                    .manifest(&target.tenant, &target.bucket, &target.key)
                    .await
                {
                    Ok(m) => Some(m),
                    Err(ShardError::NoSuchKey) => None,
                    Err(e) => return Err(e),
                };
                if current.as_ref().and_then(|m| m.write_id) == Some(target.write_id) {
                    return Ok(()); // this request, sent again after it landed
                }
                target.precondition.check(current.as_ref())
            }
            Some((upload_id, number)) => {
                if *number == 0 || *number > MAX_PART_NUMBER {
                    return Err(ShardError::InvalidArgument(format!(
                        "part number must be between 1 and {MAX_PART_NUMBER}"
                    )));
                }
                self.upload(&target.tenant, &target.bucket, &target.key, upload_id)
                    .await
                    .map(|_| ())
            }
        }
    }

    /// Whether the object at `target` is the one this very request wrote
    /// (a PutObject sent again after its first send landed).
    async fn already_written(&self, target: &Target) -> Result<bool> {
        if target.part.is_some() {
            return Ok(false);
        }
        match self
            .manifest(&target.tenant, &target.bucket, &target.key)
            .await
        {
            Ok(m) => Ok(m.write_id == Some(target.write_id)),
            Err(ShardError::NoSuchKey) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn manifest(&self, tenant: &str, bucket: &str, key: &str) -> Result<Manifest> {
        let q = Query::Object {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::Object(Some(m)) => Ok(m),
            Value::Object(None) => Err(ShardError::NoSuchKey),
            v => Err(unexpected(v)),
        }
    }

    /// The bytes `[start, end)` of an object, read ahead a few chunks and
    /// opened with the tenant's keys.
    pub async fn read(
        &self,
        tenant: &str,
        manifest: &Manifest,
        start: u64,
        end: u64,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let keys = self.tenant_keys(tenant, None).await?;
        Ok(match &manifest.body {
            Body::Inline(sealed) => {
                // Sealed maybe under a generation newer than `keys` knows.
                let generation = crate::crypto::generation_of(sealed).map_err(sealed_err)?;
                let keys = self.tenant_keys(tenant, Some(generation)).await?;
                let plain = keys.open(Purpose::Inline, sealed).map_err(sealed_err)?;
                let slice = Bytes::from(plain).slice(start as usize..end as usize);
                futures::stream::once(async move { Ok(slice) }).boxed()
            }
            Body::Chunks(spans) => {
                let mut pieces = Vec::new();
                let mut offset = 0u64;
                for span in spans {
                    let (lo, hi) = (offset, offset + span.len);
                    offset = hi;
                    if hi <= start || lo >= end {
                        continue;
                    }
                    let from = start.max(lo) - lo;
                    let to = end.min(hi) - lo;
                    pieces.push((span.id, from as usize, to as usize));
                }
                let this = self.clone();
                let tenant = tenant.to_string();
                futures::stream::iter(pieces)
                    .map(move |(id, from, to)| {
                        let (this, tenant, keys) = (this.clone(), tenant.clone(), keys.clone());
                        async move {
                            let sealed = this.chunks.fetch(id).await?;
                            let generation =
                                crate::crypto::generation_of(&sealed).map_err(sealed_err)?;
                            let keys = if keys.holds(generation) {
                                keys
                            } else {
                                this.tenant_keys(&tenant, Some(generation)).await?
                            };
                            let plain = keys.open(Purpose::Chunk, &sealed).map_err(sealed_err)?;
                            Ok(Bytes::from(plain).slice(from..to))
                        }
                    })
                    .buffered(READ_AHEAD)
                    .boxed()
            }
        })
    }

    /// Deletes `key`; `write_id` names the client request (see
    /// `Command::DeleteObject`).
    pub async fn delete(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        write_id: WriteId,
    ) -> Result<()> {
        let cmd = Command::DeleteObject {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            write_id: Some(write_id),
            requested_ms: now_ms(),
        };
        self.host()
            .propose(self.index(tenant, bucket), &cmd)
            .await
            .map(|_| ())
    }

    /// Copies an object: chunks are shared, only the manifest is new. It
    /// names `write_id`, not the source's, so a copy onto the source
    /// itself is a new write and its retry is recognised.
    pub async fn copy(
        &self,
        tenant: &str,
        src: (&str, &str),
        dst: (&str, &str),
        replace: Option<(String, BTreeMap<String, String>)>,
        write_id: WriteId,
    ) -> Result<(String, u64, i64)> {
        let mut manifest = self.manifest(tenant, src.0, src.1).await?;
        if let Some((content_type, user_metadata)) = replace {
            let keys = self.tenant_keys(tenant, None).await?;
            manifest.meta = Self::seal_meta(&keys, content_type, user_metadata);
        }
        // The source may be deleted meanwhile: touched, its chunks stay a
        // grace period, and the copy's commit keeps them for good.
        let spans = manifest.body.chunks().to_vec();
        let touched_ms = match spans.is_empty() {
            true => None,
            false => Some(self.chunks.touch(&spans).await.map_err(|e| match e {
                ShardError::ChunksStale => ShardError::NoSuchKey,
                e => e,
            })?),
        };
        manifest.modified_ms = now_ms();
        manifest.write_id = Some(write_id);
        let reply = (manifest.etag.clone(), manifest.size, manifest.modified_ms);
        let cmd = Command::PutObject {
            tenant: tenant.to_string(),
            bucket: dst.0.to_string(),
            key: dst.1.to_string(),
            manifest,
            limit: self.limit_for(tenant, dst.0).await?,
            precondition: Precondition::default(),
            touched_ms,
        };
        self.propose_touched(self.index(tenant, dst.0), cmd, &spans)
            .await?;
        Ok(reply)
    }

    pub async fn list(
        &self,
        tenant: &str,
        bucket: &str,
        prefix: &str,
        delimiter: &str,
        start_after: &str,
        max_keys: u32,
    ) -> Result<ListPage> {
        let q = Query::List {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            delimiter: delimiter.to_string(),
            start_after: start_after.to_string(),
            max_keys,
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::List(page) => Ok(page),
            v => Err(unexpected(v)),
        }
    }

    pub async fn create_upload(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        content_type: String,
        user_metadata: BTreeMap<String, String>,
    ) -> Result<String> {
        let upload_id = hex::encode(rand::random::<[u8; 16]>());
        let keys = self.tenant_keys(tenant, None).await?;
        let cmd = Command::CreateUpload {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            upload: Upload {
                key: key.to_string(),
                upload_id: upload_id.clone(),
                meta: Self::seal_meta(&keys, content_type, user_metadata),
                initiated_ms: now_ms(),
            },
        };
        self.host()
            .propose(self.index(tenant, bucket), &cmd)
            .await?;
        Ok(upload_id)
    }

    pub async fn upload(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Upload> {
        let q = Query::Upload {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::Upload(Some(u)) => Ok(u),
            Value::Upload(None) => Err(ShardError::NoSuchUpload),
            v => Err(unexpected(v)),
        }
    }

    /// Completes an upload as the object `write_id` names, if
    /// `precondition` holds; a retry of the same request that already
    /// committed answers the object it made.
    pub async fn complete_upload(
        &self,
        upload: (&str, &str, &str, &str),
        parts: Vec<(u32, String)>,
        write_id: WriteId,
        precondition: Precondition,
    ) -> Result<Manifest> {
        let (tenant, bucket, key, upload_id) = upload;
        let cmd = Command::CompleteUpload {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            parts,
            modified_ms: now_ms(),
            limit: self.limit_for(tenant, bucket).await?,
            write_id: Some(write_id),
            precondition,
        };
        match self
            .host()
            .propose(self.index(tenant, bucket), &cmd)
            .await?
        {
            Value::Object(Some(m)) => Ok(m),
            v => Err(unexpected(v)),
        }
    }

    pub async fn abort_upload(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<()> {
        let cmd = Command::AbortUpload {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            requested_ms: now_ms(),
        };
        self.host()
            .propose(self.index(tenant, bucket), &cmd)
            .await
            .map(|_| ())
    }

    pub async fn list_parts(
        &self,
        tenant: &str,
        bucket: &str,
        key: &str,
        upload_id: &str,
        after: u32,
        max: u32,
    ) -> Result<(Vec<(u32, Part)>, bool)> {
        self.upload(tenant, bucket, key, upload_id).await?;
        let q = Query::Parts {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            upload_id: upload_id.to_string(),
            after,
            max,
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::Parts { parts, truncated } => Ok((parts, truncated)),
            v => Err(unexpected(v)),
        }
    }

    pub async fn list_uploads(
        &self,
        tenant: &str,
        bucket: &str,
        prefix: &str,
        key_marker: &str,
        upload_id_marker: &str,
        max: u32,
    ) -> Result<(Vec<Upload>, bool)> {
        let q = Query::Uploads {
            tenant: tenant.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            key_marker: key_marker.to_string(),
            upload_id_marker: upload_id_marker.to_string(),
            max,
        };
        match self.host().query(self.index(tenant, bucket), &q).await? {
            Value::Uploads { uploads, truncated } => Ok((uploads, truncated)),
            v => Err(unexpected(v)),
        }
    }
}

/// A sealed value that does not open is damage or a key problem, never
/// the client's fault.
fn sealed_err(e: crate::crypto::CryptoError) -> ShardError {
    ShardError::Internal(format!("opening stored data: {e}"))
}
