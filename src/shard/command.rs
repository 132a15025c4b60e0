//! What a shard's state machine stores and the commands that change it.
//!
//! Commands are replicated through the Raft log and applied on every replica
//! in log order, so applying one must depend only on the command and the
//! state before it: no clocks, no randomness, no I/O besides the tree.

use crate::crypto::tenant_keys::WrappedDek;
use crate::placement::Layout;
use crate::types::{ChunkId, WriteId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One chunk of an object's body, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpan {
    pub id: ChunkId,
    /// Bytes of object content this chunk holds.
    pub len: u64,
}

/// Where an object's bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Small objects live in the manifest itself: one Raft write, no chunk.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Larger ones are a list of chunks stored outside the log.
    Chunks(Vec<ChunkSpan>),
}

impl Body {
    /// The chunks it names; none for an inline body.
    pub fn chunks(&self) -> &[ChunkSpan] {
        match self {
            Body::Chunks(spans) => spans,
            Body::Inline(_) => &[],
        }
    }
}

/// What a client said about an object besides its bytes. Stored only
/// sealed with the tenant's DEK (see [`crate::crypto`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub content_type: String,
    /// `x-amz-meta-*` headers, names without the prefix.
    pub user_metadata: BTreeMap<String, String>,
}

/// An object's metadata and the location of its content. Inline bodies,
/// chunks and `meta` are sealed with the tenant's DEK; size and ETag are
/// kept in the clear for listings and conditionals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Bytes of plaintext content.
    pub size: u64,
    /// Unquoted: MD5 hex, or `md5-of-md5s-N` for multipart objects.
    pub etag: String,
    /// Sealed msgpack of [`ObjectMeta`].
    #[serde(with = "serde_bytes")]
    pub meta: Vec<u8>,
    pub modified_ms: i64,
    pub body: Body,
    /// The request that wrote this version: applying a write with the same
    /// id again answers as the first time and changes nothing. `None` in
    /// manifests written before ids existed.
    #[serde(default)]
    pub write_id: Option<WriteId>,
}

/// An ETag a conditional write names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ETagMatch {
    /// `*`: any current object.
    Any,
    /// One ETag, unquoted.
    ETag(String),
}

impl ETagMatch {
    fn matches(&self, current: &Manifest) -> bool {
        match self {
            ETagMatch::Any => true,
            ETagMatch::ETag(e) => *e == current.etag,
        }
    }
}

/// What a conditional write (S3's `If-Match` / `If-None-Match` on
/// PutObject and CompleteMultipartUpload) requires of the object it would
/// replace. The index shard checks it when it applies the write, so no
/// other write can slip in between the check and the write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Precondition {
    /// The object must exist and, unless `Any`, carry this ETag.
    #[serde(default)]
    pub if_match: Option<ETagMatch>,
    /// The object must not exist (`Any`), or must not carry this ETag.
    #[serde(default)]
    pub if_none_match: Option<ETagMatch>,
}

impl Precondition {
    /// True when there is nothing to check.
    pub fn is_none(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }

    /// Checks the precondition against the object stored now. As AWS S3
    /// answers: `If-Match` on a missing key is `NoSuchKey` (404); any other
    /// failure is `PreconditionFailed` (412).
    pub fn check(&self, current: Option<&Manifest>) -> Result<(), ShardError> {
        if let Some(wanted) = &self.if_match {
            let current = current.ok_or(ShardError::NoSuchKey)?;
            if !wanted.matches(current) {
                return Err(ShardError::PreconditionFailed);
            }
        }
        if let (Some(unwanted), Some(current)) = (&self.if_none_match, current) {
            if unwanted.matches(current) {
                return Err(ShardError::PreconditionFailed);
            }
        }
        Ok(())
    }
}

/// A multipart upload between Create and Complete/Abort.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    pub key: String,
    pub upload_id: String,
    /// Sealed msgpack of [`ObjectMeta`], handed to the object on Complete.
    #[serde(with = "serde_bytes")]
    pub meta: Vec<u8>,
    pub initiated_ms: i64,
}

