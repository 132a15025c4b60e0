//! A request body that keeps its client honest: no more bytes than the
//! limit allows, and no slower than a minimum rate, so that a client
//! trickling a byte a second is cut off instead of holding a worker.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use s3s::{s3_error, S3Error};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How a body must behave.
#[derive(Clone, Copy, Debug)]
pub struct BodyRules {
    pub max_bytes: u64,
    /// At least `min_bytes` must arrive per `window` of time spent waiting
    /// for the client. Time the gateway itself spends elsewhere (a slow
    /// node, back-pressure) does not count against the client.
    pub min_bytes: u64,
    pub window: Duration,
}

pub struct GuardedBody<B> {
    inner: B,
    rules: BodyRules,
    total: u64,
    /// Bytes and waiting time in the current window.
    window_bytes: u64,
    waited: Duration,
    /// When the current wait for the client began, and when it runs out.
    waiting_since: Option<Instant>,
    deadline: Pin<Box<Sleep>>,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, rules: BodyRules) -> GuardedBody<B> {
        GuardedBody {
            inner,
            rules,
            total: 0,
            window_bytes: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            deadline: Box::pin(tokio::time::sleep(rules.window)),
        }
    }

    /// Ends the current wait, and the window when it is full: a full window
    /// that brought too few bytes fails the body.
    fn account_wait(&mut self, now: Instant) -> Result<(), S3Error> {
        if let Some(since) = self.waiting_since.take() {
            self.waited += now - since;
        }
        if self.waited >= self.rules.window {
            if self.window_bytes < self.rules.min_bytes {
                return Err(s3_error!(
                    RequestTimeout,
                    "Your socket connection to the server was not read from or written to within the timeout period: {} bytes in {} s, at least {} needed.",
                    self.window_bytes,
                    self.rules.window.as_secs(),
                    self.rules.min_bytes
                ));
            }
            self.waited = Duration::ZERO;
            self.window_bytes = 0;
        }
        Ok(())
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = S3Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, S3Error>>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    this.total += len;
                    this.window_bytes += len;
                    if this.total > this.rules.max_bytes {
                        return Poll::Ready(Some(Err(s3_error!(
                            EntityTooLarge,
                            "Your proposed upload exceeds the maximum allowed size of {} bytes.",
                            this.rules.max_bytes
                        ))));
                    }
                    if let Err(e) = this.account_wait(now) {
                        return Poll::Ready(Some(Err(e)));
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(s3_error!(
                        IncompleteBody,
                        "reading the request body: {e}"
                    ))))
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            // Waiting for the client: arm the deadline at the end of the
            // window, counting only time already spent waiting.
            let now = Instant::now();
            if this.waiting_since.is_none() {
                this.waiting_since = Some(now);
                let left = this.rules.window.saturating_sub(this.waited);
                this.deadline.as_mut().reset(now + left);
            }
            if this.deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Err(e) = this.account_wait(now) {
                return Poll::Ready(Some(Err(e)));
            }
            // The window was full enough; wait on into the next one.
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    fn rules() -> BodyRules {
        BodyRules {
            max_bytes: 100,
            min_bytes: 50,
            window: Duration::from_secs(10),
        }
    }

    /// A body that yields `pieces`, each after `gap`.
    fn trickle(
        pieces: Vec<&'static [u8]>,
        gap: Duration,
    ) -> impl Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let s = futures::stream::iter(pieces).then(move |p| async move {
            tokio::time::sleep(gap).await;
            Ok(Frame::data(Bytes::from_static(p)))
        });
        StreamBody::new(Box::pin(s))
    }

    #[tokio::test(start_paused = true)]
    async fn a_prompt_body_passes_whole() {
        let body = GuardedBody::new(
            trickle(vec![&b"hello "[..], &b"world"[..]], Duration::from_secs(1)),
            rules(),
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello world");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_of_a_byte_a_second_is_cut_off() {
        let body = GuardedBody::new(
            trickle(vec![&b"x"[..]; 60], Duration::from_secs(1)),
            rules(),
        );
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.code(), &s3s::S3ErrorCode::RequestTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_sending_is_cut_off_after_one_window() {
        let stalled = StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        let started = Instant::now();
        let err = GuardedBody::new(stalled, rules())
            .collect()
            .await
            .unwrap_err();
        assert_eq!(err.code(), &s3s::S3ErrorCode::RequestTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn more_than_the_limit_is_entity_too_large() {
        let body = GuardedBody::new(trickle(vec![&[0u8; 60][..]; 2], Duration::ZERO), rules());
        let err = body.collect().await.unwrap_err();
        assert_eq!(err.code(), &s3s::S3ErrorCode::EntityTooLarge);
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_spends_elsewhere_does_not_count() {
        let mut body = GuardedBody::new(trickle(vec![&b"a"[..]; 3], Duration::ZERO), rules());
        for _ in 0..3 {
            // The consumer is busy for far longer than a window each time.
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(body.frame().await.unwrap().is_ok());
        }
        assert!(body.frame().await.is_none());
    }
}
