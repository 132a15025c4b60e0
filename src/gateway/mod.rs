//! The gateway: the only public listener of a Lumbung cluster.
//!
//! It terminates TLS (rustls, TLS 1.2 and 1.3, HTTP/1.1 and HTTP/2), lets
//! `s3s` parse the S3 protocol and verify SigV4 (headers, presigned URLs,
//! aws-chunked bodies with trailers), and turns each call into one typed
//! RPC to a node over mutual TLS. It parses all untrusted input itself, so
//! nodes never see raw client bytes; it holds no keys of tenant data and
//! stores nothing.
//!
//! Around that: [`limits`] (rates, connections, sizes), [`body`] (slow or
//! oversized bodies), [`idle`] (silent connections), and [`router`], which
//! sends each request to the node that leads its shard unless that node is
//! slow or failing.

pub mod auth;
pub mod body;
pub mod idle;
pub mod limits;
pub mod router;

use crate::config::{GatewayConfig, GatewayLimits};
use crate::s3::S3Front;
use crate::tls::ReloadableIdentity;
use anyhow::Context;
use body::{BodyRules, GuardedBody};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use idle::{IdleGuard, InFlight};
use limits::{ConnectionSlots, RequestRates};
use s3s::service::S3Service;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often idle rate-limit buckets are forgotten.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(60);

/// A gateway that is serving.
pub struct RunningGateway {
    pub addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Refreshes the routing table and reports this gateway's view.
    routing: tokio::task::JoinHandle<()>,
    /// The public certificate, and the internal identity (in the router).
    identity: Arc<ReloadableIdentity>,
    router: Arc<router::NodeRouter>,
}

impl RunningGateway {
    /// Reads both certificates again (SIGHUP): the public one for new
    /// client connections, the internal one for new connections to nodes.
    pub fn reload_certificates(&self) -> anyhow::Result<()> {
        self.identity.reload()?;
        self.router.reload()
    }

    /// The public certificate served now (DER).
    pub fn certificate(&self) -> Vec<u8> {
        self.identity.certificate()
    }

    pub async fn stop(self) {
        self.routing.abort();
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// What this gateway sees of each node.
    pub fn node_view(&self) -> Vec<crate::rpc::pb::NodeHealth> {
        self.router.view()
    }
}

/// What every connection shares.
struct Shared {
    service: S3Service,
    rates: Arc<RequestRates>,
    limits: GatewayLimits,
    tls: tokio_rustls::TlsAcceptor,
}

/// Binds the public listener and serves S3 until stopped.
pub async fn start(cfg: GatewayConfig) -> anyhow::Result<RunningGateway> {
    let limits = cfg.limits.clone();
    anyhow::ensure!(
        limits.max_header_bytes >= 8192,
        "limits.max_header_bytes must be at least 8192"
    );
    anyhow::ensure!(
        limits.body_window_secs > 0,
        "limits.body_window_secs must be at least 1"
    );
    let identity = ReloadableIdentity::load(&cfg.public_cert, &cfg.public_key)?;
    let tls = crate::tls::public_server_config(identity.clone())?;
    let router = Arc::new(router::NodeRouter::new(cfg.nodes.clone(), &cfg.tls)?);
    let keys = Arc::new(auth::KeyCache::new(router.clone()));
    let rates = Arc::new(RequestRates::new(&limits));
    let mut builder = s3s::service::S3ServiceBuilder::new(S3Front::new(
        router.clone(),
        keys.clone(),
        rates.clone(),
    ));
    builder.set_auth(KeyCacheAuth(keys));
    let mut s3_config = s3s::config::S3Config::default();
    s3_config.presigned_url_max_skew_time_secs = limits.max_clock_skew_secs;
    builder.set_config(Arc::new(s3s::config::StaticConfigProvider::new(Arc::new(
        s3_config,
    ))));
    let slots = ConnectionSlots::new(&limits);
    let shared = Arc::new(Shared {
        service: builder.build(),
        rates,
        limits,
        tls: tokio_rustls::TlsAcceptor::from(tls),
    });

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut forget = tokio::time::interval(FORGET_IDLE_EVERY);
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
                _ = forget.tick() => {
                    shared.rates.forget_idle();
                    continue;
                }
                _ = stop_rx.changed() => break,
            };
            if !shared.rates.admit_connection(peer.ip()) {
                tracing::debug!(%peer, "connection refused: too many new connections");
                continue;
            }
            let Some(slot) = slots.take(peer.ip()) else {
                tracing::debug!(%peer, "connection refused: too many open");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let shared = shared.clone();
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                serve_connection(tcp, peer.ip(), shared, stop).await;
                drop(slot);
            });
        }
    });
    let routing = tokio::spawn(keep_routes(router.clone(), addr.to_string()));
    tracing::info!(%addr, "gateway serving S3 over TLS");
    Ok(RunningGateway {
        addr,
        stop: stop_tx,
        task,
        routing,
        identity,
        router,
    })
}

