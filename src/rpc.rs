//! The internal RPC: generated from proto/lumbung.proto, carried by tonic
//! over mutual TLS, plus the connection pool every peer uses.

use crate::config::TlsFiles;
use crate::shard::ShardError;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
    /// The CA, our certificate and key (PEM), as last read.
    pems: [Vec<u8>; 3],
    clients: HashMap<SocketAddr, NodeClient>,
}

fn read_pems(tls: &TlsFiles) -> anyhow::Result<[Vec<u8>; 3]> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
    };
    Ok([read(&tls.ca)?, read(&tls.cert)?, read(&tls.key)?])
}

impl Pool {
    pub fn new(tls: &TlsFiles) -> anyhow::Result<Pool> {
        Ok(Pool {
            state: Mutex::new(PoolState {
                pems: read_pems(tls)?,
                clients: HashMap::new(),
            }),
            files: tls.clone(),
        })
    }

    /// Reads the certificate files again; channels opened from now on
    /// present the new identity, while calls in flight finish on the old.
    pub fn reload(&self) -> anyhow::Result<()> {
        // A bad pair is refused here rather than at the next connection.
        crate::tls::read_identity(&self.files.cert, &self.files.key)?;
        let pems = read_pems(&self.files)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.pems = pems;
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
        let [ca, cert, key] = &state.pems;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(addr.ip().to_string());
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| ShardError::Internal(format!("endpoint {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .connect_lazy();
        let client = NodeClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        state.clients.insert(addr, client.clone());
        Ok(client)
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
