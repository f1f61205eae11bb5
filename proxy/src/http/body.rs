//! Bodies as they stream through: counted (never buffered), and a response body that reports
//! once, when the stream ends or is dropped, with its size and gRPC status (from trailers or a
//! trailers-only response).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the L7 proxy hands to hyper.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(text: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(text.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Any body with `Bytes` chunks, boxed.
pub fn boxed<B>(b: B) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// Adds the size of every data frame to a shared counter.
pub struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Self { inner, bytes }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub bytes: u64,
    /// `grpc-status` from the trailers (or the headers of a trailers-only response).
    pub grpc_status: Option<String>,
    /// `false` when the body failed or was dropped before its end (the downstream went away).
    pub complete: bool,
}

type Done = Box<dyn FnOnce(Outcome) + Send>;

/// A response body that calls `done` exactly once.
pub struct Tracked<B: HttpBody> {
    inner: B,
    outcome: Outcome,
    done: Option<Done>,
}

impl<B: HttpBody> Tracked<B> {
    pub fn new(inner: B, grpc_status: Option<String>, done: Done) -> Self {
        Self { inner, outcome: Outcome { grpc_status, ..Outcome::default() }, done: Some(done) }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(done) = self.done.take() {
            let mut outcome = std::mem::take(&mut self.outcome);
            outcome.complete = complete;
            done(outcome);
        }
    }
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.outcome.bytes += data.len() as u64;
                } else if let Some(status) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    self.outcome.grpc_status = status.to_str().ok().map(str::to_owned);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: HttpBody> Drop for Tracked<B> {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended; otherwise a drop before the end
        // means the downstream went away.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}