/// One uploaded part; re-uploading a part number replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub etag: String,
    pub size: u64,
    pub modified_ms: i64,
    pub chunks: Vec<ChunkSpan>,
}

/// A chunk as its shard records it (`C` records): its stored size, and
/// when a write last named it (ms, the coordinator's clock); garbage
/// collection drops records unreferenced and untouched since its floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRecord {
    pub len: u64,
    pub touched_ms: i64,
}

/// A shard's garbage-collection floor (`G` record, ms since the epoch);
/// see `State::floor` and docs/design.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Floor {
    /// Chunks untouched since before this may be dropped; a manifest
    /// naming one, or a touch stamped before it, is refused.
    pub touched_ms: i64,
    /// A chunk record stamped before this is refused, and a file older
    /// than it with no record may be swept.
    pub recorded_ms: i64,
}

/// A multipart upload left incomplete, found by garbage collection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleUpload {
    pub tenant: String,
    pub bucket: String,
    pub key: String,
    pub upload_id: String,
}

/// Limits on what one tenant may store; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub bytes: Option<u64>,
    pub objects: Option<u64>,
}

/// A tenant as the meta shard stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub created_ms: i64,
    pub quota: Quota,
    /// Every DEK generation, oldest first; the last one seals new data.
    pub deks: Vec<WrappedDek>,
}

/// What one bucket holds: committed objects, plus the parts of uploads in
/// progress in `bytes`, since they occupy disk too; and in `garbage` the
/// chunked bytes its overwrites and deletes left to garbage collection,
/// which count toward the quota until collected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub objects: u64,
    #[serde(default)]
    pub garbage: u64,
}

impl Usage {
    /// The bytes that count toward a quota.
    pub fn stored(&self) -> u64 {
        self.bytes + self.garbage
    }
}

/// The room one write may use in its bucket: the tenant's quota and what
/// the tenant's other buckets held when the coordinator asked. The index
/// shard checks it atomically against the bucket's own usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub quota: Quota,
    pub elsewhere: Usage,
}

/// A bucket in its tenant's catalogue (meta shard, `B` records). Records
/// written before creation ids existed are a bare `created_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub created_ms: i64,
    /// The CreateBucket request that made it: the same request again
    /// succeeds, any other is told the bucket exists.
    #[serde(default)]
    pub creation: Option<WriteId>,
}

/// A bucket's object index (index shard, `I` records). Records written
/// before creation ids existed are empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// The CreateBucket request that opened it (see [`BucketRecord`]).
    #[serde(default)]
    pub creation: Option<WriteId>,
}

/// An access key and the tenant it authenticates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    pub tenant: String,
    pub secret_key: String,
}

