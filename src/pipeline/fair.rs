//! Fair sharing of a few slots (the decoders) among clients, by the time
//! each client's frames hold a slot: a freed slot goes to the waiting client
//! that has used the least decoder time, so a client whose frames take
//! 100 ms each cannot crowd out one whose frames take 10 µs — its frames
//! wait behind each other, not in front of everyone else's. (Serving
//! clients in turn, one frame each, is not enough: a client sending cheap
//! frames faster than every other expensive one finishes falls behind and
//! queues for seconds.) This is start-time fair queueing with the decoder
//! time as the cost. A client is a connection (see `ClientId`); frames of
//! one client keep their order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// Who a frame belongs to, for fair sharing: one id per connection, or per
/// in-process caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClientId(pub u64);

/// `slots` slots shared among the clients waiting for one, least decoder
/// time used first.
#[derive(Debug, Clone)]
pub struct FairPool {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    free: usize,
    // Clients waiting for a slot or holding one; forgotten once they do
    // neither, so a client returns at the others' level (no credit saved up
    // while idle).
    clients: HashMap<ClientId, Client>,
    // Arrival order of waiters, to break ties.
    next_seq: u64,
}

#[derive(Debug, Default)]
struct Client {
    waiters: VecDeque<(u64, oneshot::Sender<Slot>)>,
    holding: usize,
    // Slot time used while active, counted from the level of the least
    // served active client when it arrived.
    used: Duration,
}

/// One slot, returned to the pool (and handed to the waiting client that
/// has used the least slot time) when dropped.
#[derive(Debug)]
pub struct Slot {
    pool: Option<Arc<Mutex<State>>>,
    client: ClientId,
    since: Instant,
}

impl FairPool {
    /// A pool of `slots` slots (at least one).
    pub fn new(slots: usize) -> FairPool {
        FairPool {
            state: Arc::new(Mutex::new(State {
                free: slots.max(1),
                clients: HashMap::new(),
                next_seq: 0,
            })),
        }
    }

    /// Waits for a slot on behalf of `client`. Cancel-safe: a caller that
    /// stops waiting gives its place (or its slot) back.
    pub async fn acquire(&self, client: ClientId) -> Slot {
        let waiter = {
            let mut state = lock(&self.state);
            if state.free > 0 {
                state.drop_departed_waiters();
            }
            state.join(client);
            let nobody_waits = state.clients.values().all(|c| c.waiters.is_empty());
            if state.free > 0 && nobody_waits {
                state.free -= 1;
                if let Some(c) = state.clients.get_mut(&client) {
                    c.holding += 1;
                }
                return Slot {
                    pool: Some(Arc::clone(&self.state)),
                    client,
                    since: Instant::now(),
                };
            }
            let (tx, rx) = oneshot::channel();
            let seq = state.next_seq;
            state.next_seq += 1;
            if let Some(c) = state.clients.get_mut(&client) {
                c.waiters.push_back((seq, tx));
            }
            rx
        };
        match waiter.await {
            Ok(slot) => slot,
            // The pool is gone (never, while a `FairPool` handle lives):
            // go on without a slot rather than hang.
            Err(_) => Slot {
                pool: None,
                client,
                since: Instant::now(),
            },
        }
    }
}

impl State {
    /// Makes `client` active. A client that was not starts just below the
    /// least served active client: it has used nothing, so its next frame
    /// goes first, but it brings no credit from an idle past.
    fn join(&mut self, client: ClientId) {
        if self.clients.contains_key(&client) {
            return;
        }
        let floor = self.clients.values().map(|c| c.used).min();
        let used = floor.map_or(Duration::ZERO, |f| {
            f.saturating_sub(Duration::from_nanos(1))
        });
        self.clients.insert(
            client,
            Client {
                used,
                ..Client::default()
            },
        );
    }

    /// The waiting client that has used the least slot time (the earliest
    /// waiter on a tie).
    fn next_client(&self) -> Option<ClientId> {
        self.clients
            .iter()
            .filter_map(|(id, c)| c.waiters.front().map(|(seq, _)| (c.used, *seq, *id)))
            .min()
            .map(|(_, _, id)| id)
    }

    /// Removes waiters that stopped waiting, so that a free slot is never
    /// kept from a newcomer by a queue of callers that left.
    fn drop_departed_waiters(&mut self) {
        let mut idle = Vec::new();
        for (id, c) in &mut self.clients {
            c.waiters.retain(|(_, tx)| !tx.is_closed());
            if c.waiters.is_empty() && c.holding == 0 {
                idle.push(*id);
            }
        }
        for id in idle {
            self.clients.remove(&id);
        }
    }

    /// Forgets `client` if it neither waits nor holds a slot.
    fn leave_if_idle(&mut self, client: ClientId) {
        if self
            .clients
            .get(&client)
            .is_some_and(|c| c.waiters.is_empty() && c.holding == 0)
        {
            self.clients.remove(&client);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let mut state = lock(&pool);
        if let Some(c) = state.clients.get_mut(&self.client) {
            c.holding = c.holding.saturating_sub(1);
            c.used += self.since.elapsed();
        }
        state.leave_if_idle(self.client);
        // Hand the slot on to the least served waiting client whose waiter
        // is still there.
        while let Some(next) = state.next_client() {
            let Some(c) = state.clients.get_mut(&next) else {
                break;
            };
            let Some((_, tx)) = c.waiters.pop_front() else {
                break;
            };
            c.holding += 1;
            let slot = Slot {
                pool: Some(Arc::clone(&pool)),
                client: next,
                since: Instant::now(),
            };
            match tx.send(slot) {
                Ok(()) => return,
                Err(mut unsent) => {
                    // That waiter left; its slot must not come back here
                    // while the lock is held.
                    unsent.pool = None;
                    if let Some(c) = state.clients.get_mut(&next) {
                        c.holding -= 1;
                    }
                    state.leave_if_idle(next);
                }
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
    async fn waiting_clients_are_served_by_time_used_not_in_arrival_order() {
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
        // b1 goes second: neither client had used the decoder, so a1 (the
        // earlier waiter) goes first; then client 1 has used some and
        // client 2 none.
        assert_eq!(*order.lock().unwrap(), ["a1", "b1", "a2", "a3"]);
    }

    #[tokio::test]
    async fn a_client_with_cheap_frames_is_not_held_behind_one_with_expensive_frames() {
        let pool = FairPool::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        // Client 1's frames hold the decoder 30 ms each; client 2's let go
        // at once. Client 1 queues first.
        let holder = pool.acquire(ClientId(1)).await;
        let mut tasks = Vec::new();
        for (client, name) in [(1, "a1"), (1, "a2"), (2, "b1"), (2, "b2"), (2, "b3")] {
            let (pool, order) = (pool.clone(), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let _slot = pool.acquire(ClientId(client)).await;
                order.lock().unwrap().push(name);
                if client == 1 {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }));
            settle().await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(holder);
        for task in tasks {
            task.await.unwrap();
        }
        // Served one frame each in turn, b2 and b3 would wait behind a1 and
        // a2 (60 ms); by decoder time used, client 2 goes first throughout.
        assert_eq!(*order.lock().unwrap(), ["b1", "b2", "b3", "a1", "a2"]);
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
