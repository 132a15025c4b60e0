//! The node's internal listener: accepts TCP connections and completes
//! their mutual-TLS handshakes concurrently, handing finished ones to
//! tonic. Doing TLS here rather than in tonic lets the node's certificate
//! be replaced while it runs (see `tls::ReloadableIdentity`).

use crate::tls::Role;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Longest a peer may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type Incoming = ReceiverStream<Result<PeerStream, io::Error>>;

/// The role in a peer's certificate, read once at its handshake and
/// handed to every request on the connection (see `node::access`).
#[derive(Clone, Copy, Debug)]
pub struct PeerRole(pub Option<Role>);

/// A finished mutual-TLS connection and the role its peer proved.
pub struct PeerStream {
    tls: TlsStream<TcpStream>,
    role: PeerRole,
}

impl PeerStream {
    fn new(tls: TlsStream<TcpStream>) -> PeerStream {
        let role = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|c| Role::of_certificate(c));
        PeerStream {
            tls,
            role: PeerRole(role),
        }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerRole;

    fn connect_info(&self) -> PeerRole {
        self.role
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

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
                        let _ = tx.send(Ok(PeerStream::new(tls))).await;
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
