//! What GitLab's checks of one transaction produced, as the verdict record carries it
//! to every replica, and what each replica's git hooks answer from it. Pure: the same
//! record gives the same bytes on every replica ("same verdict, same bytes").

use std::collections::BTreeMap;

use refvote_cluster::records::VerdictRecord;
use refvote_gitlab::{Refusal, Verdict};
use refvote_proto::hook::HookAnswer;
use serde::{Deserialize, Serialize};

/// The designated voter's checks, recorded in the verdict's `detail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checked {
    /// `/allowed`, the custom pre-receive hooks and `/pre_receive`.
    pub verdict: Verdict,
    /// Refs the custom update hooks refused (the others go on).
    #[serde(default)]
    pub refused_refs: BTreeMap<String, Refusal>,
    /// What the checks printed (custom hook output), shown by every replica's
    /// pre-receive hook.
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// The changes that were checked, exactly as the designated voter's git gave them.
    #[serde(default)]
    pub changes: String,
}

impl Checked {
    /// The verdict record `by` stores for these checks.
    pub fn record(&self, by: &str) -> VerdictRecord {
        let message = match &self.verdict {
            Verdict::Allow => String::new(),
            Verdict::Deny { refusal } => refusal.replayed_stderr(),
        };
        VerdictRecord {
            allow: self.verdict == Verdict::Allow,
            by: by.to_owned(),
            message,
            detail: serde_json::to_value(self).unwrap_or(serde_json::Value::Null),
        }
    }

    /// The checks a stored verdict stands for: its detail, or — for a deny written on
    /// the designated voter's behalf (the fence), which carries none — a refusal with
    /// its message.
    pub fn from_record(record: &VerdictRecord) -> Checked {
        if let Ok(checked) = serde_json::from_value::<Checked>(record.detail.clone())
            && checked.verdict.is_allow() == record.allow
        {
            return checked;
        }
        let verdict = if record.allow {
            Verdict::Allow
        } else {
            Verdict::Deny {
                refusal: Refusal::Internal {
                    message: record.message.clone(),
                },
            }
        };
        Checked {
            verdict,
            refused_refs: BTreeMap::new(),
            stdout: String::new(),
            stderr: String::new(),
            changes: String::new(),
        }
    }

    /// What a replica's `pre-receive` hook answers, its git having given `stdin`: the
    /// checks' output, then a refusal's line and exit code; or exit 0. A replica whose
    /// git got other changes than the ones checked refuses the whole push (the router
    /// sends every replica the same commands in one order, so this means a bug).
    pub fn pre_receive_answer(&self, stdin: &[u8]) -> HookAnswer {
        let mut answer = HookAnswer {
            exit_code: 0,
            stdout: self.stdout.clone().into_bytes(),
            stderr: self.stderr.clone().into_bytes(),
        };
        match &self.verdict {
            Verdict::Deny { refusal } => {
                answer.exit_code = refusal.exit_code();
                push_line(&mut answer.stderr, &refusal.hook_stderr());
            }
            Verdict::Allow if self.changes.as_bytes() != stdin => {
                answer.exit_code = 1;
                push_line(
                    &mut answer.stderr,
                    "refvote: push rejected: this replica received other ref updates than the ones GitLab's checks saw",
                );
            }
            Verdict::Allow => {}
        }
        answer
    }

