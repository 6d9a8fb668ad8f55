//! The checker: what must hold once the faults stop and the repairs settle, read from
//! the history and from the replicas themselves (DESIGN.md §5, issue 6).
//!
//! - Lost update: an acknowledged push is missing from the final state (its writer's
//!   branch ends behind it).
//! - Failed visible: a value whose push was reported failed is read or ends up on a ref.
//! - Stale read: a read returned a value older than one acknowledged before it began.
//! - Diverged replicas: replicas' refs or checksums differ after repair, or one is not
//!   up to date.
//!
//! Unknown outcomes may go either way. Reads that failed are counted, not checked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use super::history::{FaultEvent, Op, OpKind, Outcome, short};
use super::recovery::{self, KindFigures};
use super::workload::{RACE, UPDATE_PREFIX};

/// The refs of one replica: name → object id.
pub type Refs = BTreeMap<String, String>;

#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<String>,
    pub acked: usize,
    pub failed: usize,
    pub unknown: usize,
    pub reads: usize,
    pub reads_failed: usize,
    /// Fault kind → count, longest write unavailability while it lasted, and longest
    /// recovery from the fault's end to the first acknowledged write and to every
    /// replica up to date.
    pub faults: BTreeMap<String, KindFigures>,
    /// The same, only for faults injected while every replica was up to date on a live
    /// node (no earlier fault's outdated replica still in the way).
    pub faults_clean: BTreeMap<String, KindFigures>,
    /// Each time a replica was not up to date, how long until it was again.
    pub repairs: Vec<Duration>,
    pub settle: Duration,
    /// The most common reasons writes were not acknowledged, with counts.
    pub refusals: Vec<(usize, String)>,
    /// Writes by call: [acknowledged, failed, unknown].
    pub calls: BTreeMap<&'static str, [usize; 3]>,
}

/// Which call a write was made with.
fn call_of(o: &Op) -> &'static str {
    let grpc = o.client == "grpc-writer";
    match (&o.kind, grpc, o.branch.starts_with(UPDATE_PREFIX)) {
        (OpKind::Commit { .. }, _, _) => "UserCommitFiles",
        (OpKind::Push, true, true) => "UpdateReferences",
        (OpKind::Delete, true, true) => "DeleteRefs",
        (OpKind::Push, true, false) => "UserCreateBranch",
        (OpKind::Delete, true, false) => "UserDeleteBranch",
        (OpKind::Read, _, _) => "FindBranch",
        _ => "git push",
    }
}

impl Report {
    pub fn longest_repair(&self) -> Duration {
        self.repairs.iter().copied().max().unwrap_or_default()
    }

    /// A human summary (the lines RELIABILITY.md is written from).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "seed {}", self.seed);
        let _ = writeln!(
            s,
            "writes: {} acknowledged, {} failed, {} unknown; reads: {} ({} failed)",
            self.acked, self.failed, self.unknown, self.reads, self.reads_failed
        );
        for (call, [a, f, u]) in &self.calls {
            let _ = writeln!(s, "  {call}: {a} acknowledged, {f} failed, {u} unknown");
        }
        let _ = writeln!(
            s,
            "faults (kind: count, longest write unavailability, longest recovery from the fault's end to the first acknowledged write / to every replica up to date; then the same over those injected with every replica up to date; '>' a lower bound, the next fault came first):"
        );
        for (kind, all) in &self.faults {
            let clean = self.faults_clean.get(kind).copied().unwrap_or_default();
            let show = |f: &KindFigures| {
                format!(
                    "{}, {:.2} s, {} / {}",
                    f.count,
                    f.unavailable.as_secs_f64(),
                    f.to_ack.show(),
                    f.to_sync.show()
                )
            };
            let _ = writeln!(s, "  {kind}: {}; clean: {}", show(all), show(&clean));
        }
        let _ = writeln!(
            s,
            "replica outdated intervals: {}, longest {:.2} s; settled {:.2} s after the faults stopped",
            self.repairs.len(),
            self.longest_repair().as_secs_f64(),
            self.settle.as_secs_f64()
        );
        let lost = self.count("lost update");
        let stale = self.count("stale read");
        let diverged = self.count("diverged");
        let failed_visible = self.count("failed visible");
        let _ = writeln!(
            s,
            "lost updates {lost}, stale reads {stale}, failed-but-visible {failed_visible}, diverged replicas {diverged}"
        );
        for (n, why) in &self.refusals {
            let _ = writeln!(s, "  {n} x {why}");
        }
        for v in &self.violations {
            let _ = writeln!(s, "VIOLATION: {v}");
        }
        s
    }

    fn count(&self, what: &str) -> usize {
        self.violations
            .iter()
            .filter(|v| v.starts_with(what))
            .count()
    }
}

