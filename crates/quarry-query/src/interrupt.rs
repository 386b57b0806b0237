//! Stopping a running statement from another thread (a server whose client left, or whose
//! deadline passed). [`crate::Executor::execute_interruptible`] runs a statement under an
//! [`Interrupt`]; the forward passes check it between chunks of [`CHUNK_TOKENS`] prompt tokens
//! and before each pass, so an interrupted statement stops within one chunk's computation and
//! fails with [`INTERRUPTED`].

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Prompt tokens evaluated between two checks of the interrupt.
pub const CHUNK_TOKENS: usize = 256;

/// The message of a statement stopped by its [`Interrupt`].
pub const INTERRUPTED: &str = "the statement was interrupted";

/// A flag that stops the statement running under it; cheap to clone and share.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Stops the statement at its next check (idempotent).
    pub fn interrupt(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_interrupted(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

thread_local! {
    /// The interrupt of the statement running on this thread, if any.
    static CURRENT: RefCell<Option<Interrupt>> = const { RefCell::new(None) };
}

/// Runs `f` with `interrupt` as this thread's current one.
pub(crate) fn under<T>(interrupt: &Interrupt, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Interrupt>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.borrow_mut().replace(interrupt.clone())));
    f()
}

/// Fails with [`INTERRUPTED`] once the current statement's interrupt is set.
pub(crate) fn check() -> Result<(), String> {
    if CURRENT.with(|c| c.borrow().as_ref().is_some_and(Interrupt::is_interrupted)) {
        Err(INTERRUPTED.into())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_fails_only_under_a_set_interrupt_and_under_restores() {
        assert!(check().is_ok());
        let outer = Interrupt::new();
        let inner = Interrupt::new();
        under(&outer, || {
            assert!(check().is_ok());
            inner.interrupt();
            under(&inner, || assert_eq!(check(), Err(INTERRUPTED.to_string())));
            // The outer statement's interrupt is back, and it is not set.
            assert!(check().is_ok());
            outer.interrupt();
            assert!(check().is_err());
        });
        // Nothing is current once the statement is over.
        assert!(check().is_ok());
        // Other threads are not affected.
        under(&inner, || {
            std::thread::spawn(|| assert!(check().is_ok()))
                .join()
                .unwrap();
        });
    }
}
