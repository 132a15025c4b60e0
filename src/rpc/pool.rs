//! Connections to nodes: a few HTTP/2 connections per node for ordinary
//! calls, handed out in turn, and one more per node for Raft.
//!
//! One connection per node made every call to that node share one fate:
//! an h2 GOAWAY (the server's reset-stream guard, a restart) failed every
//! call in flight on it, and one large transfer using up the connection's
//! flow-control window stalled every other call behind it, Raft
//! heartbeats included, until elections timed out. So ordinary calls are
//! spread over [`CONNECTIONS_PER_NODE`] connections (one failure costs a
//! fraction of the calls in flight, which the gateway then retries), and
//! Raft messages have a connection of their own ([`Pool::raft_client`]),
//! where chunk transfers never queue in front of heartbeats and votes.
//!
//! Every connection is lazy (opened on its first call, reopened after a
//! failure by tonic) and authenticates both ends with the cluster CA.

use super::failure::CallKind;
use super::{NodeClient, MAX_MESSAGE};
use crate::config::TlsFiles;
use crate::shard::ShardError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Ordinary connections to each node: enough that one GOAWAY or stalled
/// window hits a third of the calls, few enough to stay cheap on 2 cores.
pub const CONNECTIONS_PER_NODE: usize = 3;

/// Longest a connection to a node may take, TCP and TLS together. A paused
/// node's kernel still completes TCP handshakes, so this is how long a
/// call to it waits before it is sent elsewhere.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A ping after half a second without a frame, idle or not: a paused or
/// cut-off node is found within [`KEEPALIVE_INTERVAL`] plus
/// [`KEEPALIVE_TIMEOUT`], about when its shards have elected new leaders
/// (see `config::RaftTuning`), and the calls stuck on it fail over (reads,
/// and writes a node may send again) instead of waiting out the client's
/// patience.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// A ping is answered by the peer's HTTP/2 connection task, not by a
/// handler, so slow requests do not delay it; the 30-minute soak at
/// saturation on two cores is the evidence that a second is room enough.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// A 4 MiB chunk per stream per round trip, without waiting on updates.
const STREAM_WINDOW: u32 = 4 << 20;
/// Four chunks in flight per connection before senders wait.
const CONNECTION_WINDOW: u32 = 16 << 20;

/// Lazily connected, shared channels to nodes, by address.
pub struct Pool {
    files: TlsFiles,
    state: Mutex<PoolState>,
}

struct PoolState {
    tls: Arc<rustls::ClientConfig>,
    /// Ordinary connections, by node, and whose turn is next.
    nodes: HashMap<SocketAddr, (Vec<Channel>, usize)>,
    /// The Raft connection of each node.
    raft: HashMap<SocketAddr, Channel>,
}

