//! The pool's bookkeeping, apart from processes and I/O: which idle process a lookup
//! gets, which ones are dropped when a key or the whole pool is full, and which ones
//! have idled or lived too long. Generic over what it keeps, so it is unit tested with
//! plain numbers.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How much the pool may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Idle processes kept per repository (and quarantine); more are dropped on return.
    pub idle_per_repository: usize,
    /// Idle processes kept in all; the one idle longest goes first.
    pub idle_total: usize,
    /// Processes alive at once, busy or idle. A lookup past it takes the place of the
    /// process idle longest, or waits for one to come back.
    pub processes: usize,
    /// An idle process older than this since its last use is stopped.
    pub idle_timeout: Duration,
    /// A process is not reused after this long (it caches config and pack lists).
    pub max_age: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            idle_per_repository: 4,
            idle_total: 512,
            processes: 1024,
            idle_timeout: Duration::from_secs(60),
            max_age: Duration::from_secs(600),
        }
    }
}

/// One idle entry.
#[derive(Debug)]
pub struct Idle<P> {
    pub value: P,
    pub born: Instant,
    pub returned: Instant,
}

/// Idle values by key, newest last within each key.
#[derive(Debug)]
pub struct Book<K, P> {
    limits: Limits,
    idle: HashMap<K, VecDeque<Idle<P>>>,
    count: usize,
}

impl<K: Hash + Eq + Clone, P> Book<K, P> {
    pub fn new(limits: Limits) -> Book<K, P> {
        Book {
            limits,
            idle: HashMap::new(),
            count: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Idle values held.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The most recently returned idle value of `key` that is still young enough.
    /// Values found too old on the way are handed back in `stale` to be stopped.
    pub fn take(&mut self, key: &K, now: Instant, stale: &mut Vec<P>) -> Option<(P, Instant)> {
        let limits = self.limits;
        let queue = self.idle.get_mut(key)?;
        let mut found = None;
        while let Some(entry) = queue.pop_back() {
            self.count -= 1;
            if expired_by(&limits, &entry, now) {
                stale.push(entry.value);
                continue;
            }
            found = Some((entry.value, entry.born));
            break;
        }
        if queue.is_empty() {
            self.idle.remove(key);
        }
        found
    }

    /// Puts `value` back as idle under `key`. Returns what has to go to make room (the
    /// key's oldest beyond its share, then the pool's oldest beyond the total), or the
    /// value itself if it is too old to keep.
    pub fn give_back(&mut self, key: K, value: P, born: Instant, now: Instant) -> Vec<P> {
        let entry = Idle {
            value,
            born,
            returned: now,
        };
        if now.duration_since(born) >= self.limits.max_age
            || self.limits.idle_per_repository == 0
            || self.limits.idle_total == 0
        {
            return vec![entry.value];
        }
        let mut out = Vec::new();
        let queue = self.idle.entry(key).or_default();
        queue.push_back(entry);
        self.count += 1;
        while queue.len() > self.limits.idle_per_repository {
            if let Some(old) = queue.pop_front() {
                self.count -= 1;
                out.push(old.value);
            }
        }
        while self.count > self.limits.idle_total {
            match self.pop_oldest() {
                Some(v) => out.push(v),
                None => break,
            }
        }
        out
    }

    /// The value idle longest, whatever its key (to make room for another process).
    pub fn pop_oldest(&mut self) -> Option<P> {
        let key = self
            .idle
            .iter()
            .filter_map(|(k, q)| q.front().map(|e| (e.returned, k)))
            .min_by_key(|(returned, _)| *returned)
            .map(|(_, k)| k.clone())?;
        let queue = self.idle.get_mut(&key)?;
        let entry = queue.pop_front()?;
        self.count -= 1;
        if queue.is_empty() {
            self.idle.remove(&key);
        }
        Some(entry.value)
    }

    /// Every value idle past the timeout or older than the maximum age.
    pub fn reap(&mut self, now: Instant) -> Vec<P> {
        let mut out = Vec::new();
        let limits = self.limits;
        self.idle.retain(|_, queue| {
            let (keep, gone): (VecDeque<_>, VecDeque<_>) =
                queue.drain(..).partition(|e| !expired_by(&limits, e, now));
            out.extend(gone.into_iter().map(|e| e.value));
            *queue = keep;
            !queue.is_empty()
        });
        self.count = self.idle.values().map(VecDeque::len).sum();
        out
    }

    /// Every idle value whose key `matches` (a repository removed or repaired).
    pub fn remove_where(&mut self, mut matches: impl FnMut(&K) -> bool) -> Vec<P> {
        let keys: Vec<K> = self.idle.keys().filter(|k| matches(k)).cloned().collect();
        let mut out = Vec::new();
        for k in keys {
            if let Some(queue) = self.idle.remove(&k) {
                self.count -= queue.len();
                out.extend(queue.into_iter().map(|e| e.value));
            }
        }
        out
    }

    /// Everything idle (shutdown).
    pub fn drain(&mut self) -> Vec<P> {
        self.count = 0;
        self.idle
            .drain()
            .flat_map(|(_, q)| q.into_iter().map(|e| e.value))
            .collect()
    }
}

fn expired_by<P>(limits: &Limits, entry: &Idle<P>, now: Instant) -> bool {
    now.duration_since(entry.returned) >= limits.idle_timeout
        || now.duration_since(entry.born) >= limits.max_age
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            idle_per_repository: 2,
            idle_total: 3,
            processes: 10,
            idle_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(100),
        }
    }

