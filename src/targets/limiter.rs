//! The adaptive concurrency limiter every uploader and reader shares (AIMD): at most `max` requests in flight,
//! halved (down to `min`) when the service throttles, one more after every `ramp_every` successes, never above
//! `max`.
//!
//! Lowering the limit while every permit is out cannot take permits back at once (`Semaphore::forget_permits`
//! forgets only available ones and returns how many it forgot): what it could not forget is kept as a debt, and
//! the next permits to come back are forgotten instead of released. Raising the limit pays the debt first. So the
//! permits in circulation are always `limit + debt` and never more than `max`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Limit and debt, changed together.
#[derive(Debug)]
struct State {
    limit: usize,
    debt: usize,
}

/// An adaptive limit on requests in flight.
#[derive(Debug)]
pub struct Limiter {
    sem: Arc<Semaphore>,
    state: Mutex<State>,
    max: usize,
    min: usize,
    ramp_every: u64,
    successes: AtomicU64,
}

/// The right to have one request in flight; returned (or, to pay a debt, forgotten) when dropped.
#[derive(Debug)]
pub struct Permit {
    permit: Option<OwnedSemaphorePermit>,
    limiter: Arc<Limiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(p) = self.permit.take() else {
            return;
        };
        if let Ok(mut s) = self.limiter.state.lock()
            && s.debt > 0
        {
            s.debt -= 1;
            p.forget();
        }
    }
}

impl Limiter {
    /// A limiter of `max` requests in flight (at least 1), lowered to no less than `min` by throttling, raised by
    /// one after every `ramp_every` successes.
    pub fn new(max: usize, min: usize, ramp_every: u64) -> Arc<Limiter> {
        let max = max.max(1);
        Arc::new(Limiter {
            sem: Arc::new(Semaphore::new(max)),
            state: Mutex::new(State {
                limit: max,
                debt: 0,
            }),
            max,
            min: min.clamp(1, max),
            ramp_every: ramp_every.max(1),
            successes: AtomicU64::new(0),
        })
    }

    /// Waits for a permit.
    pub async fn acquire(self: &Arc<Self>) -> anyhow::Result<Permit> {
        let p = self
            .sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow::anyhow!("the request limiter was closed"))?;
        Ok(Permit {
            permit: Some(p),
            limiter: Arc::clone(self),
        })
    }

    /// The service throttled a request: halve the limit (multiplicative decrease).
    pub fn throttled(&self) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let target = (s.limit / 2).max(self.min);
        if target >= s.limit {
            return;
        }
        let drop_n = s.limit - target;
        s.limit = target;
        let owed = s.debt + drop_n;
        let forgotten = self.sem.forget_permits(owed);
        s.debt = owed - forgotten.min(owed);
    }

    /// A request succeeded: after every `ramp_every` of them, one more may be in flight (additive increase).
    pub fn succeeded(&self) {
        let n = self.successes.fetch_add(1, Ordering::Relaxed);
        if n % self.ramp_every != self.ramp_every - 1 {
            return;
        }
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        if s.limit >= self.max {
            return;
        }
        s.limit += 1;
        if s.debt > 0 {
            s.debt -= 1;
        } else {
            self.sem.add_permits(1);
        }
    }

    /// The current limit.
    #[cfg(test)]
    pub fn limit(&self) -> usize {
        self.state.lock().map_or(self.min, |s| s.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lowering_with_every_permit_out_never_lets_more_in_later() {
        let l = Limiter::new(8, 2, 1);
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(l.acquire().await.unwrap());
        }
        // Nothing is available to forget: the decrease becomes a debt.
        l.throttled();
        assert_eq!(l.limit(), 4);
        assert_eq!(l.sem.available_permits(), 0);
        held.clear();
        // Only the new limit comes back.
        assert_eq!(l.sem.available_permits(), 4);
        // Growing back stops at max, whatever the number of successes.
        for _ in 0..100 {
            l.succeeded();
        }
        assert_eq!(l.limit(), 8);
        assert_eq!(l.sem.available_permits(), 8);
    }

    #[tokio::test]
    async fn in_flight_never_exceeds_max_under_throttling() {
        let l = Limiter::new(6, 1, 3);
        let in_flight = Arc::new(AtomicU64::new(0));
        let peak = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..400u64 {
            let (l, f, p) = (Arc::clone(&l), Arc::clone(&in_flight), Arc::clone(&peak));
            tasks.spawn(async move {
                let _permit = l.acquire().await.unwrap();
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                if i % 7 == 0 {
                    l.throttled();
                } else {
                    l.succeeded();
                }
                f.fetch_sub(1, Ordering::SeqCst);
            });
        }
        while tasks.join_next().await.is_some() {}
        assert!(peak.load(Ordering::SeqCst) <= 6);
        let s = l.state.lock().unwrap();
        // Every permit is back: the debt is paid and exactly the limit is available.
        assert!(s.limit <= 6);
        assert_eq!(s.debt, 0);
        assert_eq!(l.sem.available_permits(), s.limit);
    }
}