impl Pool {
    pub fn new(tls: &TlsFiles) -> anyhow::Result<Pool> {
        Ok(Pool {
            state: Mutex::new(PoolState {
                tls: crate::tls::rpc_client_config(tls)?,
                nodes: HashMap::new(),
                raft: HashMap::new(),
            }),
            files: tls.clone(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the certificate files again; channels opened from now on
    /// present the new identity, while calls in flight finish on the old.
    /// A bad pair is refused and the old one stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let tls = crate::tls::rpc_client_config(&self.files)?;
        let mut state = self.state();
        state.tls = tls;
        state.nodes.clear();
        state.raft.clear();
        Ok(())
    }

    /// The next of the node's ordinary connections, in turn.
    pub fn channel(&self, addr: SocketAddr) -> Result<NodeChannel, ShardError> {
        let mut state = self.state();
        if !state.nodes.contains_key(&addr) {
            let channels = (0..CONNECTIONS_PER_NODE)
                .map(|_| connect_lazy(addr, &state.tls))
                .collect::<Result<Vec<_>, _>>()?;
            state.nodes.insert(addr, (channels, 0));
        }
        let (channels, next) = state
            .nodes
            .get_mut(&addr)
            .expect("inserted above if missing");
        let channel = channels[*next % channels.len()].clone();
        *next = next.wrapping_add(1);
        Ok(NodeChannel::new(channel))
    }

    /// A client for the node at `addr` on the next of its ordinary
    /// connections; connects on first use and reconnects by itself.
    pub fn client(&self, addr: SocketAddr) -> Result<NodeClient, ShardError> {
        Ok(client_of(self.channel(addr)?))
    }

    /// A client on the node's Raft connection, which carries nothing else,
    /// so heartbeats and votes never wait behind chunks and client calls.
    pub fn raft_client(&self, addr: SocketAddr) -> Result<NodeClient, ShardError> {
        let mut state = self.state();
        let channel = match state.raft.get(&addr) {
            Some(c) => c.clone(),
            None => {
                let c = connect_lazy(addr, &state.tls)?;
                state.raft.insert(addr, c.clone());
                c
            }
        };
        Ok(client_of(NodeChannel::new(channel)))
    }
}

/// A client on `channel`, allowed messages up to [`MAX_MESSAGE`].
pub fn client_of(channel: NodeChannel) -> NodeClient {
    NodeClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// One lazily opened HTTP/2 connection to the node at `addr`.
fn connect_lazy(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Result<Channel, ShardError> {
    // TLS is ours (rustls, node certificates only), so tonic speaks
    // plain HTTP/2 over the stream the connector hands it.
    let connector = NodeConnector {
        addr,
        tls: tokio_rustls::TlsConnector::from(tls.clone()),
    };
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ShardError::Internal(format!("endpoint {addr}: {e}")))?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        // Idle connections are pinged too, so a dead one is replaced
        // before a call is sent into it.
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .connect_with_connector_lazy(connector))
}

/// What every [`NodeClient`] sends through: one connection to a node,
/// which can note the kind of the calls made (see [`NodeChannel::noting`]).
///
/// The note exists because a caller that retries gets only a status back
/// when a call fails, and whether it may repeat the call depends on which
/// RPC it was; the generated client puts that in the request's path.
#[derive(Clone)]
pub struct NodeChannel {
    inner: Channel,
    /// Where the kind of the calls made is recorded, if anyone asked.
    note: Option<Arc<AtomicU8>>,
}

/// The kind of the calls made through a [`NodeChannel::noting`] copy.
pub struct CallNote(Arc<AtomicU8>);

impl CallNote {
    /// The most consequential kind of call made so far (a write over a
    /// read), or `None` if no call was made.
    pub fn kind(&self) -> Option<CallKind> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(CallKind::Read),
            2 => Some(CallKind::NamedWrite),
            _ => Some(CallKind::Write),
        }
    }
}

impl NodeChannel {
    fn new(inner: Channel) -> NodeChannel {
        NodeChannel { inner, note: None }
    }

    /// This connection, with a note of the kind of every call made through
    /// it (or its clones) from now on.
    pub fn noting(&self) -> (NodeChannel, CallNote) {
        let note = Arc::new(AtomicU8::new(0));
        let channel = NodeChannel {
            inner: self.inner.clone(),
            note: Some(note.clone()),
        };
        (channel, CallNote(note))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for NodeChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(note) = &self.note {
            let kind = CallKind::of_path(request.uri().path());
            note.fetch_max(kind as u8, Ordering::Relaxed);
        }
        self.inner.call(request)
    }
}

/// Opens a connection to one node: TCP, then mutual TLS.
#[derive(Clone)]
struct NodeConnector {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl tower::Service<http::Uri> for NodeConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (addr, tls) = (self.addr, self.tls.clone());
        Box::pin(async move {
            let connect = async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                tls.connect(name, tcp).await
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting"))??;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::{pb, Failure};

    /// A pool with a gateway identity of a fresh CA, its files in `dir`.
    fn pool(dir: &std::path::Path) -> Pool {
        Pool::new(&crate::tls::gateway_files_for_tests(dir)).unwrap()
    }

    #[tokio::test]
    async fn a_call_no_node_took_was_not_delivered_and_its_kind_is_noted() {
        let tmp = tempfile::tempdir().unwrap();
        let pool = pool(tmp.path());
        // A port nothing listens on any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (channel, note) = pool.channel(addr).unwrap().noting();
        assert_eq!(note.kind(), None);
        let status = client_of(channel).routes(pb::Empty {}).await.unwrap_err();
        assert!(
            matches!(Failure::of(&status), Failure::NotDelivered(_)),
            "{status:?}"
        );
        assert_eq!(note.kind(), Some(CallKind::Read));
        let (channel, note) = pool.channel(addr).unwrap().noting();
        let request = pb::BucketRequest::default();
        let _ = client_of(channel.clone())
            .head_bucket(request.clone())
            .await;
        assert_eq!(note.kind(), Some(CallKind::Read));
        // A write through the same channel makes the whole note a write's.
        let _ = client_of(channel).delete_bucket(request).await;
        assert_eq!(note.kind(), Some(CallKind::Write));
    }
}