    /// What a replica's `update` hook answers for `reference`: the exit code of the
    /// update hook that refused it (its output was shown at pre-receive), else 0.
    pub fn update_answer(&self, reference: &str) -> HookAnswer {
        let exit_code = match (&self.verdict, self.refused_refs.get(reference)) {
            (Verdict::Deny { refusal }, _) => refusal.exit_code(),
            (Verdict::Allow, Some(refusal)) => refusal.exit_code(),
            (Verdict::Allow, None) => 0,
        };
        HookAnswer {
            exit_code,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// The refusal of an operation's update of `reference`, if any.
    pub fn refusal_of(&self, reference: &str) -> Option<&Refusal> {
        match &self.verdict {
            Verdict::Deny { refusal } => Some(refusal),
            Verdict::Allow => self.refused_refs.get(reference),
        }
    }
}

/// Appends `line` (and a newline, if it has none) unless it is empty.
fn push_line(out: &mut Vec<u8>, line: &str) {
    if line.is_empty() {
        return;
    }
    out.extend_from_slice(line.as_bytes());
    if !line.ends_with('\n') {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use refvote_gitlab::HookKind;

    use super::*;

    const CHANGES: &str = "0000000000000000000000000000000000000000 1111111111111111111111111111111111111111 refs/heads/main\n";

    fn denied() -> Checked {
        Checked {
            verdict: Verdict::Deny {
                refusal: Refusal::AccessCheck {
                    message: "You are not allowed to push code to this project.".into(),
                    user_id: "user-1".into(),
                    protocol: "http".into(),
                    changes: CHANGES.into(),
                },
            },
            refused_refs: BTreeMap::new(),
            stdout: String::new(),
            stderr: String::new(),
            changes: CHANGES.into(),
        }
    }

    fn custom(exit_code: i32) -> Refusal {
        Refusal::CustomHook {
            hook: HookKind::Update,
            exit_code,
            stdout: String::new(),
            stderr: "frozen\n".into(),
            message: "frozen\n".into(),
            note: None,
        }
    }

    #[test]
    fn a_record_round_trips_and_every_replica_answers_the_same() {
        let checked = denied();
        let record = checked.record("node2");
        assert!(!record.allow);
        assert_eq!(
            record.message,
            "GitLab: You are not allowed to push code to this project."
        );
        let replayed = Checked::from_record(&record);
        assert_eq!(replayed, checked);
        let answer = replayed.pre_receive_answer(CHANGES.as_bytes());
        assert_eq!(answer.exit_code, 1);
        assert_eq!(
            String::from_utf8(answer.stderr).unwrap(),
            "GitLab: You are not allowed to push code to this project.\n"
        );
    }

    #[test]
    fn a_fence_carries_only_its_message() {
        let fence = VerdictRecord {
            allow: false,
            by: "node1".into(),
            message: "refvote: update rejected: GitLab's checks did not finish".into(),
            detail: serde_json::Value::Null,
        };
        let checked = Checked::from_record(&fence);
        let answer = checked.pre_receive_answer(b"");
        assert_eq!(answer.exit_code, 1);
        assert_eq!(
            String::from_utf8(answer.stderr).unwrap(),
            "refvote: update rejected: GitLab's checks did not finish\n"
        );
        assert!(matches!(
            checked.refusal_of("refs/heads/x"),
            Some(Refusal::Internal { .. })
        ));
        // A detail that contradicts the record's own verdict is not trusted.
        let odd = VerdictRecord {
            detail: serde_json::to_value(Checked {
                verdict: Verdict::Allow,
                ..denied()
            })
            .unwrap(),
            ..fence
        };
        assert!(!Checked::from_record(&odd).verdict.is_allow());
    }

    #[test]
    fn an_allow_shows_the_checks_output_and_the_update_hooks_refusals() {
        let mut checked = Checked {
            verdict: Verdict::Allow,
            stdout: "checking\n".into(),
            ..denied()
        };
        checked
            .refused_refs
            .insert("refs/heads/frozen".into(), custom(3));
        let answer = checked.pre_receive_answer(CHANGES.as_bytes());
        assert_eq!(
            (answer.exit_code, answer.stdout),
            (0, b"checking\n".to_vec())
        );
        assert_eq!(checked.update_answer("refs/heads/frozen").exit_code, 3);
        assert_eq!(checked.update_answer("refs/heads/main").exit_code, 0);
        assert!(checked.refusal_of("refs/heads/main").is_none());
        assert!(checked.refusal_of("refs/heads/frozen").is_some());
        // Other changes than the checked ones: refused.
        let other = checked.pre_receive_answer(b"x y refs/heads/other\n");
        assert_eq!(other.exit_code, 1);
        assert!(
            String::from_utf8(other.stderr)
                .unwrap()
                .contains("other ref updates")
        );
        let record = checked.record("node1");
        assert!(record.allow && record.message.is_empty());
        assert_eq!(Checked::from_record(&record), checked);
    }
}
