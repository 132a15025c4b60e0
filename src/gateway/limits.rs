//! The gateway's limits on what one client may ask: request rates per
//! tenant and per address, open connections, and requests refused before
//! any of their body is read (too long a URI, too large a body).

use crate::config::GatewayLimits;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use s3s::{s3_error, S3Result};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

/// Token buckets of one second's worth of requests, per tenant and per
/// client address. A disabled limit (0) is `None`.
pub struct RequestRates {
    tenants: Option<DefaultKeyedRateLimiter<String>>,
    addresses: Option<DefaultKeyedRateLimiter<IpAddr>>,
    connections: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

fn keyed<K: std::hash::Hash + Eq + Clone>(per_sec: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    NonZeroU32::new(per_sec).map(|n| RateLimiter::keyed(Quota::per_second(n)))
}

const SLOW_DOWN: &str = "Please reduce your request rate.";

impl RequestRates {
    pub fn new(limits: &GatewayLimits) -> RequestRates {
        RequestRates {
            tenants: keyed(limits.tenant_requests_per_sec),
            addresses: keyed(limits.address_requests_per_sec),
            connections: keyed(limits.address_connections_per_sec),
        }
    }

    /// Takes a token for a new connection from `addr`; `false` means close
    /// it before spending a TLS handshake on it.
    pub fn admit_connection(&self, addr: IpAddr) -> bool {
        self.connections
            .as_ref()
            .is_none_or(|l| l.check_key(&addr).is_ok())
    }

    /// Takes a token for a request from `addr`, before it is authenticated.
    pub fn check_address(&self, addr: IpAddr) -> Result<(), Refusal> {
        match &self.addresses {
            Some(l) if l.check_key(&addr).is_err() => Err(Refusal {
                status: http::StatusCode::SERVICE_UNAVAILABLE,
                code: "SlowDown",
                message: format!("{SLOW_DOWN} This address is over its limit."),
            }),
            _ => Ok(()),
        }
    }

    /// Takes a token for an authenticated request of `tenant`.
    pub fn check_tenant(&self, tenant: &str) -> S3Result<()> {
        match &self.tenants {
            Some(l) if l.check_key(&tenant.to_string()).is_err() => Err(s3_error!(
                SlowDown,
                "{SLOW_DOWN} This tenant is over its limit."
            )),
            _ => Ok(()),
        }
    }

    /// Forgets buckets that are full again, so memory follows the number
    /// of recently active clients, not of all clients ever seen.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.tenants {
            l.retain_recent();
            l.shrink_to_fit();
        }
        for l in [&self.addresses, &self.connections].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// Counts open connections, in all and per client address.
pub struct ConnectionSlots {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection; its slot is given back when dropped.
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    addr: IpAddr,
}

impl ConnectionSlots {
    pub fn new(limits: &GatewayLimits) -> Arc<ConnectionSlots> {
        Arc::new(ConnectionSlots {
            max_total: limits.max_connections,
            max_per_address: limits.max_connections_per_address,
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for a new connection from `addr`, or `None` when either limit
    /// is reached.
    pub fn take(self: &Arc<Self>, addr: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_address) = &mut *open;
        let mine = per_address.entry(addr).or_insert(0);
        if *total >= self.max_total || *mine >= self.max_per_address {
            if *mine == 0 {
                per_address.remove(&addr);
            }
            return None;
        }
        *total += 1;
        *mine += 1;
        Some(Slot {
            slots: self.clone(),
            addr,
        })
    }

    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_address) = &mut *open;
        *total -= 1;
        if let Some(n) = per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                per_address.remove(&self.addr);
            }
        }
    }
}

/// The size a request announces for its body: the decoded length of an
/// aws-chunked body, or else Content-Length.
fn announced_body_size(headers: &http::HeaderMap) -> Option<u64> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    number("x-amz-decoded-content-length").or_else(|| number("content-length"))
}

/// Refuses, from its head alone, a request no limit allows: a URI longer
/// than `max_uri_bytes` (414) or a body announced larger than
/// `max_body_bytes` (400 EntityTooLarge).
pub fn check_head<B>(req: &http::Request<B>, limits: &GatewayLimits) -> Result<(), Refusal> {
    let uri = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri > limits.max_uri_bytes {
        return Err(Refusal {
            status: http::StatusCode::URI_TOO_LONG,
            code: "UriTooLong",
            message: format!(
                "The request URI is {uri} bytes; this endpoint accepts at most {}.",
                limits.max_uri_bytes
            ),
        });
    }
    match announced_body_size(req.headers()) {
        Some(size) if size > limits.max_body_bytes => Err(Refusal {
            status: http::StatusCode::BAD_REQUEST,
            code: "EntityTooLarge",
            message: format!(
                "Your proposed upload of {size} bytes exceeds the maximum allowed size of {} bytes.",
                limits.max_body_bytes
            ),
        }),
        _ => Ok(()),
    }
}

/// A request refused before s3s sees it, answered in S3's error format.
#[derive(Debug)]
pub struct Refusal {
    pub status: http::StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn into_response(self) -> http::Response<s3s::Body> {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>",
            self.code,
            escape(&self.message)
        );
        let mut resp = http::Response::new(s3s::Body::from(xml));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/xml"),
        );
        resp
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GatewayLimits {
        GatewayLimits {
            max_connections: 3,
            max_connections_per_address: 2,
            tenant_requests_per_sec: 2,
            address_requests_per_sec: 3,
            address_connections_per_sec: 2,
            ..Default::default()
        }
    }

    #[test]
    fn connection_slots_count_per_address_and_in_all() {
        let slots = ConnectionSlots::new(&limits());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "two per address");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(b).is_none(), "three in all");
        drop(a1);
        assert_eq!(slots.open(), 2);
        assert!(slots.take(b).is_some());
    }

    #[test]
    fn rates_refuse_the_request_after_the_burst_with_slow_down() {
        let rates = RequestRates::new(&limits());
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            rates.check_address(addr).unwrap();
        }
        let err = rates.check_address(addr).unwrap_err();
        assert_eq!((err.status.as_u16(), err.code), (503, "SlowDown"));
        rates.check_address("10.0.0.2".parse().unwrap()).unwrap();
        rates.check_tenant("a").unwrap();
        rates.check_tenant("a").unwrap();
        let err = rates.check_tenant("a").unwrap_err();
        assert_eq!(err.code(), &s3s::S3ErrorCode::SlowDown);
        rates.check_tenant("b").unwrap();
        assert!(rates.admit_connection(addr) && rates.admit_connection(addr));
        assert!(
            !rates.admit_connection(addr),
            "two new connections a second"
        );
    }

    #[test]
    fn heads_over_a_limit_are_refused_with_the_s3_error() {
        let l = limits();
        let req = |uri: &str, len: u64| {
            http::Request::builder()
                .uri(uri)
                .header("content-length", len)
                .body(())
                .unwrap()
        };
        assert!(check_head(&req("/b/k", 5 << 30), &l).is_ok());
        let big = check_head(&req("/b/k", (5 << 30) + 1), &l).unwrap_err();
        assert_eq!((big.status.as_u16(), big.code), (400, "EntityTooLarge"));
        let long = format!("/b/{}", "k".repeat(l.max_uri_bytes));
        let refused = check_head(&req(&long, 0), &l).unwrap_err();
        assert_eq!(refused.status.as_u16(), 414);
        let chunked = http::Request::builder()
            .uri("/b/k")
            .header("x-amz-decoded-content-length", (6u64 << 30).to_string())
            .body(())
            .unwrap();
        assert_eq!(check_head(&chunked, &l).unwrap_err().code, "EntityTooLarge");
    }
}
