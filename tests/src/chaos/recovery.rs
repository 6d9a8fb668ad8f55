//! Recovery figures (issue 20): for each fault, the longest write unavailability while
//! it lasted, and, from the moment it ended (member restarted, link healed, process
//! continued), the time to the first acknowledged write and to every replica up to date
//! on a live node again. Pure: computed from the history and the replica samples.

use std::collections::BTreeMap;
use std::time::Duration;

use super::history::FaultEvent;

/// A time from a fault's end. `censored`: the event was not seen before the next fault
/// began (or the run ended), so `time` is only a lower bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub time: Duration,
    pub censored: bool,
}

impl Span {
    fn worse(self, other: Span) -> Span {
        if other.time > self.time { other } else { self }
    }

    /// `1.23 s`, or `> 1.23 s` for a lower bound.
    pub fn show(&self) -> String {
        format!(
            "{}{:.2} s",
            if self.censored { "> " } else { "" },
            self.time.as_secs_f64()
        )
    }
}

/// What one fault cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecovery {
    /// The longest gap between acknowledged writes from the fault's injection to the
    /// next fault's.
    pub unavailable: Duration,
    /// Fault end → the first write acknowledged after it.
    pub to_ack: Span,
    /// Fault end → the first sample with every replica up to date on a live node.
    pub to_sync: Span,
}

/// The worst of every fault of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindFigures {
    pub count: usize,
    pub unavailable: Duration,
    pub to_ack: Span,
    pub to_sync: Span,
}

impl KindFigures {
    fn add(&mut self, r: &FaultRecovery) {
        self.count += 1;
        self.unavailable = self.unavailable.max(r.unavailable);
        self.to_ack = self.to_ack.worse(r.to_ack);
        self.to_sync = self.to_sync.worse(r.to_sync);
    }
}

/// Per fault (in `faults`' order). `ack_ends`: when each acknowledged write ended,
/// sorted. `synced`: samples (time, every replica up to date on a live node), sorted by
/// time. `run_end`: when the workload stopped (acknowledgements end there; samples go
/// on through the settling).
pub fn per_fault(
    faults: &[FaultEvent],
    ack_ends: &[Duration],
    synced: &[(Duration, bool)],
    run_end: Duration,
) -> Vec<FaultRecovery> {
    let mut out = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        let next = faults.get(i + 1).map(|n| n.injected);
        let window_end = next.unwrap_or(run_end);
        let mut unavailable = Duration::ZERO;
        let mut prev = f.injected;
        for &a in ack_ends.iter().filter(|a| **a > f.injected) {
            unavailable = unavailable.max(a - prev);
            prev = a;
            if a > window_end {
                break;
            }
        }
        if prev < window_end {
            unavailable = unavailable.max(window_end - prev);
        }
        let to_ack = match ack_ends.iter().find(|a| **a >= f.ended) {
            Some(&a) if a <= window_end => Span {
                time: a - f.ended,
                censored: false,
            },
            _ => Span {
                time: window_end.saturating_sub(f.ended),
                censored: true,
            },
        };
        // Samples go on after the run ends, so the last fault's has no window end.
        let sync_end = next.unwrap_or(Duration::MAX);
        let last_sample = synced.last().map(|s| s.0).unwrap_or(f.ended);
        let to_sync = match synced.iter().find(|(t, ok)| *ok && *t >= f.ended) {
            Some(&(t, _)) if t <= sync_end => Span {
                time: t - f.ended,
                censored: false,
            },
            _ => Span {
                time: sync_end.min(last_sample).saturating_sub(f.ended),
                censored: true,
            },
        };
        out.push(FaultRecovery {
            unavailable,
            to_ack,
            to_sync,
        });
    }
    out
}

/// Worst figures per fault kind: over every fault, and over those injected clean
/// (every replica up to date on a live node: nothing but this fault in the way).
pub fn by_kind(
    faults: &[FaultEvent],
    figures: &[FaultRecovery],
) -> (BTreeMap<String, KindFigures>, BTreeMap<String, KindFigures>) {
    let mut all: BTreeMap<String, KindFigures> = BTreeMap::new();
    let mut clean: BTreeMap<String, KindFigures> = BTreeMap::new();
    for (f, r) in faults.iter().zip(figures) {
        all.entry(f.kind.clone()).or_default().add(r);
        if f.clean {
            clean.entry(f.kind.clone()).or_default().add(r);
        }
    }
    (all, clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fault(injected: u64, ended: u64, clean: bool) -> FaultEvent {
        FaultEvent {
            kind: "k".into(),
            target: "t".into(),
            injected: ms(injected),
            ended: ms(ended),
            healed: ms(ended + 10),
            clean,
        }
    }

    #[test]
    fn recovery_counts_from_the_fault_end_to_the_first_ack_and_the_first_synced_sample() {
        let faults = [fault(1000, 3000, true), fault(10_000, 11_000, false)];
        let acks = [
            ms(500),
            ms(1200),
            ms(3400),
            ms(3600),
            ms(10_500),
            ms(14_000),
        ];
        let synced = [
            (ms(900), true),
            (ms(3100), false),
            (ms(5000), true),
            (ms(10_900), false),
            (ms(20_000), false),
        ];
        let r = per_fault(&faults, &acks, &synced, ms(15_000));
        // 3600 → 10500: the gap that runs past the window's end counts whole.
        assert_eq!(r[0].unavailable, ms(6900));
        assert_eq!(
            r[0].to_ack,
            Span {
                time: ms(400),
                censored: false
            }
        );
        assert_eq!(
            r[0].to_sync,
            Span {
                time: ms(2000),
                censored: false
            }
        );
        // The second never synced while samples lasted: a lower bound.
        assert_eq!(
            r[1].to_ack,
            Span {
                time: ms(3000),
                censored: false
            }
        );
        assert_eq!(
            r[1].to_sync,
            Span {
                time: ms(9000),
                censored: true
            }
        );
        let (all, clean) = by_kind(&faults, &r);
        assert_eq!(all["k"].count, 2);
        assert_eq!(
            all["k"].to_sync,
            Span {
                time: ms(9000),
                censored: true
            }
        );
        assert_eq!(clean["k"].count, 1);
        assert_eq!(clean["k"].to_ack.time, ms(400));
        assert_eq!(clean["k"].to_sync.show(), "2.00 s");
    }

    #[test]
    fn a_recovery_not_seen_before_the_next_fault_is_a_lower_bound() {
        let faults = [fault(1000, 2000, true), fault(2500, 3000, true)];
        let acks = [ms(900), ms(4000)];
        let synced = [(ms(2100), false), (ms(2600), true)];
        let r = per_fault(&faults, &acks, &synced, ms(5000));
        assert_eq!(
            r[0].to_ack,
            Span {
                time: ms(500),
                censored: true
            }
        );
        assert_eq!(
            r[0].to_sync,
            Span {
                time: ms(500),
                censored: true
            }
        );
        assert_eq!(r[0].to_ack.show(), "> 0.50 s");
        assert_eq!(
            r[1].to_ack,
            Span {
                time: ms(1000),
                censored: false
            }
        );
    }
}