/// A change to one shard's state, replicated through its Raft log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Meta shard: create a tenant if it does not exist (bootstrap).
    PutTenant {
        tenant: String,
        created_ms: i64,
        dek: WrappedDek,
    },
    /// Meta shard: create a tenant; fails with TenantExists if it does.
    CreateTenant {
        tenant: String,
        created_ms: i64,
        quota: Quota,
        dek: WrappedDek,
    },
    /// Meta shard: replace a tenant's quota.
    SetQuota { tenant: String, quota: Quota },
    /// Meta shard: add the next DEK generation (`tenant rotate-key`);
    /// refused unless it is exactly one past the newest.
    AddDek { tenant: String, dek: WrappedDek },
    /// Meta shard: replace one wrapped DEK by the same DEK wrapped under
    /// another master key, if it is still `old` (master key rotation).
    RewrapDek {
        tenant: String,
        old: WrappedDek,
        new: WrappedDek,
    },
    /// Meta shard: remove a tenant with its DEKs, access keys and bucket
    /// catalogue, leaving a tombstone until its indexes are collected.
    /// Returns the buckets it had.
    DeleteTenant { tenant: String },
    /// Meta shard: drop a deleted tenant's tombstone once collected.
    ForgetTenant { tenant: String },
    /// Index shard: remove up to `max` records of a deleted tenant's bucket
    /// (objects, uploads, parts, usage, the index itself). Returns
    /// `Exists(true)` while records remain.
    PurgeIndex {
        tenant: String,
        bucket: String,
        max: u32,
    },
    /// Meta shard: store an access key for a tenant.
    PutAccessKey { access_key: String, key: AccessKey },
    /// Meta shard: revoke an access key; fails with NoSuchAccessKey.
    RevokeAccessKey { access_key: String },
    /// Meta shard: add a bucket to its tenant's catalogue; fails with
    /// BucketExists unless it is there from the same `creation`.
    AddBucket {
        tenant: String,
        bucket: String,
        created_ms: i64,
        #[serde(default)]
        creation: Option<WriteId>,
    },
    /// Meta shard: drop a bucket from the catalogue.
    RemoveBucket { tenant: String, bucket: String },
    /// Index shard: open an empty object index; fails with BucketExists
    /// unless it was opened by the same `creation`.
    OpenIndex {
        tenant: String,
        bucket: String,
        #[serde(default)]
        creation: Option<WriteId>,
    },
    /// Index shard: close an index; fails with BucketNotEmpty unless empty.
    CloseIndex { tenant: String, bucket: String },
    /// Index shard: make `manifest` the current version of `key`, if
    /// `precondition` holds. Done already when the stored version has the
    /// manifest's `write_id` (a retry): answers success, changes nothing.
    PutObject {
        tenant: String,
        bucket: String,
        key: String,
        manifest: Manifest,
        /// Set when the tenant has a quota.
        limit: Option<Limit>,
        #[serde(default)]
        precondition: Precondition,
        /// The oldest touch of the chunks the manifest names (see
        /// `State::check_touched`); `None` when it names none.
        #[serde(default)]
        touched_ms: Option<i64>,
    },
    /// Index shard: remove `key` (no error when missing, as in S3).
    DeleteObject {
        tenant: String,
        bucket: String,
        key: String,
        /// Applied once per id, so a retry after an unknown outcome cannot
        /// delete a later write (entries logged before it had none).
        #[serde(default)]
        write_id: Option<WriteId>,
        #[serde(default)]
        requested_ms: i64,
    },
    CreateUpload {
        tenant: String,
        bucket: String,
        upload: Upload,
    },
    PutPart {
        tenant: String,
        bucket: String,
        key: String,
        upload_id: String,
        part_number: u32,
        part: Part,
        limit: Option<Limit>,
        /// As in `PutObject`.
        #[serde(default)]
        touched_ms: Option<i64>,
    },
    /// Index shard: turn the named parts into the object, atomically, if
    /// `precondition` holds. Done already when the stored object has this
    /// `write_id` (a retry): answers that object, changes nothing.
    CompleteUpload {
        tenant: String,
        bucket: String,
        key: String,
        upload_id: String,
        parts: Vec<(u32, String)>,
        modified_ms: i64,
        limit: Option<Limit>,
        #[serde(default)]
        write_id: Option<WriteId>,
        #[serde(default)]
        precondition: Precondition,
    },
    AbortUpload {
        tenant: String,
        bucket: String,
        key: String,
        upload_id: String,
        /// When it was asked (the garbage its parts become is dated so);
        /// 0 in entries logged before.
        #[serde(default)]
        requested_ms: i64,
    },
    /// Chunk shard: record chunks that a majority of replicas stored,
    /// touched at `stamp_ms` (taken before the first copy was written);
    /// refused below the floor's record mark. Entries logged before touch
    /// times have 0.
    AddChunks {
        chunks: Vec<(ChunkId, u64)>,
        #[serde(default)]
        stamp_ms: i64,
    },
    /// Chunk shard: mark recorded chunks as in use at `stamp_ms`, so a
    /// collection leaves them; fails with ChunksStale, changing nothing, if
    /// one is no longer recorded or the stamp is below the floor.
    TouchChunks { ids: Vec<ChunkId>, stamp_ms: i64 },
    /// Any shard: raise the collection floor to at least `floor`.
    RaiseFloor { floor: Floor },
    /// Index shard: stop counting the garbage buckets made before
    /// `before_ms`, which a collection has just freed.
    SettleGarbage { before_ms: i64 },
    /// Chunk shard: drop the records of the chunks in `ids` still untouched
    /// since `below_ms` (at most the floor); every replica deletes their
    /// files once applied. Returns `Dropped`.
    DropChunks { ids: Vec<ChunkId>, below_ms: i64 },
    /// Meta shard: replace the layout, if it is still at `expected_epoch`
    /// (0 when none was stored yet); `layout.epoch` must be the next one.
    SetLayout { expected_epoch: u64, layout: Layout },
    /// Meta shard: store a new rebalance; fails while another runs.
    StartRebalance { rebalance: Rebalance },
    /// Meta shard: record a running rebalance's progress, if the stored
    /// one is still at `expected_done` moves (so a coordinator that lost
    /// the meta leadership cannot overwrite its successor's progress); a
    /// cancellation asked for meanwhile is kept.
    UpdateRebalance {
        rebalance: Rebalance,
        expected_done: usize,
    },
    /// Meta shard: ask the running rebalance to stop once its moves under way are done.
    CancelRebalance,
}

