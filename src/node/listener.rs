//! The node's internal listener: accepts TCP connections and completes
//! their mutual-TLS handshakes concurrently, handing finished ones to
//! tonic. Doing TLS here rather than in tonic lets the node's certificate
//! be replaced while it runs (see `tls::ReloadableIdentity`).

use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Longest a peer may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Serves `listener` until the returned task is aborted (which also closes
/// the listening socket).
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> (Incoming, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    // A peer without a certificate of the cluster CA ends
                    // here; worth an operator's eye.
                    Ok(Err(e)) => tracing::warn!(%peer, "internal TLS handshake refused: {e}"),
                    Err(_) => tracing::warn!(%peer, "internal TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}
