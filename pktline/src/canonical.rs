//! A push's command section in one canonical order: sorted by ref name, byte order.
//!
//! Why: in a non-atomic push git runs one ref transaction per command, in the order
//! the commands arrive, and each replica blocks at `prepared` until a majority agrees
//! on that key. Replicas fed the same push in different orders could wait on each
//! other, so every replica is fed the commands in this order, whatever the client sent.
//!
//! The section is: optional `shallow <oid>` lines, the commands `<old> <new> <ref>`
//! (the first one carries `\0<capabilities>`), or a push certificate instead, then a
//! flush-pkt. A signed push is never reordered (the certificate's signature covers the
//! order). Ref names and object ids are checked only as far as sorting needs; git
//! checks the rest, per command.

use crate::command::{self, Line};
use crate::decode::{self, Header, Packet};
use crate::encode;
use crate::section::{PktError, refuse_special};

/// What [`canonical_section`] (or `canonicalize`) saw and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// `<old> <new> <ref>` lines outside a push certificate.
    pub commands: usize,
    /// `shallow <oid>` lines.
    pub shallow: usize,
    /// The command section was rewritten (otherwise it went out byte for byte).
    pub reordered: bool,
    /// The push carried a certificate, so its section went out untouched.
    pub signed: bool,
    /// Bytes streamed through after the command section (push options, packfile).
    pub passed_through: u64,
}

/// Splits a command section into the payloads of its data pkt-lines; it must end with
/// its flush-pkt, and nothing may follow.
fn split_section(section: &[u8]) -> Result<Vec<&[u8]>, PktError> {
    let mut pkts = Vec::new();
    let mut packets = decode::packets(section);
    loop {
        let at = packets.offset();
        match packets.next() {
            None => return Err(PktError::MissingFlush { at }),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(Packet::Data(payload))) => pkts.push(payload),
            Some(Ok(Packet::Flush)) => {
                let extra = packets.rest().len();
                if extra > 0 {
                    return Err(PktError::TrailingBytes { extra });
                }
                return Ok(pkts);
            }
            Some(Ok(Packet::Delim)) => refuse_special(Header::Delim, at)?,
            Some(Ok(Packet::ResponseEnd)) => refuse_special(Header::ResponseEnd, at)?,
        }
    }
}

