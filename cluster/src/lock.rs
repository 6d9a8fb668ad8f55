//! A repository's administrative write lock (DESIGN.md §4): `locks/<repo>`, created
//! create-only under the holder's lease. New transactions compare its absence at begin;
//! whoever takes it waits for the repository's open transactions to drain, and every
//! write made under it compares the lock's create revision (the fencing token), since a
//! lease alone does not guarantee exclusivity.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::time::Instant;

use crate::error::{Error, LockedBy, Result};
use crate::records::{LockRecord, now_unix_ms};
use crate::repo::RepoId;
use crate::store::{Entry, Store, encode, get_op, ranges};

/// A lock this process holds.
#[derive(Debug, Clone)]
pub struct RepoLock {
    pub repo: RepoId,
    pub record: LockRecord,
    /// The lock key's create revision: the fencing token.
    pub revision: i64,
}

impl RepoLock {
    /// The compare every write made under the lock carries.
    pub fn held(&self, store: &Store) -> Compare {
        Compare::create_revision(
            store.keys().lock(&self.repo),
            CompareOp::Equal,
            self.revision,
        )
    }
}

/// The error a writer gets while `entry` (a `locks/<repo>` key) is held.
pub fn locked_error(repo: &RepoId, entry: &Entry) -> Error {
    match entry.decode::<LockRecord>() {
        Ok(l) => Error::Locked(Box::new(LockedBy {
            repo: repo.clone(),
            operation: l.operation,
            holder: l.holder,
            since: format_unix_ms(l.since_unix_ms),
        })),
        Err(_) => Error::Locked(Box::new(LockedBy {
            repo: repo.clone(),
            operation: "an administrative operation".into(),
            holder: "?".into(),
            since: "?".into(),
        })),
    }
}

impl Store {
    /// Takes `repo`'s write lock for `operation` under `lease`. Fails with
    /// [`Error::Locked`] if someone holds it, [`Error::UnknownRepo`] if the repository
    /// is not registered.
    pub async fn lock_repo(
        &self,
        repo: &RepoId,
        holder: &str,
        operation: &str,
        lease: i64,
    ) -> Result<RepoLock> {
        let keys = self.keys();
        let key = keys.lock(repo);
        let record = LockRecord {
            holder: holder.to_owned(),
            operation: operation.to_owned(),
            since_unix_ms: now_unix_ms(),
        };
        let txn = Txn::new()
            .when([
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                Compare::create_revision(keys.repo(repo), CompareOp::Greater, 0),
            ])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    encode(&record),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                get_op(&key),
            ])
            .or_else([get_op(&key), get_op(&keys.repo(repo))]);
        let resp = self.txn(txn).await?;
        let r = ranges(&resp);
        if resp.succeeded() {
            let entry = r[0].first().ok_or_else(|| {
                Error::Invalid("the lock vanished right after it was taken".into())
            })?;
            tracing::info!(%repo, operation, holder, "repository locked");
            return Ok(RepoLock {
                repo: repo.clone(),
                record,
                revision: entry.create_revision,
            });
        }
        if r[1].is_empty() {
            return Err(Error::UnknownRepo(repo.clone()));
        }
        match r[0].first() {
            Some(e) => Err(locked_error(repo, e)),
            // Released meanwhile: the caller may simply try again.
            None => Err(Error::Contention(1)),
        }
    }

    /// Releases `lock` if it is still the one taken (never someone else's).
    pub async fn unlock(&self, lock: &RepoLock) -> Result<()> {
        let key = self.keys().lock(&lock.repo);
        let txn = Txn::new()
            .when([lock.held(self)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await?;
        tracing::info!(repo = %lock.repo, operation = %lock.record.operation, "repository unlocked");
        Ok(())
    }

    /// Waits until `repo` has no open transaction (its `txrepo/<repo>/` index is empty),
    /// up to `wait`. Call it holding the lock: no new transaction can begin meanwhile.
    pub async fn drain(&self, repo: &RepoId, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let mut tick = Duration::from_millis(5);
        loop {
            let (open, _) = self.get_prefix(&self.keys().txrepo(repo)).await?;
            if open.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotDrained {
                    repo: repo.to_string(),
                    open: open.len(),
                    wait,
                });
            }
            tokio::time::sleep_until((Instant::now() + tick).min(deadline)).await;
            tick = (tick * 2).min(Duration::from_millis(100));
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a Unix time in milliseconds.
pub fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_ms(1_795_000_000_123), "2026-11-18 11:06:40 UTC");
    }
}