/// A rebalance: its moves, carried out in order by whichever node leads
/// the meta shard, and how far it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebalance {
    /// When it started (ms since the epoch); names it.
    pub id: i64,
    pub moves: Vec<crate::placement::planner::Move>,
    /// Moves completed.
    pub done: usize,
    pub bytes_copied: u64,
    /// Average copy rate to keep under, bytes per second; 0 for no limit.
    pub rate: u64,
    /// Stop once the moves under way are done.
    pub cancel: bool,
    pub state: RebalanceState,
    pub updated_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RebalanceState {
    Running,
    Done,
    Cancelled,
    Failed(String),
}

impl Rebalance {
    pub fn running(&self) -> bool {
        self.state == RebalanceState::Running
    }
}

impl Command {
    /// The id of the request this command carries out, and when it was
    /// made, for commands the state machine applies once per request
    /// however often they are proposed (see `State::apply_once`).
    pub fn write_id(&self) -> Option<(WriteId, i64)> {
        match self {
            Command::PutObject { manifest, .. } => {
                manifest.write_id.map(|id| (id, manifest.modified_ms))
            }
            Command::CompleteUpload {
                write_id,
                modified_ms,
                ..
            } => write_id.map(|id| (id, *modified_ms)),
            Command::DeleteObject {
                write_id,
                requested_ms,
                ..
            } => write_id.map(|id| (id, *requested_ms)),
            _ => None,
        }
    }

    /// True for a client write that adds data, which a node whose disk is
    /// below its reserve refuses to lead (see `space`); deletes, chunk
    /// records and cluster bookkeeping go on.
    pub fn adds_data(&self) -> bool {
        matches!(
            self,
            Command::PutObject { .. }
                | Command::PutPart { .. }
                | Command::CreateUpload { .. }
                | Command::CompleteUpload { .. }
        )
    }
}

