//! A wake-up broadcast to every task watching it, in an order that does not depend on
//! chance.
//!
//! `tokio::sync::watch` spreads its waiters over 8 lists picked at random, so the tasks
//! it wakes run in a random order: two runs of one simulation seed could then differ in
//! which task acts first. A [`Signal`] wakes its watchers through one `Notify`, whose
//! order is fixed by the order they began waiting, and counts raises so that a raise
//! between two waits is not missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Something happened that watchers should look at.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    raised: AtomicU64,
    notify: Notify,
}

impl Signal {
    /// Wakes every watcher now waiting, and makes every other watcher's next wait end at
    /// once.
    pub(crate) fn raise(&self) {
        self.raised.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// A watcher that has seen every raise so far.
    pub(crate) fn watch(self: &Arc<Self>) -> Watcher {
        Watcher {
            seen: self.raised.load(Ordering::SeqCst),
            signal: self.clone(),
        }
    }
}

/// One task's view of a [`Signal`].
#[derive(Debug)]
pub(crate) struct Watcher {
    signal: Arc<Signal>,
    seen: u64,
}

impl Watcher {
    /// Ends once the signal has been raised since this watcher last saw it.
    pub(crate) async fn changed(&mut self) {
        loop {
            let notified = self.signal.notify.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a raise after the read wakes it.
            notified.as_mut().enable();
            let raised = self.signal.raised.load(Ordering::SeqCst);
            if raised != self.seen {
                self.seen = raised;
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_raise_between_two_waits_is_seen_and_watchers_wake_in_the_order_they_waited() {
        let signal = Arc::new(Signal::default());
        let mut early = signal.watch();
        signal.raise();
        // Raised while nobody waited: the next wait ends at once.
        early.changed().await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let mut w = signal.watch();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                w.changed().await;
                order.lock().unwrap().push(i);
            }));
            // Each one is waiting before the next is spawned.
            tokio::task::yield_now().await;
        }
        signal.raise();
        for t in tasks {
            t.await.unwrap();
        }
        let woke = order.lock().unwrap().clone();
        let mut sorted = woke.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4], "every watcher woke once");
        // The order they began waiting in, never a shuffle: a `watch` channel fails
        // this.
        assert_eq!(woke, sorted, "woke in {woke:?}");
    }
}