/// Checks `ops` against the final refs of every replica (`replicas`: node → refs, and
/// node → checksum, and whether etcd says it is up to date). `commits` maps the commit
/// message of every commit in the final history of
/// [`GRPC_BRANCH`](super::workload::GRPC_BRANCH) to its id: it
/// tells which `UserCommitFiles` calls the client never heard back from took effect.
/// `synced`: samples of (time, every replica up to date on a live node), for the
/// recovery figures.
pub fn check(
    ops: &[Op],
    faults: &[FaultEvent],
    replicas: &BTreeMap<String, (Refs, String, bool)>,
    commits: &HashMap<String, String>,
    synced: &[(Duration, bool)],
    run_end: Duration,
    report: &mut Report,
) {
    let ops = resolve_commits(ops, commits, report);
    let ops = ops.as_slice();
    let writes: Vec<&Op> = ops.iter().filter(|o| o.kind != OpKind::Read).collect();
    report.acked = writes.iter().filter(|o| o.outcome == Outcome::Ack).count();
    report.failed = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Failed)
        .count();
    report.unknown = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Unknown)
        .count();
    for o in &writes {
        let e = report.calls.entry(call_of(o)).or_default();
        match o.outcome {
            Outcome::Ack => e[0] += 1,
            Outcome::Failed => e[1] += 1,
            _ => e[2] += 1,
        }
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for o in writes.iter().filter(|o| o.outcome != Outcome::Ack) {
        let why: String = o.detail.chars().take(160).collect();
        *reasons
            .entry(format!("{:?}: {why}", o.outcome))
            .or_default() += 1;
    }
    let mut reasons: Vec<(usize, String)> = reasons.into_iter().map(|(k, v)| (v, k)).collect();
    reasons.sort_by(|a, b| b.cmp(a));
    reasons.truncate(8);
    report.refusals = reasons;
    let reads: Vec<&Op> = ops.iter().filter(|o| o.kind == OpKind::Read).collect();
    report.reads = reads.len();
    report.reads_failed = reads
        .iter()
        .filter(|o| !matches!(o.outcome, Outcome::Read(_)))
        .count();

    // Replicas: all up to date, same refs, same checksum.
    let mut first: Option<(&String, &Refs, &String)> = None;
    for (node, (refs, checksum, up_to_date)) in replicas {
        if !up_to_date {
            report
                .violations
                .push(format!("diverged: {node} is not up to date after repair"));
        }
        match first {
            None => first = Some((node, refs, checksum)),
            Some((n0, r0, c0)) => {
                if r0 != refs {
                    report.violations.push(format!(
                        "diverged: refs of {n0} and {node} differ: {}",
                        diff(r0, refs)
                    ));
                } else if c0 != checksum {
                    report.violations.push(format!(
                        "diverged: checksums of {n0} ({c0}) and {node} ({checksum}) differ"
                    ));
                }
            }
        }
    }
    let Some((_, final_refs, _)) = first else {
        report
            .violations
            .push("diverged: no replica to read".into());
        return;
    };
    let final_of = |branch: &str| final_refs.get(&format!("refs/heads/{branch}")).cloned();

    let failed_values: HashSet<&str> = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Failed)
        .filter_map(|o| o.value.as_deref())
        .collect();
    // Values pushed with another outcome too (a tmp branch created at a tip that was
    // also pushed elsewhere) are not "failed values".
    let ok_values: HashSet<&str> = writes
        .iter()
        .filter(|o| o.outcome != Outcome::Failed)
        .filter_map(|o| o.value.as_deref())
        .collect();
    let failed_only = |v: &str| failed_values.contains(v) && !ok_values.contains(v);

    // Writers' own branches: a linear history per writer, in push order.
    let mut chains: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in &writes {
        if matches!(o.kind, OpKind::Push | OpKind::Commit { .. }) && o.branch.starts_with('w') {
            chains.entry(o.branch.as_str()).or_default().push(o);
        }
    }
    for (branch, chain) in &chains {
        let index: HashMap<&str, usize> = chain
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.value.as_deref().map(|v| (v, i)))
            .collect();
        let last_acked = chain.iter().rposition(|o| o.outcome == Outcome::Ack);
        let fin = final_of(branch);
        let fin_index = fin.as_deref().and_then(|v| index.get(v).copied());
        if let Some(v) = fin.as_deref() {
            if fin_index.is_none() {
                report.violations.push(format!(
                    "failed visible: {branch} ends at {} which no client pushed",
                    short(v)
                ));
            }
            if failed_only(v) {
                report.violations.push(format!(
                    "failed visible: {branch} ends at {} whose push was reported failed",
                    short(v)
                ));
            }
        }
        if let Some(a) = last_acked
            && fin_index.is_none_or(|f| f < a)
        {
            report.violations.push(format!(
                "lost update: {branch} ends at {} but the acknowledged push {} came later: {}",
                fin.as_deref().map(short).unwrap_or("(absent)"),
                a,
                chain[a]
            ));
        }
        // Reads of this branch.
        for r in reads.iter().filter(|r| r.branch == *branch) {
            let Outcome::Read(value) = &r.outcome else {
                continue;
            };
            let needed = chain
                .iter()
                .enumerate()
                .filter(|(_, o)| o.outcome == Outcome::Ack && o.end < r.start)
                .map(|(i, _)| i)
                .max();
            let got = value.as_deref().map(|v| index.get(v).copied());
            match (needed, got) {
                (_, Some(None)) => report.violations.push(format!(
                    "failed visible: a read of {branch} returned {} which no client pushed: {r}",
                    value.as_deref().map(short).unwrap_or("-")
                )),
                (Some(n), None) => report.violations.push(format!(
                    "stale read: {branch} absent, but push {n} was acknowledged before the read began: {r}; acknowledged: {}",
                    chain[n]
                )),
                (Some(n), Some(Some(g))) if g < n => report.violations.push(format!(
                    "stale read: {branch} at push {g}, but push {n} was acknowledged before the read began: {r}; acknowledged: {}",
                    chain[n]
                )),
                _ => {}
            }
            if let Some(v) = value.as_deref()
                && failed_only(v)
            {
                report.violations.push(format!(
                    "failed visible: a read returned {} whose push was reported failed: {r}",
                    short(v)
                ));
            }
        }
    }

    // The race branch: ends at a value some non-failed push wrote; and at the last
    // acknowledged push when that push was strictly after every other one.
    let race: Vec<&&Op> = writes.iter().filter(|o| o.branch == RACE).collect();
    if !race.is_empty() {
        let fin = final_of(RACE);
        match fin.as_deref() {
            Some(v) if failed_only(v) => report.violations.push(format!(
                "failed visible: {RACE} ends at {} whose push was reported failed",
                short(v)
            )),
            Some(v) if !race.iter().any(|o| o.value.as_deref() == Some(v)) => {
                report.violations.push(format!(
                    "failed visible: {RACE} ends at {} which no race push wrote",
                    short(v)
                ))
            }
            _ => {}
        }
        if let Some(last) = race
            .iter()
            .filter(|o| o.outcome == Outcome::Ack)
            .max_by_key(|o| o.end)
        {
            let strictly_last = race
                .iter()
                .filter(|o| {
                    (o.client != last.client || o.start != last.start)
                        && o.outcome != Outcome::Failed
                })
                .all(|o| o.end < last.start);
            if strictly_last && fin.as_deref() != last.value.as_deref() {
                report.violations.push(format!(
                    "lost update: {RACE} ends at {} but the last acknowledged push was {last}",
                    fin.as_deref().map(short).unwrap_or("(absent)")
                ));
            }
        }
    }

    // Short-lived branches: a failed creation never appears; an acknowledged deletion
    // leaves nothing; an acknowledged creation whose deletion failed stays.
    let mut tmp: BTreeMap<&str, (Option<&Op>, Option<&Op>)> = BTreeMap::new();
    for o in &writes {
        if o.branch.starts_with("t-") {
            let e = tmp.entry(o.branch.as_str()).or_default();
            match o.kind {
                OpKind::Push => e.0 = Some(o),
                OpKind::Delete => e.1 = Some(o),
                OpKind::Read | OpKind::Commit { .. } => {}
            }
        }
    }
    for (branch, (create, delete)) in tmp {
        let fin = final_of(branch);
        let created = create.map(|c| &c.outcome);
        let deleted = delete.map(|d| &d.outcome);
        if fin.is_some() && (deleted == Some(&Outcome::Ack) || created == Some(&Outcome::Failed)) {
            report.violations.push(format!(
                "failed visible: {branch} exists at the end; creation {:?}, deletion {:?}",
                created, deleted
            ));
        }
        if fin.is_none()
            && created == Some(&Outcome::Ack)
            && matches!(deleted, Some(Outcome::Failed))
        {
            report.violations.push(format!(
                "lost update: {branch} was created (acknowledged) and its deletion failed, but it is gone"
            ));
        }
    }

    // Branches one client moves with UpdateReferences and deletes with DeleteRefs, one
    // call after another: the branch ends as the last acknowledged call left it, or as
    // a call with an unknown outcome left it (such a call may take effect late, after
    // later ones). A call reported failed (a wrong expected old value) changes nothing.
    let mut single: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for o in &writes {
        if o.branch.starts_with(UPDATE_PREFIX) {
            single.entry(o.branch.as_str()).or_default().push(o);
        }
    }
    for (branch, seq) in single {
        let effect = |o: &Op| match o.kind {
            OpKind::Delete => None,
            _ => o.value.clone(),
        };
        let last_acked = seq.iter().rposition(|o| o.outcome == Outcome::Ack);
        let mut allowed: Vec<Option<String>> = vec![match last_acked {
            Some(i) => effect(seq[i]),
            None => None,
        }];
        allowed.extend(
            seq.iter()
                .filter(|o| o.outcome == Outcome::Unknown)
                .map(|o| effect(o)),
        );
        let fin = final_of(branch);
        if allowed.contains(&fin) {
            continue;
        }
        let history = seq
            .iter()
            .map(|o| o.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let only_failed = seq
            .iter()
            .filter(|o| effect(o) == fin)
            .all(|o| o.outcome == Outcome::Failed)
            && seq.iter().any(|o| effect(o) == fin);
        let what = if only_failed {
            "failed visible"
        } else {
            "lost update"
        };
        report.violations.push(format!(
            "{what}: {branch} ends {} but its calls allow only {:?}: {history}",
            fin.as_deref().map(short).unwrap_or("absent"),
            allowed
                .iter()
                .map(|v| v.as_deref().map(short).unwrap_or("absent"))
                .collect::<Vec<_>>()
        ));
    }

    // Per fault: unavailability while it lasted, and recovery from its end.
    let mut ack_ends: Vec<Duration> = writes
        .iter()
        .filter(|o| o.outcome == Outcome::Ack)
        .map(|o| o.end)
        .collect();
    ack_ends.sort();
    let figures = recovery::per_fault(faults, &ack_ends, synced, run_end);
    (report.faults, report.faults_clean) = recovery::by_kind(faults, &figures);
}