/// A linearizable read of one shard's state, run on its leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    AccessKey {
        access_key: String,
    },
    /// Meta shard: every tenant's record.
    Tenants,
    /// Meta shard: tenants deleted whose data is still being collected.
    Tombstones,
    /// Meta shard: one tenant's record.
    Tenant {
        tenant: String,
    },
    /// Meta shard: the access key ids of one tenant.
    AccessKeys {
        tenant: String,
    },
    Buckets {
        tenant: String,
    },
    IndexExists {
        tenant: String,
        bucket: String,
    },
    /// Index shard: what one bucket holds.
    Usage {
        tenant: String,
        bucket: String,
    },
    Object {
        tenant: String,
        bucket: String,
        key: String,
    },
    List {
        tenant: String,
        bucket: String,
        prefix: String,
        delimiter: String,
        start_after: String,
        max_keys: u32,
    },
    Upload {
        tenant: String,
        bucket: String,
        key: String,
        upload_id: String,
    },
    Parts {
        tenant: String,
        bucket: String,
        upload_id: String,
        after: u32,
        max: u32,
    },
    Uploads {
        tenant: String,
        bucket: String,
        prefix: String,
        key_marker: String,
        upload_id_marker: String,
        max: u32,
    },
    /// Meta shard: the stored layout, if any change was ever made.
    Layout,
    /// Meta shard: the latest rebalance, running or finished.
    Rebalance,
    /// Index shard: chunk ids named by up to `max` object and part records
    /// after the record key `after`. Returns `ChunkIds`.
    ChunkRefs {
        #[serde(with = "serde_bytes")]
        after: Vec<u8>,
        max: u32,
    },
    /// Chunk shard: up to `max` chunk records after `after`.
    ChunkRecords {
        after: Option<ChunkId>,
        max: u32,
    },
    /// Chunk shard: which of `ids` are recorded, and the floor.
    Recorded {
        ids: Vec<ChunkId>,
    },
    /// Index shard: up to `max` uploads begun before `before_ms`.
    StaleUploads {
        before_ms: i64,
        max: u32,
    },
}

/// What a listing shows of an object: read out of its manifest without
/// its chunk list (decoding skips the fields not named here), so a page
/// of 1,000 objects of 100 GiB each stays small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub size: u64,
    pub etag: String,
    pub modified_ms: i64,
}

/// One page of a listing.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListPage {
    pub objects: Vec<(String, Listed)>,
    pub common_prefixes: Vec<String>,
    pub truncated: bool,
    /// The last key or prefix in this page.
    pub next_marker: String,
}

/// What a command or query returns on success.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    Done,
    AccessKey(Option<AccessKey>),
    Buckets(Vec<(String, i64)>),
    Tenants(Vec<(String, TenantRecord)>),
    /// Deleted tenants still being collected, with their buckets.
    Tombstones(Vec<(String, Vec<String>)>),
    Tenant(Option<TenantRecord>),
    Usage(Usage),
    AccessKeys(Vec<String>),
    Exists(bool),
    Object(Option<Manifest>),
    List(ListPage),
    Upload(Option<Upload>),
    Parts {
        parts: Vec<(u32, Part)>,
        truncated: bool,
    },
    Uploads {
        uploads: Vec<Upload>,
        truncated: bool,
    },
    Layout(Option<Layout>),
    Rebalance(Option<Rebalance>),
    /// How far a node's copy of a shard's log reaches on the leader's
    /// books, against the leader's last entry.
    Progress {
        matched: u64,
        last: u64,
    },
    /// Chunks dropped, with their stored sizes.
    Dropped(Vec<(ChunkId, u64)>),
    ChunkIds {
        ids: Vec<ChunkId>,
        /// Where the next page starts, if there may be one.
        #[serde(with = "serde_bytes")]
        next: Option<Vec<u8>>,
    },
    ChunkRecords(Vec<(ChunkId, ChunkRecord)>),
    Recorded {
        ids: Vec<ChunkId>,
        floor: Floor,
    },
    StaleUploads(Vec<StaleUpload>),
}