    #[test]
    fn the_most_recent_idle_value_of_a_key_is_taken() {
        let t = Instant::now();
        let mut b: Book<&str, u32> = Book::new(limits());
        assert!(b.give_back("a", 1, t, t).is_empty());
        assert!(
            b.give_back("a", 2, t, t + Duration::from_secs(1))
                .is_empty()
        );
        let mut stale = Vec::new();
        let now = t + Duration::from_secs(2);
        assert_eq!(b.take(&"a", now, &mut stale).map(|x| x.0), Some(2));
        assert_eq!(b.take(&"a", now, &mut stale).map(|x| x.0), Some(1));
        assert_eq!(b.take(&"a", now, &mut stale), None);
        assert_eq!(b.take(&"b", now, &mut stale), None);
        assert!(stale.is_empty());
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn full_keys_and_a_full_pool_drop_their_oldest() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let mut b: Book<&str, u32> = Book::new(limits());
        b.give_back("a", 1, t, t);
        b.give_back("a", 2, t, t + s);
        // A third for "a" pushes its oldest out.
        assert_eq!(b.give_back("a", 3, t, t + 2 * s), vec![1]);
        b.give_back("b", 4, t, t + 3 * s);
        // Four idle in all, three allowed: the pool's oldest (2, of "a") goes.
        assert_eq!(b.give_back("c", 5, t, t + 4 * s), vec![2]);
        assert_eq!(b.len(), 3);
        assert_eq!(b.pop_oldest(), Some(3));
        assert_eq!(b.len(), 2);
    }

    #[test]
    fn idle_and_old_values_are_reaped_and_never_handed_out() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        let mut b: Book<&str, u32> = Book::new(limits());
        b.give_back("a", 1, t, t);
        b.give_back("b", 2, t, t + 5 * s);
        // At t+12: 1 idled 12 s (over 10), 2 idled 7 s.
        assert_eq!(b.reap(t + 12 * s), vec![1]);
        assert_eq!(b.len(), 1);
        // Taken after its idle timeout: handed back as stale, not as the answer.
        let mut stale = Vec::new();
        assert_eq!(b.take(&"b", t + 16 * s, &mut stale), None);
        assert_eq!(stale, vec![2]);
        // Past the maximum age it is not even kept.
        assert_eq!(b.give_back("a", 3, t, t + 100 * s), vec![3]);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn a_repository_can_be_cleared() {
        let t = Instant::now();
        let mut b: Book<String, u32> = Book::new(limits());
        b.give_back("a".into(), 1, t, t);
        b.give_back("b".into(), 2, t, t);
        let mut gone = b.remove_where(|k| k == "a");
        gone.sort();
        assert_eq!(gone, vec![1]);
        assert_eq!(b.len(), 1);
        assert_eq!(b.drain(), vec![2]);
        assert_eq!(b.len(), 0);
    }
}
