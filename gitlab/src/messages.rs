//! What `/post_receive`'s `messages` look like on the pusher's terminal, byte for byte
//! as Gitaly prints them: a `basic` message as it is, an `alert` as a banner — a rule
//! of `=`, the words wrapped and centred for an 80-column terminal less git's
//! `remote: ` prefix, another rule. Each message is preceded by one newline and
//! followed by two.

use serde::{Deserialize, Serialize};

/// One entry of `/post_receive`'s `messages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostReceiveMessage {
    pub message: String,
    /// `basic` or `alert`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A message of a type Gitaly does not know; what came before it is still printed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message type: {0}")]
pub struct InvalidMessageType(pub String);

/// A terminal is 80 columns; git prefixes each line with `remote: ` (8).
const WIDTH: usize = 80 - 8;
/// Text keeps two columns from each edge.
const TEXT_WIDTH: usize = WIDTH - 2 * 2;

/// Renders `messages` for the pusher's stdout. On an unknown type, the text so far and
/// the error.
pub fn render(messages: &[PostReceiveMessage]) -> Result<String, (String, InvalidMessageType)> {
    let mut out = String::new();
    for m in messages {
        out.push('\n');
        match m.kind.as_str() {
            "basic" => out.push_str(&m.message),
            "alert" => alert(&m.message, &mut out),
            other => return Err((out, InvalidMessageType(other.to_owned()))),
        }
        out.push_str("\n\n");
    }
    Ok(out)
}

fn centred(line: &str) -> String {
    let text = line.trim();
    let pad = WIDTH.saturating_sub(text.len()) / 2;
    format!("{}{text}", " ".repeat(pad))
}

fn alert(message: &str, out: &mut String) {
    let rule = "=".repeat(WIDTH);
    out.push_str(&rule);
    out.push_str("\n\n");
    // Words are added with a trailing space; a line is flushed when the next word and
    // its separator would pass the text width (an over-long first word flushes an
    // empty line first, as Gitaly's loop does).
    let mut line = String::new();
    for word in message.split_whitespace() {
        if line.len() + 1 + word.len() > TEXT_WIDTH {
            out.push_str(&centred(&line));
            out.push('\n');
            line.clear();
        }
        line.push_str(word);
        line.push(' ');
    }
    out.push_str(&centred(&line));
    out.push_str("\n\n");
    out.push_str(&rule);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: &str, message: &str) -> PostReceiveMessage {
        PostReceiveMessage {
            message: message.into(),
            kind: kind.into(),
        }
    }

    #[test]
    fn basic_messages_are_printed_as_they_are() {
        let text = render(&[msg(
            "basic",
            "To create a merge request for topic, visit:\n  https://gitlab.example.com/g/p/-/merge_requests/new",
        )])
        .unwrap();
        assert_eq!(
            text,
            "\nTo create a merge request for topic, visit:\n  https://gitlab.example.com/g/p/-/merge_requests/new\n\n"
        );
        assert_eq!(render(&[]).unwrap(), "");
    }

    #[test]
    fn a_short_alert_is_one_centred_line_between_rules() {
        let rule = "=".repeat(72);
        let text = render(&[msg("alert", "  access   denied ")]).unwrap();
        // (72 - 13) / 2 = 29 columns of padding.
        assert_eq!(
            text,
            format!("\n{rule}\n\n{}access denied\n\n{rule}\n\n", " ".repeat(29))
        );
    }

    #[test]
    fn a_long_alert_wraps_at_68_columns() {
        let rule = "=".repeat(72);
        // Ten-letter words: six and their spaces make 66, a seventh would pass 68.
        let word = "abcdefghij";
        let text = render(&[msg("alert", &[word; 8].join(" "))]).unwrap();
        let first = [word; 6].join(" "); // 65 bytes once trimmed
        let second = [word; 2].join(" "); // 21 bytes
        assert_eq!(
            text,
            format!(
                "\n{rule}\n\n{}{first}\n{}{second}\n\n{rule}\n\n",
                " ".repeat(3),
                " ".repeat(25)
            )
        );
    }

    #[test]
    fn an_over_long_word_flushes_an_empty_line_first() {
        // The expected bytes of this and the two tests above were checked against
        // Gitaly's printAlert run on the same input.
        let rule = "=".repeat(72);
        let word = "x".repeat(70);
        let text = render(&[msg("alert", &word)]).unwrap();
        assert_eq!(
            text,
            format!("\n{rule}\n\n{}\n {word}\n\n{rule}\n\n", " ".repeat(36))
        );
    }

    #[test]
    fn messages_follow_each_other_and_an_unknown_type_stops() {
        let (so_far, e) = render(&[
            msg("basic", "one"),
            msg("shout", "two"),
            msg("basic", "three"),
        ])
        .unwrap_err();
        assert_eq!(so_far, "\none\n\n\n");
        assert_eq!(e.to_string(), "invalid message type: shout");
    }
}
