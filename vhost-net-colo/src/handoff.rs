//! A FIFO between two threads, bounded by the bytes it holds rather than by a count of items.
//!
//! An indev reader hands its records to the thread that injects them through it, so that the
//! reader keeps draining its socket while the injector waits for the chain (see
//! `chardevs::spawn_indev`). Records run from 60 bytes to 64 KiB, so a bound by count (what
//! `std::sync::mpsc::sync_channel` and crossbeam's bounded channels offer) is either too
//! small for small frames or too large in memory for big ones; hence these few lines.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// See the module documentation.
pub struct Handoff<T> {
    state: Mutex<State<T>>,
    /// Signalled when an item arrives or the handoff closes.
    ready: Condvar,
    /// Signalled when items leave or the handoff closes.
    room: Condvar,
    cap_bytes: usize,
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    closed: bool,
}

impl<T> Handoff<T> {
    /// A handoff that makes `push` wait while it holds `cap_bytes` or more.
    pub fn new(cap_bytes: usize) -> Self {
        Handoff {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
            cap_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` (counted as `bytes`), first waiting while the handoff is full; false (and
    /// the item dropped) once it is closed.
    pub fn push(&self, item: T, bytes: usize) -> bool {
        let mut st = self.lock();
        while st.bytes >= self.cap_bytes && !st.closed {
            st = self.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closed {
            return false;
        }
        st.items.push_back((item, bytes));
        st.bytes += bytes;
        drop(st);
        self.ready.notify_one();
        true
    }

    /// Up to `max` items in order, waiting for the first; `None` once the handoff is closed
    /// and empty.
    pub fn pop_batch(&self, max: usize) -> Option<Vec<T>> {
        let mut guard = self.lock();
        while guard.items.is_empty() {
            if guard.closed {
                return None;
            }
            guard = self.ready.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        let st = &mut *guard;
        let n = st.items.len().min(max.max(1));
        let mut out = Vec::with_capacity(n);
        for (item, bytes) in st.items.drain(..n) {
            st.bytes -= bytes;
            out.push(item);
        }
        drop(guard);
        self.room.notify_all();
        Some(out)
    }

    /// No more pushes: a waiting `push` returns false, `pop_batch` returns what is left and
    /// then `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn items_leave_in_order_in_batches_and_what_is_left_after_close() {
        let h = Handoff::new(1000);
        for i in 0..5u32 {
            assert!(h.push(i, 10));
        }
        assert_eq!(h.pop_batch(3), Some(vec![0, 1, 2]));
        h.close();
        assert!(!h.push(9, 1), "closed: nothing more is taken");
        assert_eq!(h.pop_batch(10), Some(vec![3, 4]));
        assert_eq!(h.pop_batch(10), None);
    }

    #[test]
    fn a_full_handoff_holds_the_pusher_until_bytes_leave_or_it_closes() {
        let h = Arc::new(Handoff::new(100));
        assert!(h.push(0u32, 60));
        assert!(h.push(1, 60), "below the cap when it came: taken");
        let (tx, rx) = std::sync::mpsc::channel();
        let h2 = h.clone();
        let pusher = std::thread::spawn(move || {
            let r = h2.push(2, 10);
            tx.send(r).unwrap();
            h2.push(3, 10)
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "120 bytes held, cap 100: the push waits"
        );
        assert_eq!(h.pop_batch(1), Some(vec![0]));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(true));
        // The pusher's second push (70 bytes held now) goes through, then the handoff closes.
        assert!(pusher.join().unwrap());
        h.close();
        assert_eq!(h.pop_batch(10), Some(vec![1, 2, 3]));
        // A pusher waiting on a full handoff is released by close.
        let h = Arc::new(Handoff::new(10));
        assert!(h.push(0u32, 10));
        let h2 = h.clone();
        let waiting = std::thread::spawn(move || h2.push(1, 1));
        std::thread::sleep(Duration::from_millis(50));
        h.close();
        assert!(!waiting.join().unwrap());
    }

    #[test]
    fn a_popper_waits_for_the_first_item_or_close() {
        let h = Arc::new(Handoff::<u8>::new(10));
        let h2 = h.clone();
        let popper = std::thread::spawn(move || (h2.pop_batch(4), h2.pop_batch(4)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(h.push(7, 1));
        std::thread::sleep(Duration::from_millis(50));
        h.close();
        assert_eq!(popper.join().unwrap(), (Some(vec![7]), None));
    }
}