/// A change to a shard's Raft group, run on its leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MembershipOp {
    /// Starts replicating to `node`, at `addr`, as a non-voting learner.
    /// The address travels with the request: the leader may not have
    /// adopted the layout that added the node yet.
    AddLearner { node: u64, addr: String },
    /// How far `node` has caught up.
    Progress { node: u64 },
    /// Makes exactly `voters` the voters (joint consensus underneath);
    /// members left out, learners included, leave the group.
    SetVoters { voters: Vec<u64> },
    /// Removes `node` from the group if it is a learner (refused if it is a
    /// voter; done already if it is neither).
    DropLearner { node: u64 },
    /// Hands leadership to `node` (a voter), for balancing leaders.
    TransferLeader { node: u64 },
    /// Sent by a leader handing over to this node: start an election now.
    Elect,
}

/// Why a shard call failed. Variants before `NotLeader` are deterministic
/// outcomes of applying a command (every replica reaches the same one);
/// the rest describe the cluster, not the data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ShardError {
    #[error("the bucket does not exist")]
    NoSuchBucket,
    #[error("the key does not exist")]
    NoSuchKey,
    #[error("the bucket you tried to delete is not empty")]
    BucketNotEmpty,
    #[error("the bucket already exists")]
    BucketExists,
    #[error("the tenant already exists")]
    TenantExists,
    #[error("the tenant was deleted and its data is still being collected; try again later")]
    TenantBeingDeleted,
    #[error("the tenant does not exist")]
    NoSuchTenant,
    #[error("the access key does not exist")]
    NoSuchAccessKey,
    #[error("the upload does not exist")]
    NoSuchUpload,
    #[error("{0}")]
    InvalidPart(String),
    #[error("the list of parts was not in ascending order")]
    InvalidPartOrder,
    #[error("{0}")]
    EntityTooSmall(String),
    #[error("the Content-MD5 you specified did not match what we received")]
    BadDigest,
    #[error("the requested range is not satisfiable")]
    InvalidRange,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    QuotaExceeded(String),
    /// The node's disk is below its reserve (see `space`); never the
    /// outcome of applying a command.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("the layout changed meanwhile (now at epoch {now}); try again")]
    LayoutChanged { now: u64 },
    /// A write naming chunks untouched since a garbage collection began
    /// (see `State::check_touched`): touch them again, then retry.
    #[error("the write's chunks were last touched before a garbage collection began")]
    ChunksStale,
    /// A conditional write whose `If-Match` / `If-None-Match` did not hold.
    #[error("at least one of the preconditions you specified did not hold")]
    PreconditionFailed,
    #[error("not the leader of this shard")]
    NotLeader { leader: Option<u64> },
    /// A chunk sent to a node whose layout does not list it as a holder of
    /// the chunk's shard (it was moved away, or the sender's layout is
    /// older or newer than the receiver's).
    #[error("node {node} does not hold shard {shard} in its layout (epoch {epoch})")]
    NotHolder { node: u64, shard: u32, epoch: u64 },
    #[error("shard unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ShardError {
    /// True when every replica applying the same command reaches this error,
    /// so it may be returned to the client; anything else must not change
    /// state on any replica.
    pub fn is_deterministic(&self) -> bool {
        !matches!(
            self,
            ShardError::NotLeader { .. }
                | ShardError::NotHolder { .. }
                | ShardError::Unavailable(_)
                | ShardError::Internal(_)
                | ShardError::InsufficientStorage(_)
        )
    }
}

/// The response type of the state machine, as returned through openraft.
pub type Reply = Result<Value, ShardError>;

/// msgpack helpers shared by the wire and the trees.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("serializing plain data cannot fail")
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ShardError> {
    from_msgpack(bytes).map_err(|e| ShardError::Internal(format!("decoding: {e}")))
}

/// Deepest nesting a msgpack value may have: far above any of our types,
/// far below what overflows a thread's stack when a hostile peer's
/// message nests arrays inside a field that decoding skips.
const MAX_DEPTH: usize = 64;

/// Decodes msgpack from a peer or a disk, refusing nesting deeper than
/// [`MAX_DEPTH`] (rmp-serde's default of 1024 overflows a 2 MiB stack).
pub fn from_msgpack<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}
