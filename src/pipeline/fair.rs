//! Fair sharing of a few slots (the decoders) among clients: waiting
//! clients are served round-robin, one slot per turn, so a client sending
//! expensive frames waits behind its own frames, not in front of everyone
//! else's. A client is a connection (see `ClientId`); frames of one client
//! keep their order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Who a frame belongs to, for fair sharing: one id per connection, or per
/// in-process caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ClientId(pub u64);

/// `slots` slots shared round-robin by the clients waiting for one.
#[derive(Debug, Clone)]
pub struct FairPool {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    free: usize,
    waiting: HashMap<ClientId, VecDeque<oneshot::Sender<Slot>>>,
    // Clients with someone waiting, in turn order.
    turns: VecDeque<ClientId>,
}

/// One slot, returned to the pool (and handed to the next client in turn)
/// when dropped.
#[derive(Debug)]
pub struct Slot {
    pool: Option<Arc<Mutex<State>>>,
}

impl FairPool {
    /// A pool of `slots` slots (at least one).
    pub fn new(slots: usize) -> FairPool {
        FairPool {
            state: Arc::new(Mutex::new(State {
                free: slots.max(1),
                waiting: HashMap::new(),
                turns: VecDeque::new(),
            })),
        }
    }

    /// Waits for a slot on behalf of `client`. Cancel-safe: a caller that
    /// stops waiting gives its turn (or its slot) back.
    pub async fn acquire(&self, client: ClientId) -> Slot {
        let waiter = {
            let mut state = lock(&self.state);
            if state.free > 0 && state.turns.is_empty() {
                state.free -= 1;
                return Slot {
                    pool: Some(Arc::clone(&self.state)),
                };
            }
            let (tx, rx) = oneshot::channel();
            let queue = state.waiting.entry(client).or_default();
            if queue.is_empty() {
                state.turns.push_back(client);
            }
            // The entry exists: it was just made or found.
            if let Some(queue) = state.waiting.get_mut(&client) {
                queue.push_back(tx);
            }
            rx
        };
        match waiter.await {
            Ok(slot) => slot,
            // The pool is gone (never, while a `FairPool` handle lives):
            // go on without a slot rather than hang.
            Err(_) => Slot { pool: None },
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let mut state = lock(&pool);
        // Hand the slot to the next client in turn whose waiter is still there.
        while let Some(client) = state.turns.pop_front() {
            let Some(queue) = state.waiting.get_mut(&client) else {
                continue;
            };
            let mut handed = false;
            while let Some(tx) = queue.pop_front() {
                let slot = Slot {
                    pool: Some(Arc::clone(&pool)),
                };
                match tx.send(slot) {
                    Ok(()) => {
                        handed = true;
                        break;
                    }
                    // That waiter left; its slot must not come back here
                    // while the lock is held.
                    Err(mut unsent) => unsent.pool = None,
                }
            }
            if queue.is_empty() {
                state.waiting.remove(&client);
            } else {
                state.turns.push_back(client);
            }
            if handed {
                return;
            }
        }
        state.free += 1;
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock leaves consistent state behind (every
    // update is a single push or pop), so a poisoned lock is still usable.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Starts a waiter for `client` that records its name when it gets a
    /// slot, then holds it until the test lets go of `release`.
    fn waiter(
        pool: &FairPool,
        client: u64,
        name: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> (tokio::task::JoinHandle<()>, oneshot::Sender<()>) {
        let (release, held) = oneshot::channel::<()>();
        let (pool, order) = (pool.clone(), Arc::clone(order));
        let task = tokio::spawn(async move {
            let _slot = pool.acquire(ClientId(client)).await;
            order.lock().unwrap().push(name);
            let _ = held.await;
        });
        (task, release)
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn waiting_clients_are_served_in_turn_not_in_arrival_order() {
        let pool = FairPool::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let holder = pool.acquire(ClientId(0)).await;
        // Client 1 queues three frames before client 2 queues one.
        let mut waiting = Vec::new();
        for (client, name) in [(1, "a1"), (1, "a2"), (1, "a3"), (2, "b1")] {
            waiting.push(waiter(&pool, client, name, &order));
            settle().await;
        }
        // Each waiter lets go as soon as it gets its slot.
        let (tasks, releases): (Vec<_>, Vec<_>) = waiting.into_iter().unzip();
        drop(releases);
        drop(holder);
        for task in tasks {
            task.await.unwrap();
        }
        // b1 goes second: client 2's turn comes after client 1's first.
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3"]);
    }

    #[tokio::test]
    async fn a_waiter_that_leaves_gives_its_turn_back() {
        let pool = FairPool::new(1);
        let holder = pool.acquire(ClientId(0)).await;
        let leaving = tokio::spawn({
            let pool = pool.clone();
            async move {
                let _slot = pool.acquire(ClientId(1)).await;
            }
        });
        settle().await;
        leaving.abort();
        let _ = leaving.await;
        drop(holder);
        // The slot is free again, not lost to the waiter that left.
        let again = tokio::time::timeout(Duration::from_secs(5), pool.acquire(ClientId(2)));
        assert!(again.await.is_ok(), "the slot came back");
    }
}