/// `ops` with the value of every `UserCommitFiles` call whose answer the client did not
/// get filled in from `commits` (its message found in the final history). A call
/// reported failed whose commit is there is a violation.
fn resolve_commits(ops: &[Op], commits: &HashMap<String, String>, report: &mut Report) -> Vec<Op> {
    let mut out = ops.to_vec();
    for o in &mut out {
        let OpKind::Commit { message } = &o.kind else {
            continue;
        };
        let found = commits.get(message);
        match (&o.outcome, found) {
            (Outcome::Failed, Some(c)) => report.violations.push(format!(
                "failed visible: {} holds commit {} of a call reported failed: {o}",
                o.branch,
                short(c)
            )),
            (Outcome::Ack, Some(c)) if o.value.as_ref() != Some(c) => {
                report.violations.push(format!(
                    "diverged: the call's answer named commit {} but {} holds {} for its message: {o}",
                    o.value.as_deref().map(short).unwrap_or("-"),
                    o.branch,
                    short(c)
                ))
            }
            (Outcome::Unknown, Some(c)) => o.value = Some(c.clone()),
            _ => {}
        }
    }
    out
}

fn diff(a: &Refs, b: &Refs) -> String {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            Some(w) if w == v => {}
            Some(w) => out.push(format!("{k}: {} vs {}", short(v), short(w))),
            None => out.push(format!("{k}: {} vs absent", short(v))),
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("{k}: absent vs {}", short(&b[k])));
    }
    out.truncate(10);
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(branch: &str, value: &str, start: u64, end: u64, outcome: Outcome) -> Op {
        Op {
            client: "c".into(),
            router: 0,
            kind: OpKind::Push,
            branch: branch.into(),
            value: Some(value.into()),
            start: Duration::from_millis(start),
            end: Duration::from_millis(end),
            outcome,
            detail: String::new(),
        }
    }

    fn read(branch: &str, value: Option<&str>, start: u64) -> Op {
        Op {
            kind: OpKind::Read,
            value: None,
            outcome: Outcome::Read(value.map(Into::into)),
            ..op(branch, "", start, start + 1, Outcome::Ack)
        }
    }

    fn replicas(refs: &[(&str, &str)]) -> BTreeMap<String, (Refs, String, bool)> {
        let refs: Refs = refs
            .iter()
            .map(|(k, v)| (format!("refs/heads/{k}"), v.to_string()))
            .collect();
        (1..=3)
            .map(|i| (format!("node{i}"), (refs.clone(), "sum".into(), true)))
            .collect()
    }

    fn run(ops: &[Op], reps: &BTreeMap<String, (Refs, String, bool)>) -> Report {
        let mut r = Report::default();
        check(
            ops,
            &[],
            reps,
            &HashMap::new(),
            &[],
            Duration::from_secs(1),
            &mut r,
        );
        r
    }

    #[test]
    fn a_clean_history_passes() {
        let ops = [
            op("w0", "a", 0, 10, Outcome::Ack),
            read("w0", Some("a"), 11),
            op("w0", "b", 12, 20, Outcome::Unknown),
            read("w0", Some("a"), 21),
            read("w0", Some("b"), 22),
        ];
        let r = run(&ops, &replicas(&[("w0", "b")]));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
    }

    #[test]
    fn finds_a_lost_update() {
        let ops = [
            op("w0", "a", 0, 10, Outcome::Ack),
            op("w0", "b", 12, 20, Outcome::Ack),
        ];
        let r = run(&ops, &replicas(&[("w0", "a")]));
        assert!(
            r.violations[0].starts_with("lost update"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn finds_a_stale_read_and_a_failed_value() {
        let ops = [
            op("w0", "a", 0, 10, Outcome::Ack),
            op("w0", "b", 12, 20, Outcome::Ack),
            read("w0", Some("a"), 21),
            op("w0", "c", 22, 30, Outcome::Failed),
            read("w0", Some("c"), 31),
        ];
        let r = run(&ops, &replicas(&[("w0", "b")]));
        let kinds: Vec<&str> = r.violations.iter().map(|v| &v[..10]).collect();
        assert!(kinds.contains(&"stale read"), "{:?}", r.violations);
        assert!(kinds.contains(&"failed vis"), "{:?}", r.violations);
    }

    fn with(kind: OpKind, o: Op) -> Op {
        Op { kind, ..o }
    }

    fn del(branch: &str, start: u64, outcome: Outcome) -> Op {
        Op {
            kind: OpKind::Delete,
            value: None,
            ..op(branch, "", start, start + 5, outcome)
        }
    }

    #[test]
    fn a_failed_update_references_must_stay_invisible() {
        // Create at a, a wrong expectation refused (b), the right one (b), a delete.
        let round = |good: Outcome, delete: Outcome| {
            vec![
                op("u-g-1", "a", 0, 5, Outcome::Ack),
                op("u-g-1", "b", 10, 15, Outcome::Failed),
                op("u-g-1", "b", 20, 25, good),
                del("u-g-1", 30, delete),
            ]
        };
        let r = run(&round(Outcome::Ack, Outcome::Ack), &replicas(&[]));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        // The delete's outcome unknown: gone or at b are both right, a is not.
        let ops = round(Outcome::Ack, Outcome::Unknown);
        assert!(
            run(&ops, &replicas(&[("u-g-1", "b")]))
                .violations
                .is_empty()
        );
        let r = run(&ops, &replicas(&[("u-g-1", "a")]));
        assert!(
            r.violations[0].starts_with("lost update"),
            "{:?}",
            r.violations
        );
        // Only refused calls moved it to b: b must never show.
        let ops = round(Outcome::Failed, Outcome::Failed);
        assert!(
            run(&ops, &replicas(&[("u-g-1", "a")]))
                .violations
                .is_empty()
        );
        let r = run(&ops, &replicas(&[("u-g-1", "b")]));
        assert!(
            r.violations[0].starts_with("failed visible"),
            "{:?}",
            r.violations
        );
    }

    #[test]
    fn commits_whose_answer_was_lost_are_found_by_message() {
        let commit = |msg: &str, value: Option<&str>, start: u64, outcome: Outcome| Op {
            value: value.map(Into::into),
            ..with(
                OpKind::Commit {
                    message: msg.into(),
                },
                op("wg", "", start, start + 5, outcome),
            )
        };
        let ops = [
            commit("m1", Some("c1"), 0, Outcome::Ack),
            commit("m2", None, 10, Outcome::Unknown),
            commit("m3", None, 20, Outcome::Failed),
        ];
        let mut r = Report::default();
        let known: HashMap<String, String> = [("m1", "c1"), ("m2", "c2")]
            .map(|(m, c)| (m.into(), c.into()))
            .into();
        let reps = replicas(&[("wg", "c2")]);
        check(
            &ops,
            &[],
            &reps,
            &known,
            &[],
            Duration::from_secs(1),
            &mut r,
        );
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        // The failed call's commit in the history; the acknowledged one missing.
        let mut r = Report::default();
        let known: HashMap<String, String> =
            [("m3", "c3")].map(|(m, c)| (m.into(), c.into())).into();
        let reps = replicas(&[("wg", "c3")]);
        check(
            &ops,
            &[],
            &reps,
            &known,
            &[],
            Duration::from_secs(1),
            &mut r,
        );
        let kinds: Vec<&str> = r.violations.iter().map(|v| &v[..10]).collect();
        assert!(kinds.contains(&"failed vis"), "{:?}", r.violations);
        assert!(kinds.contains(&"lost updat"), "{:?}", r.violations);
    }

    #[test]
    fn finds_diverged_replicas() {
        let mut reps = replicas(&[("w0", "a")]);
        reps.get_mut("node2")
            .unwrap()
            .0
            .insert("refs/heads/w0".into(), "z".into());
        let r = run(&[op("w0", "a", 0, 10, Outcome::Ack)], &reps);
        assert!(
            r.violations.iter().any(|v| v.starts_with("diverged")),
            "{:?}",
            r.violations
        );
    }
}
