//! The internal RPC: generated from proto/lumbung.proto, carried by tonic
//! over mutual TLS, plus the connection pool every peer uses.

use crate::config::TlsFiles;
use crate::shard::ShardError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Generated messages and service stubs.
pub mod pb {
    tonic::include_proto!("lumbung");
}

pub type NodeClient = pb::node_client::NodeClient<Channel>;

/// The largest message on the wire: a chunk plus framing.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Lazily connected, shared channels to nodes, by address.
pub struct Pool {
    files: TlsFiles,
    state: Mutex<PoolState>,
}

struct PoolState {
    tls: Arc<rustls::ClientConfig>,
    clients: HashMap<SocketAddr, NodeClient>,
}

/// Longest a connection to a node may take, TCP and TLS together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl Pool {
    pub fn new(tls: &TlsFiles) -> anyhow::Result<Pool> {
        Ok(Pool {
            state: Mutex::new(PoolState {
                tls: crate::tls::rpc_client_config(tls)?,
                clients: HashMap::new(),
            }),
            files: tls.clone(),
        })
    }

    /// Reads the certificate files again; channels opened from now on
    /// present the new identity, while calls in flight finish on the old.
    /// A bad pair is refused and the old one stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let tls = crate::tls::rpc_client_config(&self.files)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.tls = tls;
        state.clients.clear();
        Ok(())
    }

    /// A client for the node at `addr`; connects on first use and
    /// reconnects by itself after failures.
    pub fn client(&self, addr: SocketAddr) -> Result<NodeClient, ShardError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = state.clients.get(&addr) {
            return Ok(c.clone());
        }
        // TLS is ours (rustls, node certificates only), so tonic speaks
        // plain HTTP/2 over the stream the connector hands it.
        let connector = NodeConnector {
            addr,
            tls: tokio_rustls::TlsConnector::from(state.tls.clone()),
        };
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ShardError::Internal(format!("endpoint {addr}: {e}")))?
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect_with_connector_lazy(connector);
        let client = NodeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        state.clients.insert(addr, client.clone());
        Ok(client)
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

/// Header that carries a [`ShardError`] across the wire.
const ERROR_DETAIL: &str = "x-lumbung-error";

/// Wraps a domain error in a gRPC status, keeping the exact variant.
pub fn status_of(e: ShardError) -> tonic::Status {
    use tonic::Code;
    let code = match &e {
        ShardError::NotLeader { .. } | ShardError::Unavailable(_) => Code::Unavailable,
        ShardError::Internal(_) => Code::Internal,
        _ => Code::FailedPrecondition,
    };
    let mut status = tonic::Status::new(code, e.to_string());
    let encoded = hex::encode(crate::shard::encode(&e));
    if let Ok(v) = encoded.parse() {
        status.metadata_mut().insert(ERROR_DETAIL, v);
    }
    status
}

/// Recovers the domain error from a status; transport failures become
/// `Unavailable` (retryable).
pub fn error_of(status: &tonic::Status) -> ShardError {
    if let Some(v) = status.metadata().get(ERROR_DETAIL) {
        if let Some(e) = v
            .to_str()
            .ok()
            .and_then(|s| hex::decode(s).ok())
            .and_then(|b| crate::shard::decode::<ShardError>(&b).ok())
        {
            return e;
        }
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            ShardError::Unavailable(status.message().to_string())
        }
        tonic::Code::DeadlineExceeded => {
            ShardError::Unavailable(format!("timed out: {}", status.message()))
        }
        _ => ShardError::Internal(status.message().to_string()),
    }
}