/// The canonical form of one command section (its flush-pkt included, nothing after
/// it): shallow lines first in their order, then the commands stably sorted by ref
/// name, the first command's capabilities moved to the new first command, then the
/// flush. A section that is already canonical, or that holds a push certificate, is
/// returned byte for byte.
pub fn canonical_section(section: &[u8]) -> Result<(Vec<u8>, Summary), PktError> {
    let pkts = split_section(section)?;
    let mut summary = Summary::default();
    if pkts.iter().any(|p| command::is_push_cert(p)) {
        // The signature covers the commands in the order the pusher wrote them, and
        // receive-pack takes the commands from the certificate; leave it all alone.
        summary.signed = true;
        return Ok((section.to_vec(), summary));
    }
    let mut shallow = Vec::new();
    let mut commands: Vec<Line> = Vec::new();
    for (i, &payload) in pkts.iter().enumerate() {
        if command::is_shallow(payload) {
            shallow.push(payload);
            continue;
        }
        let index = i + 1;
        let line = command::parse_line(payload).ok_or(PktError::BadCommand { index })?;
        if line.capabilities.is_some() && !commands.is_empty() {
            return Err(PktError::MisplacedCapabilities { index });
        }
        commands.push(line);
    }
    summary.commands = commands.len();
    summary.shallow = shallow.len();

    // A line whose text itself ends in a newline (one before its capabilities' NUL:
    // a ref name git refuses anyway) would read back differently once moved away from
    // its capabilities, so such a section is left as the client wrote it.
    if commands.iter().any(|c| c.text.ends_with(b"\n")) {
        return Ok((section.to_vec(), summary));
    }
    let mut order: Vec<usize> = (0..commands.len()).collect();
    // `sort_by` is stable: repeated ref names keep the client's relative order.
    order.sort_by(|&a, &b| commands[a].command.refname.cmp(commands[b].command.refname));
    if order.iter().enumerate().all(|(i, &o)| i == o) {
        return Ok((section.to_vec(), summary));
    }
    summary.reordered = true;

    let caps = commands.first().and_then(|c| c.capabilities);
    let mut out = Vec::with_capacity(section.len());
    // Every packet below holds the parts of one input pkt-line, rearranged, so it fits.
    let fits = "a rearranged pkt-line is as long as the original";
    for payload in shallow {
        encode::data(&mut out, payload).expect(fits);
    }
    for (i, &o) in order.iter().enumerate() {
        let line = &commands[o];
        let newline: &[u8] = if line.newline { b"\n" } else { b"" };
        match caps.filter(|_| i == 0) {
            Some(caps) => encode::parts(&mut out, &[line.text, b"\0", caps.0, newline]),
            None => encode::parts(&mut out, &[line.text, newline]),
        }
        .expect(fits);
    }
    encode::flush(&mut out);
    Ok((out, summary))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::encode::FLUSH;

    /// Found by fuzzing: a first line whose ref name ends in a newline before its
    /// capabilities sorted after a second line; moved, it lost its capabilities and
    /// read back with the newline as a line end, so the canonical form was not a
    /// fixed point. Such a section stays as written.
    #[test]
    fn a_newline_inside_a_line_before_its_capabilities_is_left_alone() {
        let mut section = Vec::new();
        encode::parts(
            &mut section,
            &[format!("{Z} {A} b\n").as_bytes(), b"\0report-status"],
        )
        .unwrap();
        encode::data(&mut section, format!("{Z} {A} a").as_bytes()).unwrap();
        encode::flush(&mut section);
        let (canonical, summary) = canonical_section(&section).unwrap();
        assert_eq!(canonical, section);
        assert!(!summary.reordered);
        let (again, _) = canonical_section(&canonical).unwrap();
        assert_eq!(again, canonical);
    }

    pub(crate) const Z: &str = "0000000000000000000000000000000000000000";
    pub(crate) const A: &str = "1111111111111111111111111111111111111111";
    pub(crate) const B: &str = "2222222222222222222222222222222222222222";
    pub(crate) const CAPS: &str = " report-status-v2 side-band-64k object-format=sha1";

    pub(crate) fn pkt(s: &str) -> Vec<u8> {
        encode::to_vec(s.as_bytes()).unwrap()
    }

    pub(crate) fn request(lines: &[String]) -> Vec<u8> {
        let mut v: Vec<u8> = lines.iter().flat_map(|l| pkt(l)).collect();
        v.extend_from_slice(FLUSH);
        v
    }

    pub(crate) fn cmd(refname: &str) -> String {
        format!("{A} {B} {refname}")
    }

    pub(crate) fn first(refname: &str) -> String {
        format!("{A} {B} {refname}\0{CAPS}")
    }

    #[test]
    fn sort_is_by_bytes_and_stable_and_keeps_newlines() {
        let section = request(&[
            format!("{A} {B} refs/heads/b\0{CAPS}\n"),
            format!("{Z} {B} refs/heads/B\n"),
            format!("{A} {Z} refs/heads/a"),
            format!("{B} {A} refs/heads/a\n"),
        ]);
        let (out, summary) = canonical_section(&section).unwrap();
        assert!(summary.reordered);
        assert_eq!(
            out,
            request(&[
                format!("{Z} {B} refs/heads/B\0{CAPS}\n"),
                format!("{A} {Z} refs/heads/a"),
                format!("{B} {A} refs/heads/a\n"),
                format!("{A} {B} refs/heads/b\n"),
            ])
        );
    }

    #[test]
    fn sorted_section_goes_out_byte_for_byte() {
        let section = request(&[first("refs/heads/a"), cmd("refs/heads/b")]);
        let (out, summary) = canonical_section(&section).unwrap();
        assert_eq!(out, section);
        assert!(!summary.reordered);
        assert_eq!(summary.commands, 2);
        // Without capabilities too (git does not require them).
        let section = request(&[cmd("refs/heads/b"), cmd("refs/heads/a")]);
        let (out, _) = canonical_section(&section).unwrap();
        assert_eq!(out, request(&[cmd("refs/heads/a"), cmd("refs/heads/b")]));
    }

    #[test]
    fn shallow_lines_stay_first() {
        let s1 = format!("shallow {A}");
        let s2 = format!("shallow {B}\n");
        let section = request(&[
            s1.clone(),
            s2.clone(),
            first("refs/heads/y"),
            cmd("refs/heads/x"),
        ]);
        let (out, summary) = canonical_section(&section).unwrap();
        assert_eq!(
            out,
            request(&[s1, s2, first("refs/heads/x"), cmd("refs/heads/y")])
        );
        assert_eq!((summary.shallow, summary.commands), (2, 2));
    }

    #[test]
    fn push_certificate_is_left_alone() {
        let section = request(&[
            format!("push-cert\0{CAPS}"),
            "certificate version 0.1\n".into(),
            "pusher someone 1700000000 +0000\n".into(),
            "\n".into(),
            format!("{A} {B} refs/heads/z\n"),
            format!("{A} {B} refs/heads/a\n"),
            "-----BEGIN PGP SIGNATURE-----\n".into(),
            "-----END PGP SIGNATURE-----\n".into(),
            "push-cert-end\n".into(),
        ]);
        let (out, summary) = canonical_section(&section).unwrap();
        assert_eq!(out, section);
        assert!(summary.signed && !summary.reordered);
    }

    #[test]
    fn malformed_commands_are_refused() {
        let bad = |lines: &[String]| canonical_section(&request(lines)).unwrap_err();
        assert!(matches!(
            bad(&["".into()]),
            PktError::BadCommand { index: 1 }
        ));
        assert!(matches!(
            bad(&[first("refs/heads/a"), "garbage".into()]),
            PktError::BadCommand { index: 2 }
        ));
        assert!(matches!(
            bad(&[format!("{A} {B}")]),
            PktError::BadCommand { .. }
        ));
        assert!(matches!(
            bad(&[format!("{A} {B} ")]),
            PktError::BadCommand { .. }
        ));
        assert!(matches!(
            bad(&[format!("{A} xyz refs/heads/a")]),
            PktError::BadCommand { .. }
        ));
        assert!(matches!(
            bad(&["shallow nothex".into()]),
            PktError::BadCommand { .. }
        ));
        assert!(matches!(
            bad(&[first("refs/heads/b"), first("refs/heads/a")]),
            PktError::MisplacedCapabilities { index: 2 }
        ));
        assert!(matches!(
            canonical_section(&[request(&[cmd("refs/heads/a")]), b"PACK".to_vec()].concat()),
            Err(PktError::TrailingBytes { extra: 4 })
        ));
    }

    /// Cheap property test: for shuffled pushes, the canonical form is sorted, keeps
    /// every line, puts the capabilities first, and is a fixed point.
    #[test]
    fn canonical_form_is_sorted_complete_and_stable() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let n = 1 + (next() % 9) as usize;
            let names: Vec<String> = (0..n)
                .map(|_| format!("refs/heads/{}", (b'a' + (next() % 5) as u8) as char))
                .collect();
            let mut lines: Vec<String> = names.iter().map(|r| cmd(r)).collect();
            lines[0] = first(&names[0]);
            let section = request(&lines);
            let (out, summary) = canonical_section(&section).unwrap();
            assert_eq!(summary.commands, n);
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(summary.reordered, sorted != names);
            let mut want: Vec<String> = sorted.iter().map(|r| cmd(r)).collect();
            want[0] = first(&sorted[0]);
            assert_eq!(out, request(&want));
            let (again, summary) = canonical_section(&out).unwrap();
            assert_eq!(again, out);
            assert!(!summary.reordered);
        }
    }
}
