//! Waiting for a cancellation token inside a future that wakes often (a served connection wakes
//! several times per request, and its `select!` polls the drain's tokens each time).
//!
//! tokio-util's [`WaitForCancellationFuture`] reads the token's flag and then polls its `Notified`,
//! which takes the waiter list's lock to check the registration and the waker, on every poll.
//! [`Cancelled`] polls it once, to register, and after that only reads the flag (the token's own
//! uncontended lock) for as long as the task's waker would wake the same task as the one
//! registered; a poll from another waker registers again. A cancellation sets the flag before it
//! wakes the registered waiters, so the poll it causes sees the flag.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

pin_project_lite::pin_project! {
    /// Ready once `token` is cancelled (see the module doc).
    pub struct Cancelled<'a> {
        token: &'a CancellationToken,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        registered: Option<Waker>,
    }
}

pub fn cancelled(token: &CancellationToken) -> Cancelled<'_> {
    Cancelled { token, wait: token.cancelled(), registered: None }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.token.is_cancelled() {
            return Poll::Ready(());
        }
        if this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let polled = this.wait.poll(cx);
        if polled.is_pending() {
            *this.registered = Some(cx.waker().clone());
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn polled_often_it_stays_pending_and_the_cancellation_wakes_it() {
        let token = CancellationToken::new();
        let mut wait = std::pin::pin!(cancelled(&token));
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..10 {
            assert!(wait.as_mut().poll(&mut cx).is_pending());
        }
        token.cancel();
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "the registered waker is woken once");
        assert!(wait.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn a_poll_from_another_waker_registers_that_one() {
        let token = CancellationToken::new();
        let mut wait = std::pin::pin!(cancelled(&token));
        let (first, a) = counter();
        let (second, b) = counter();
        assert!(wait.as_mut().poll(&mut Context::from_waker(&a)).is_pending());
        assert!(wait.as_mut().poll(&mut Context::from_waker(&b)).is_pending());
        token.cancel();
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the latest waker is the one woken");
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert!(wait.as_mut().poll(&mut Context::from_waker(&b)).is_ready());
    }

    #[test]
    fn a_child_token_cancelled_through_its_parent_ends_it() {
        let parent = CancellationToken::new();
        let child = parent.child_token();
        let mut wait = std::pin::pin!(cancelled(&child));
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        parent.cancel();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(wait.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn already_cancelled_is_ready_at_once() {
        let token = CancellationToken::new();
        token.cancel();
        let (_, waker) = counter();
        assert!(std::pin::pin!(cancelled(&token)).poll(&mut Context::from_waker(&waker)).is_ready());
    }
}
