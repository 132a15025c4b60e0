//! Closes a client connection that sits idle: no request in progress and
//! no byte either way for the idle time. hyper's own header timeout only
//! starts with a request's first byte, so without this a client could open
//! connections, finish the handshake and hold them without ever speaking.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests in progress on one connection, and when the last one ended;
/// while any is in progress the connection is not idle.
#[derive(Clone)]
pub struct InFlight(Arc<Mutex<(usize, Instant)>>);

/// Held for as long as one request is being served.
pub struct Busy(InFlight);

impl Default for InFlight {
    fn default() -> InFlight {
        InFlight(Arc::new(Mutex::new((0, Instant::now()))))
    }
}

impl InFlight {
    pub fn begin(&self) -> Busy {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        Busy(self.clone())
    }

    /// `None` while a request is in progress, else when the last ended.
    fn idle_since(&self) -> Option<Instant> {
        let (count, ended) = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        (count == 0).then_some(ended)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        state.1 = Instant::now();
    }
}

pub struct IdleGuard<T> {
    inner: T,
    idle: Duration,
    in_flight: InFlight,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleGuard<T> {
    pub fn new(inner: T, idle: Duration, in_flight: InFlight) -> IdleGuard<T> {
        IdleGuard {
            inner,
            idle,
            in_flight,
            last_activity: Instant::now(),
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    /// Called while a read waits: fails it once the connection has been
    /// idle for the whole idle time, and otherwise arms the timer again.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            let now = Instant::now();
            let due = match self.in_flight.idle_since() {
                Some(ended) => self.last_activity.max(ended) + self.idle,
                None => now + self.idle,
            };
            if due <= now {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client connection idle",
                ));
            }
            if self.timer.deadline() != due {
                self.timer.as_mut().reset(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last_activity = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.last_activity = Instant::now();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_after_the_idle_time() {
        let (_client, server) = tokio::io::duplex(64);
        let mut guarded = IdleGuard::new(server, Duration::from_secs(5), InFlight::default());
        let started = Instant::now();
        let err = guarded.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_and_requests_in_progress_keep_it_open() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = InFlight::default();
        let mut guarded = IdleGuard::new(server, Duration::from_secs(5), in_flight.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                client.write_all(b"x").await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        for _ in 0..3 {
            assert_eq!(guarded.read(&mut [0u8; 8]).await.unwrap(), 1);
        }
        // A request being served for 20 s: no bytes, yet not idle.
        let busy = in_flight.begin();
        let mut buf = [0u8; 8];
        let waiting = tokio::time::timeout(Duration::from_secs(20), guarded.read(&mut buf));
        assert!(waiting.await.is_err(), "still waiting, not failed");
        drop(busy);
        let err = guarded.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(12 + 20 + 5));
    }
}
