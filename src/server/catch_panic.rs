//! A panic while a request is being answered becomes an answer, not a reset stream.
//!
//! tonic would drop the call's task and reset its HTTP/2 stream: Envoy sees the authorizer fail and
//! applies `failure_mode_allow`, so a bug that panics on some input would let that input through
//! wherever fail-open is configured. The front doors run each call through [`catch_panic`] and
//! answer a panic with a `500 internal_error` denial instead (counted like any decision, and
//! logged).

use std::{
    any::Any,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    task::{Context, Poll},
};

/// Runs `future` to completion; a panic in any of its polls ends it with `Err(panic message)`.
///
/// The future is not polled again after a panic, and is dropped with whatever state it had
/// (`AssertUnwindSafe`: a call's state is its own, and the shared state it touches, locks
/// included, recovers from poisoning). It must be `Unpin` (a boxed future is, and so is one
/// pinned in place with `pin!`, which needs no allocation), so that polling it in place needs no
/// `unsafe` pin projection.
pub fn catch_panic<F: Future + Unpin>(future: F) -> CatchPanic<F> {
    CatchPanic(future)
}

/// The future [`catch_panic`] returns.
pub struct CatchPanic<F>(F);

impl<F: Future + Unpin> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = Pin::new(&mut self.0);
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(message(&*panic))),
        }
    }
}

/// Runs `work`; a panic in it ends it with `Err(panic message)`, as [`catch_panic`] does for a
/// future's polls.
pub fn catch_panic_now<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|panic| message(&*panic))
}

/// The text a panic was raised with (`panic!("…")` or a `String`), or a placeholder.
fn message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_after_an_await_is_an_error_with_its_message() {
        let result = catch_panic(Box::pin(async {
            tokio::task::yield_now().await;
            let values: Vec<u32> = Vec::new();
            values[3]
        }))
        .await;
        let message = result.expect_err("the panic is caught");
        assert!(message.contains("index out of bounds"), "{message}");
        assert_eq!(catch_panic(Box::pin(async { 7 })).await, Ok(7));
        let formatted = catch_panic(Box::pin(async { panic!("no {}", "luck") })).await;
        assert_eq!(formatted, Err::<(), _>("no luck".to_owned()));
    }
}
