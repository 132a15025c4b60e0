//! Storing a body: sealed chunks replicated a few at a time, each recorded
//! in its shard as soon as a majority holds it, and all of them kept
//! touched while the body streams in, so garbage collection never takes a
//! chunk whose manifest may still commit (see docs/design.md, "Chunk
//! garbage collection").

use super::objects::{Objects, CHUNK_SIZE, INLINE_MAX};
use crate::crypto::tenant_keys::TenantKeys;
use crate::crypto::Purpose;
use crate::shard::command::{Body, ChunkSpan};
use crate::shard::ShardError;
use crate::types::now_ms;
use bytes::{Bytes, BytesMut};
use futures::stream::{Stream, StreamExt};
use md5::{Digest, Md5};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Chunks of one upload being replicated at once.
const CHUNKS_IN_FLIGHT: usize = 2;

type Result<T> = std::result::Result<T, ShardError>;

/// A body stored as chunks or inline, with its MD5 and size.
pub struct Ingested {
    pub size: u64,
    pub md5_hex: String,
    /// Sealed, like everything in a manifest.
    pub body: Body,
    /// The oldest touch of its chunks; `None` for an inline body.
    pub touched_ms: Option<i64>,
}

/// The chunks of one body recorded so far, each with its last touch; the
/// tasks storing chunks add to it as they record them.
#[derive(Clone, Default)]
struct Touches(Arc<Mutex<Vec<(ChunkSpan, i64)>>>);

impl Touches {
    fn add(&self, span: ChunkSpan, stamp_ms: i64) {
        self.0.lock().unwrap().push((span, stamp_ms));
    }

    fn oldest(&self) -> Option<i64> {
        self.0.lock().unwrap().iter().map(|(_, t)| *t).min()
    }

    /// Touches every chunk recorded so far once the oldest touch is
    /// `retouch_ms` old: a slow body keeps the chunks it has sent.
    async fn keep_fresh(&self, objects: &Objects) -> Result<()> {
        let spans: Vec<ChunkSpan> = match self.oldest() {
            Some(t) if now_ms() - t >= objects.retouch_ms => self
                .0
                .lock()
                .unwrap()
                .iter()
                .map(|(s, _)| s.clone())
                .collect(),
            _ => return Ok(()),
        };
        let stamp_ms = objects.chunks.touch(&spans).await.map_err(collected)?;
        // Entries only ever go on the end: the first ones are those touched.
        for (_, t) in self.0.lock().unwrap().iter_mut().take(spans.len()) {
            *t = stamp_ms.max(*t);
        }
        Ok(())
    }
}

/// What a write whose chunks were collected under it answers.
pub fn collected(e: ShardError) -> ShardError {
    match e {
        ShardError::ChunksStale => ShardError::Unavailable(
            "the upload stalled longer than the garbage-collection grace and its chunks were collected; send it again".into(),
        ),
        e => e,
    }
}

impl Objects {
    /// Streams `body` into chunks (or inline), a few chunks in flight.
    /// `check` runs before the first chunk is written, so a request for a
    /// missing bucket costs no chunk writes; an inline body skips it, as the
    /// commit itself is refused atomically then.
    pub async fn ingest<S, C>(
        &self,
        mut body: S,
        keys: Arc<TenantKeys>,
        inline_ok: bool,
        check: C,
    ) -> Result<Ingested>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
        C: std::future::Future<Output = Result<()>>,
    {
        let mut check = Some(check);
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut buf = BytesMut::new();
        let mut pending = VecDeque::new();
        let mut spans = Vec::new();
        let touches = Touches::default();
        let mut look =
            tokio::time::interval(Duration::from_millis((self.retouch_ms / 4).max(100) as u64));
        loop {
            let piece = tokio::select! {
                piece = body.next() => piece,
                _ = look.tick() => {
                    touches.keep_fresh(self).await?;
                    continue;
                }
            };
            let Some(piece) = piece else { break };
            let piece = piece?;
            md5.update(&piece);
            size += piece.len() as u64;
            buf.extend_from_slice(&piece);
            while buf.len() >= CHUNK_SIZE {
                if let Some(c) = check.take() {
                    c.await?;
                }
                let chunk = buf.split_to(CHUNK_SIZE).freeze();
                pending.push_back(self.store_chunk(&keys, chunk, &touches));
                if pending.len() > CHUNKS_IN_FLIGHT {
                    spans.push(join(pending.pop_front()).await?);
                }
            }
        }
        let md5_hex = hex::encode(md5.finalize());
        if inline_ok && pending.is_empty() && spans.is_empty() && buf.len() <= INLINE_MAX {
            return Ok(Ingested {
                size,
                md5_hex,
                body: Body::Inline(keys.seal(Purpose::Inline, &buf)),
                touched_ms: None,
            });
        }
        if let Some(c) = check.take() {
            c.await?;
        }
        if !buf.is_empty() {
            pending.push_back(self.store_chunk(&keys, buf.freeze(), &touches));
        }
        while !pending.is_empty() {
            spans.push(join(pending.pop_front()).await?);
        }
        touches.keep_fresh(self).await?;
        Ok(Ingested {
            size,
            md5_hex,
            body: Body::Chunks(spans),
            touched_ms: touches.oldest(),
        })
    }

    /// Seals one chunk of content, replicates it and records it (adding
    /// it to `touches`), in the background.
    fn store_chunk(
        &self,
        keys: &Arc<TenantKeys>,
        plain: Bytes,
        touches: &Touches,
    ) -> tokio::task::JoinHandle<Result<ChunkSpan>> {
        let (chunks, keys, touches) = (self.chunks.clone(), keys.clone(), touches.clone());
        tokio::spawn(async move {
            // Taken before any copy exists: a record stamped later than a
            // file's age could outlive the file (see the orphan sweep).
            let stamp_ms = now_ms();
            let len = plain.len() as u64;
            let sealed = Bytes::from(keys.seal(Purpose::Chunk, &plain));
            // Only the sealed copy waits for the replicas.
            drop(plain);
            let id = chunks.replicate(sealed).await?;
            let span = ChunkSpan { id, len };
            chunks
                .record(std::slice::from_ref(&span), stamp_ms)
                .await
                .map_err(collected)?;
            touches.add(span.clone(), stamp_ms);
            Ok(span)
        })
    }
}

async fn join<T>(handle: Option<tokio::task::JoinHandle<Result<T>>>) -> Result<T> {
    handle
        .ok_or_else(|| ShardError::Internal("no pending chunk".into()))?
        .await
        .map_err(|e| ShardError::Internal(e.to_string()))?
}