/// Refreshes the routing table every [`router::REFRESH`], and every few
/// refreshes tells each node what this gateway sees, for `admin status`.
async fn keep_routes(router: Arc<router::NodeRouter>, name: String) {
    const REPORT_EVERY: u32 = 5;
    let mut tick = tokio::time::interval(router::REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u32.. {
        tick.tick().await;
        router.refresh().await;
        if round % REPORT_EVERY == 0 {
            let view = crate::rpc::pb::GatewayView {
                gateway: name.clone(),
                nodes: router.view(),
            };
            let reports = router.all().into_iter().map(|mut c| {
                let view = view.clone();
                async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), c.report_view(view)).await;
                }
            });
            futures::future::join_all(reports).await;
        }
    }
}

/// One client connection: TLS, then HTTP/1.1 or HTTP/2 until it closes.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: IpAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let header_timeout = Duration::from_secs(shared.limits.header_timeout_secs);
    let tls = match tokio::time::timeout(header_timeout, shared.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let mut conn = auto::Builder::new(TokioExecutor::new());
    conn.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(shared.limits.max_header_bytes);
    conn.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.limits.max_header_bytes).unwrap_or(u32::MAX));
    let in_flight = InFlight::default();
    let io = IdleGuard::new(tls, header_timeout, in_flight.clone());
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let busy = in_flight.begin();
        async move {
            let response = handle(req, peer, &shared).await;
            drop(busy);
            response
        }
    });
    let serve = conn.serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = serve => if let Err(e) = r {
            tracing::debug!(%peer, "connection: {e}");
        },
        _ = stop.changed() => {}
    }
}

/// One request: the limits that need no signature, then s3s.
async fn handle(
    req: http::Request<hyper::body::Incoming>,
    peer: IpAddr,
    shared: &Shared,
) -> Result<s3s::HttpResponse, s3s::HttpError> {
    let limits = &shared.limits;
    let refused = shared
        .rates
        .check_address(peer)
        .and_then(|()| limits::check_head(&req, limits));
    if let Err(refusal) = refused {
        return Ok(with_retry_after(refusal.into_response()));
    }
    let rules = BodyRules {
        max_bytes: limits.max_body_bytes,
        min_bytes: limits.min_body_bytes_per_window,
        window: Duration::from_secs(limits.body_window_secs),
    };
    let is_head = req.method() == http::Method::HEAD;
    let req = req.map(|b| s3s::Body::http_body(GuardedBody::new(b, rules)));
    let mut response = shared.service.call(req).await?;
    if is_head {
        // s3s writes an error document even for HEAD; HTTP/2 clients (Go's,
        // in rclone) treat a HEAD answer with data as a protocol error.
        *response.body_mut() = s3s::Body::empty();
    }
    Ok(with_retry_after(response))
}

/// How long a client told to slow down is asked to wait.
const RETRY_AFTER_SECS: &str = "1";

/// Adds `Retry-After` to every 503 (SlowDown: an overload, a busy shard, an
/// internal call that failed), so clients that honour it back off.
///
/// Here rather than on the `S3Error`: s3s 0.14 can carry headers on an
/// error (`S3Error::set_headers`), but its serializer then replaces the
/// response's headers with them, Content-Type included; and this one place
/// also covers the refusals the gateway writes itself.
fn with_retry_after<B>(mut response: http::Response<B>) -> http::Response<B> {
    if response.status() == http::StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .entry(http::header::RETRY_AFTER)
            .or_insert(http::HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    response
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_503_and_only_a_503_says_when_to_retry() {
        let answer = |status: http::StatusCode| {
            let mut r = http::Response::new(());
            *r.status_mut() = status;
            with_retry_after(r)
        };
        let slow = answer(http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(slow.headers()[http::header::RETRY_AFTER], "1");
        for other in [
            http::StatusCode::OK,
            http::StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert!(!answer(other)
                .headers()
                .contains_key(http::header::RETRY_AFTER));
        }
    }
}
