//! The gateway: the only public listener of a Lumbung cluster.
//!
//! It terminates TLS (rustls, TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2), lets
//! `s3s` parse the S3 protocol and verify SigV4 (headers, presigned URLs,
//! aws-chunked bodies with trailers), and turns each call into one typed
//! RPC to a node over mutual TLS. It parses all untrusted input itself, so
//! nodes never see raw client bytes; it holds no keys of tenant data and
//! stores nothing.

pub mod auth;
pub mod router;

use crate::config::GatewayConfig;
use crate::s3::S3Front;
use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A gateway that is serving.
pub struct RunningGateway {
    pub addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningGateway {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds the public listener and serves S3 until stopped.
pub async fn start(cfg: GatewayConfig) -> anyhow::Result<RunningGateway> {
    let tls = crate::tls::public_server_config(&cfg.public_cert, &cfg.public_key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let router = Arc::new(router::NodeRouter::new(cfg.nodes.clone(), &cfg.tls)?);
    let keys = Arc::new(auth::KeyCache::new(router.clone()));
    let mut builder = s3s::service::S3ServiceBuilder::new(S3Front::new(router, keys.clone()));
    builder.set_auth(KeyCacheAuth(keys));
    let service = Arc::new(builder.build());

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop_rx.changed() => break,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let service = service.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let svc = hyper::service::service_fn(move |req| {
                    let service = service.clone();
                    async move { hyper::service::Service::call(&*service, req).await }
                });
                let conn = auto::Builder::new(TokioExecutor::new());
                let serve = conn.serve_connection(TokioIo::new(tls), svc);
                tokio::select! {
                    r = serve => if let Err(e) = r {
                        tracing::debug!(%peer, "connection: {e}");
                    },
                    _ = stop.changed() => {}
                }
            });
        }
    });
    tracing::info!(%addr, "gateway serving S3 over TLS");
    Ok(RunningGateway {
        addr,
        stop: stop_tx,
        task,
    })
}

/// s3s wants to own its auth; share the cache with the S3 handlers.
struct KeyCacheAuth(Arc<auth::KeyCache>);

#[async_trait::async_trait]
impl s3s::auth::S3Auth for KeyCacheAuth {
    async fn get_secret_key(&self, access_key: &str) -> s3s::S3Result<s3s::auth::SecretKey> {
        Ok(s3s::auth::SecretKey::from(
            self.0.lookup(access_key).await?.secret,
        ))
    }
}
