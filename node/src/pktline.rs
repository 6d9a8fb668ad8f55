//! Rewrites a receive-pack request (protocol v0/v1) so its commands arrive in one
//! canonical order: sorted by ref name, byte order.
//!
//! Why: in a non-atomic push git runs one ref transaction per command, in the order
//! the commands arrive, and each replica blocks at `prepared` until a majority agrees
//! on that key. Replicas fed the same push in different orders could wait on each
//! other, so every replica is fed the commands in this order, whatever the client sent.
//!
//! The request is: optional `shallow <oid>` lines, the commands `<old> <new> <ref>`
//! (the first one carries `\0<capabilities>`), or a push certificate instead, then a
//! flush-pkt. Everything after that flush (push options, when requested, then the
//! raw packfile) is streamed through unchanged, chunk by chunk, with the writer's
//! backpressure. Only the command section is held in memory, and only up to [`Limits`].
//!
//! What it does not do: it does not check ref names or object ids beyond what it needs
//! to sort (git does that, per command), and it never reorders a signed push (the
//! certificate's signature covers the order).

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// git's `LARGE_PACKET_MAX`: the largest pkt-line, its 4 header bytes included.
pub const MAX_PKT_LEN: usize = 65520;

const FLUSH: &[u8; 4] = b"0000";

/// How much of a command section we are willing to hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the command section, pkt-line headers and the flush included.
    pub max_section_bytes: usize,
    /// pkt-lines in the command section: commands, shallow lines, certificate lines.
    pub max_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // A push of 100k refs is already far beyond what anyone does by hand; each
        // command line is at most ~4 + 2*65 + a ref name, so 8 MiB fits it.
        Limits {
            max_section_bytes: 8 << 20,
            max_lines: 100_000,
        }
    }
}

/// What [`canonicalize`] saw and did.
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

#[derive(Debug, thiserror::Error)]
pub enum PktError {
    #[error("reading the push request")]
    Read(#[source] std::io::Error),
    #[error("writing the push request to git")]
    Write(#[source] std::io::Error),
    #[error("bad pkt-line length {header:?} at byte {at}: expected 4 hex digits")]
    BadLength { at: usize, header: String },
    #[error("pkt-line length {len} at byte {at} is shorter than its own 4-byte header")]
    LengthTooShort { at: usize, len: usize },
    #[error("pkt-line length {len} at byte {at} exceeds git's maximum of {MAX_PKT_LEN}")]
    LengthTooLong { at: usize, len: usize },
    #[error("push request ends inside the pkt-line at byte {at}")]
    Truncated { at: usize },
    #[error("push request ends at byte {at} before the flush-pkt closing its command section")]
    MissingFlush { at: usize },
    #[error("unexpected {kind} pkt at byte {at} in the command section (a v0/v1 push sends none)")]
    UnexpectedSpecial { at: usize, kind: &'static str },
    #[error(
        "pkt-line {index} of the command section is not '<old> <new> <ref>' or 'shallow <oid>'"
    )]
    BadCommand { index: usize },
    #[error("pkt-line {index} carries capabilities; a push sends them on its first command only")]
    MisplacedCapabilities { index: usize },
    #[error("command section is larger than the limit of {limit} bytes")]
    SectionTooLarge { limit: usize },
    #[error("command section has more than the limit of {limit} pkt-lines")]
    TooManyLines { limit: usize },
    #[error("{extra} bytes follow the command section's flush-pkt")]
    TrailingBytes { extra: usize },
}

/// A pkt-line header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Header {
    Flush,
    Delim,
    ResponseEnd,
    /// A data pkt-line with this many payload bytes.
    Data(usize),
}

fn parse_header(h: &[u8; 4], at: usize) -> Result<Header, PktError> {
    let mut len = 0usize;
    for &b in h {
        let digit = (b as char)
            .to_digit(16)
            .ok_or_else(|| PktError::BadLength {
                at,
                header: String::from_utf8_lossy(h).into_owned(),
            })?;
        len = len * 16 + digit as usize;
    }
    match len {
        0 => Ok(Header::Flush),
        1 => Ok(Header::Delim),
        2 => Ok(Header::ResponseEnd),
        3 => Err(PktError::LengthTooShort { at, len }),
        n if n > MAX_PKT_LEN => Err(PktError::LengthTooLong { at, len }),
        n => Ok(Header::Data(n - 4)),
    }
}

fn special(header: Header, at: usize) -> Result<(), PktError> {
    // git's receive-pack would take either as the end of the commands; no client sends
    // them in v0/v1, so refuse rather than guess what the sender meant.
    let kind = match header {
        Header::Delim => "delim",
        Header::ResponseEnd => "response-end",
        Header::Flush | Header::Data(_) => return Ok(()),
    };
    Err(PktError::UnexpectedSpecial { at, kind })
}

/// Streams `input` to `output` with the command section in canonical order, and
/// everything after it (push options, packfile) unchanged.
///
/// Nothing is written until the whole command section has been read and found well
/// formed, so on an error git has seen none of the commands; the caller must still
/// treat the push as failed. An input that ends before its first byte is an empty
/// request (a client that only wanted the advertisement) and yields an empty output.
/// `output` is flushed after the command section and after every chunk, never shut
/// down: closing it is the caller's call.
pub async fn canonicalize<R, W>(
    input: R,
    mut output: W,
    limits: Limits,
) -> Result<Summary, PktError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // One maximal pkt-line per read while parsing, and large chunks for the pack.
    let mut input = BufReader::with_capacity(MAX_PKT_LEN, input);
    let (bytes, mut summary) = read_canonical_section(&mut input, limits).await?;
    if bytes.is_empty() {
        return Ok(summary);
    }
    output.write_all(&bytes).await.map_err(PktError::Write)?;
    // git can check the commands while the pack is still on its way to us.
    output.flush().await.map_err(PktError::Write)?;
    drop(bytes);
    summary.passed_through = pass_through(&mut input, &mut output).await?;
    Ok(summary)
}

/// The first half of [`canonicalize`], for callers that move the rest of the request
/// themselves: reads the command section from `input` (leaving it at the first byte
/// after the section's flush-pkt) and returns it in canonical form. An input that ends
/// before its first byte yields an empty section.
pub async fn read_canonical_section<R: AsyncRead + Unpin>(
    input: &mut R,
    limits: Limits,
) -> Result<(Vec<u8>, Summary), PktError> {
    let section = read_section(input, limits).await?;
    if section.is_empty() {
        return Ok((section, Summary::default()));
    }
    // The pack may take minutes; the caller must not hold two sections' worth
    // meanwhile, so the raw one is dropped here.
    canonical_section(&section)
}

/// Copies what the reader has buffered and then the rest of the input, one chunk at a
/// time, so nothing holds the packfile.
async fn pass_through<R, W>(input: &mut BufReader<R>, output: &mut W) -> Result<u64, PktError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    loop {
        let chunk = input.fill_buf().await.map_err(PktError::Read)?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        output.write_all(chunk).await.map_err(PktError::Write)?;
        // Whatever `W` buffers, git gets each chunk now: it can start on the commands
        // and the pack while the rest is still arriving.
        output.flush().await.map_err(PktError::Write)?;
        input.consume(n);
        total += n as u64;
    }
    output.flush().await.map_err(PktError::Write)?;
    Ok(total)
}

/// Reads into `buf` until it is full or the input ends; returns how much it got.
async fn read_full<R: AsyncRead + Unpin>(input: &mut R, buf: &mut [u8]) -> Result<usize, PktError> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]).await.map_err(PktError::Read)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Reads the command section, its flush-pkt included, checking only the framing and
/// the limits. Returns an empty vector for an empty input.
async fn read_section<R: AsyncRead + Unpin>(
    input: &mut R,
    limits: Limits,
) -> Result<Vec<u8>, PktError> {
    let mut section = Vec::new();
    let mut lines = 0usize;
    loop {
        let at = section.len();
        let mut header = [0u8; 4];
        match read_full(input, &mut header).await? {
            0 if at == 0 => return Ok(section),
            0 => return Err(PktError::MissingFlush { at }),
            4 => {}
            _ => return Err(PktError::Truncated { at }),
        }
        let parsed = parse_header(&header, at)?;
        special(parsed, at)?;
        let len = match parsed {
            Header::Data(len) => len,
            _ => 0,
        };
        // Checked before allocating, so a hostile length cannot make us hold more.
        if at + 4 + len > limits.max_section_bytes {
            return Err(PktError::SectionTooLarge {
                limit: limits.max_section_bytes,
            });
        }
        section.extend_from_slice(&header);
        if parsed == Header::Flush {
            return Ok(section);
        }
        lines += 1;
        if lines > limits.max_lines {
            return Err(PktError::TooManyLines {
                limit: limits.max_lines,
            });
        }
        section.resize(at + 4 + len, 0);
        if read_full(input, &mut section[at + 4..]).await? < len {
            return Err(PktError::Truncated { at });
        }
    }
}

/// Splits a command section into the payloads of its data pkt-lines; it must end with
/// its flush-pkt.
fn split_section(section: &[u8]) -> Result<Vec<&[u8]>, PktError> {
    let mut pkts = Vec::new();
    let mut at = 0;
    loop {
        let Some(header) = section.get(at..at + 4) else {
            return Err(if at == section.len() {
                PktError::MissingFlush { at }
            } else {
                PktError::Truncated { at }
            });
        };
        let header: &[u8; 4] = header.try_into().map_err(|_| PktError::Truncated { at })?;
        let parsed = parse_header(header, at)?;
        special(parsed, at)?;
        let Header::Data(len) = parsed else {
            let extra = section.len() - (at + 4);
            if extra > 0 {
                return Err(PktError::TrailingBytes { extra });
            }
            return Ok(pkts);
        };
        let payload = section
            .get(at + 4..at + 4 + len)
            .ok_or(PktError::Truncated { at })?;
        pkts.push(payload);
        at += 4 + len;
    }
}

/// A command line taken apart: git chomps one trailing newline off a pkt-line and
/// reads the capabilities from after the first NUL.
struct Command<'a> {
    /// `<old> <new> <ref>`.
    line: &'a [u8],
    refname: &'a [u8],
    /// `\0<capabilities>`, if any.
    caps: Option<&'a [u8]>,
    newline: bool,
}

fn is_oid(s: &[u8]) -> bool {
    (s.len() == 40 || s.len() == 64) && s.iter().all(u8::is_ascii_hexdigit)
}

fn chomp(payload: &[u8]) -> (&[u8], bool) {
    match payload.strip_suffix(b"\n") {
        Some(p) => (p, true),
        None => (payload, false),
    }
}

fn parse_command(payload: &[u8], index: usize) -> Result<Command<'_>, PktError> {
    let (body, newline) = chomp(payload);
    let (line, caps) = match body.iter().position(|&b| b == 0) {
        Some(nul) => (&body[..nul], Some(&body[nul..])),
        None => (body, None),
    };
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(PktError::BadCommand { index });
    };
    if !is_oid(old) || !is_oid(new) || refname.is_empty() {
        return Err(PktError::BadCommand { index });
    }
    Ok(Command {
        line,
        refname,
        caps,
        newline,
    })
}

fn is_shallow(payload: &[u8]) -> bool {
    chomp(payload)
        .0
        .strip_prefix(b"shallow ")
        .is_some_and(is_oid)
}

fn is_push_cert(payload: &[u8]) -> bool {
    let body = chomp(payload).0;
    let line = body.split(|&b| b == 0).next().unwrap_or(body);
    line == b"push-cert"
}

fn push_pkt(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
    // Only ever called with the parts of one input pkt-line, rearranged, so `len` is
    // within MAX_PKT_LEN and fits four hex digits.
    out.extend_from_slice(format!("{len:04x}").as_bytes());
    for p in parts {
        out.extend_from_slice(p);
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
    if pkts.iter().any(|p| is_push_cert(p)) {
        // The signature covers the commands in the order the pusher wrote them, and
        // receive-pack takes the commands from the certificate; leave it all alone.
        summary.signed = true;
        return Ok((section.to_vec(), summary));
    }
    let mut shallow = Vec::new();
    let mut commands = Vec::new();
    for (i, &payload) in pkts.iter().enumerate() {
        if is_shallow(payload) {
            shallow.push(payload);
            continue;
        }
        let cmd = parse_command(payload, i + 1)?;
        if cmd.caps.is_some() && !commands.is_empty() {
            return Err(PktError::MisplacedCapabilities { index: i + 1 });
        }
        commands.push(cmd);
    }
    summary.commands = commands.len();
    summary.shallow = shallow.len();

    let mut order: Vec<usize> = (0..commands.len()).collect();
    // `sort_by` is stable: repeated ref names keep the client's relative order.
    order.sort_by(|&a, &b| commands[a].refname.cmp(commands[b].refname));
    if order.iter().enumerate().all(|(i, &o)| i == o) {
        return Ok((section.to_vec(), summary));
    }
    summary.reordered = true;

    let caps = commands.first().and_then(|c| c.caps);
    let mut out = Vec::with_capacity(section.len());
    for payload in shallow {
        push_pkt(&mut out, &[payload]);
    }
    for (i, &o) in order.iter().enumerate() {
        let cmd = &commands[o];
        let caps = if i == 0 { caps.unwrap_or(b"") } else { b"" };
        let newline: &[u8] = if cmd.newline { b"\n" } else { b"" };
        push_pkt(&mut out, &[cmd.line, caps, newline]);
    }
    out.extend_from_slice(FLUSH);
    Ok((out, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    const Z: &str = "0000000000000000000000000000000000000000";
    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const CAPS: &str = " report-status-v2 side-band-64k object-format=sha1";

    fn pkt(s: &str) -> Vec<u8> {
        let mut v = format!("{:04x}", s.len() + 4).into_bytes();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn request(lines: &[String]) -> Vec<u8> {
        let mut v: Vec<u8> = lines.iter().flat_map(|l| pkt(l)).collect();
        v.extend_from_slice(FLUSH);
        v
    }

    fn cmd(refname: &str) -> String {
        format!("{A} {B} {refname}")
    }

    fn first(refname: &str) -> String {
        format!("{A} {B} {refname}\0{CAPS}")
    }

    async fn run(input: &[u8], limits: Limits) -> Result<(Vec<u8>, Summary), PktError> {
        let mut out = Vec::new();
        let summary = canonicalize(input, &mut out, limits).await?;
        Ok((out, summary))
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header(b"0000", 0).unwrap(), Header::Flush);
        assert_eq!(parse_header(b"0001", 0).unwrap(), Header::Delim);
        assert_eq!(parse_header(b"0002", 0).unwrap(), Header::ResponseEnd);
        assert_eq!(parse_header(b"0004", 0).unwrap(), Header::Data(0));
        assert_eq!(parse_header(b"00aF", 0).unwrap(), Header::Data(0xaf - 4));
        assert_eq!(
            parse_header(b"fff0", 0).unwrap(),
            Header::Data(MAX_PKT_LEN - 4)
        );
        assert!(matches!(
            parse_header(b"fff1", 9),
            Err(PktError::LengthTooLong { at: 9, len: 0xfff1 })
        ));
        assert!(matches!(
            parse_header(b"0003", 0),
            Err(PktError::LengthTooShort { len: 3, .. })
        ));
        assert!(matches!(
            parse_header(b"00g4", 0),
            Err(PktError::BadLength { .. })
        ));
        assert!(matches!(
            parse_header(b" 004", 0),
            Err(PktError::BadLength { .. })
        ));
        assert!(matches!(
            parse_header(b"+004", 0),
            Err(PktError::BadLength { .. })
        ));
    }

    #[tokio::test]
    async fn sorts_commands_and_moves_capabilities() {
        let input = request(&[
            first("refs/heads/z"),
            cmd("refs/heads/a"),
            cmd("refs/heads/m"),
        ]);
        let pack = b"PACK\0\0\0\x02rest of the pack";
        let mut with_pack = input.clone();
        with_pack.extend_from_slice(pack);
        let (out, summary) = run(&with_pack, Limits::default()).await.unwrap();
        let mut want = request(&[
            first("refs/heads/a"),
            cmd("refs/heads/m"),
            cmd("refs/heads/z"),
        ]);
        want.extend_from_slice(pack);
        assert_eq!(out, want);
        assert_eq!(
            summary,
            Summary {
                commands: 3,
                shallow: 0,
                reordered: true,
                signed: false,
                passed_through: pack.len() as u64,
            }
        );
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

    #[tokio::test]
    async fn push_options_and_pack_pass_through_unchanged() {
        let mut input = request(&[
            format!("{A} {B} refs/heads/z\0{CAPS} push-options"),
            cmd("refs/heads/a"),
        ]);
        // Push options are pkt-lines with their own flush; the pack is raw bytes,
        // including ones that look like pkt-line headers.
        let rest: Vec<u8> = [
            pkt("ci.skip"),
            pkt("topic=x"),
            FLUSH.to_vec(),
            b"PACK0003\0\xff".to_vec(),
        ]
        .concat();
        input.extend_from_slice(&rest);
        let (out, summary) = run(&input, Limits::default()).await.unwrap();
        let mut want = request(&[
            format!("{A} {B} refs/heads/a\0{CAPS} push-options"),
            cmd("refs/heads/z"),
        ]);
        want.extend_from_slice(&rest);
        assert_eq!(out, want);
        assert_eq!(summary.passed_through, rest.len() as u64);
    }

    #[tokio::test]
    async fn large_pass_through_is_streamed_in_chunks() {
        // A writer that accepts at most 1000 bytes per call still gets every byte.
        let (client, mut server) = tokio::io::duplex(1000);
        let mut input = request(&[first("refs/heads/b"), cmd("refs/heads/a")]);
        let pack: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        input.extend_from_slice(&pack);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.map(|_| got)
        });
        let summary = canonicalize(&input[..], client, Limits::default())
            .await
            .unwrap();
        let got = reader.await.unwrap().unwrap();
        assert!(got.ends_with(&pack));
        assert_eq!(summary.passed_through, pack.len() as u64);
    }

    #[tokio::test]
    async fn empty_requests() {
        // Nothing at all: a client that only wanted the advertisement.
        let (out, summary) = run(b"", Limits::default()).await.unwrap();
        assert!(out.is_empty());
        assert_eq!(summary, Summary::default());
        // Only a flush: `git push` over SSH with everything up to date.
        let (out, summary) = run(b"0000", Limits::default()).await.unwrap();
        assert_eq!(out, b"0000");
        assert_eq!(summary.commands, 0);
        assert!(matches!(
            canonical_section(b""),
            Err(PktError::MissingFlush { at: 0 })
        ));
    }

    #[tokio::test]
    async fn malformed_framing_is_refused() {
        let l = Limits::default();
        let good = pkt(&first("refs/heads/a"));
        type Check = fn(&PktError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"zzzz".to_vec(), |e| {
                matches!(e, PktError::BadLength { at: 0, .. })
            }),
            (
                [good.clone(), b"00x1".to_vec()].concat(),
                |e| matches!(e, PktError::BadLength { at, .. } if *at > 0),
            ),
            (b"0003".to_vec(), |e| {
                matches!(e, PktError::LengthTooShort { len: 3, .. })
            }),
            (b"ffff".to_vec(), |e| {
                matches!(e, PktError::LengthTooLong { .. })
            }),
            (b"00".to_vec(), |e| {
                matches!(e, PktError::Truncated { at: 0 })
            }),
            (good[..good.len() - 1].to_vec(), |e| {
                matches!(e, PktError::Truncated { at: 0 })
            }),
            (good.clone(), |e| matches!(e, PktError::MissingFlush { .. })),
            ([good.clone(), b"0001".to_vec()].concat(), |e| {
                matches!(e, PktError::UnexpectedSpecial { kind: "delim", .. })
            }),
            ([good.clone(), b"0002".to_vec()].concat(), |e| {
                matches!(
                    e,
                    PktError::UnexpectedSpecial {
                        kind: "response-end",
                        ..
                    }
                )
            }),
        ];
        for (input, check) in cases {
            let mut out = Vec::new();
            let err = canonicalize(&input[..], &mut out, l).await.unwrap_err();
            assert!(check(&err), "{input:?}: {err:?}");
            assert!(
                out.is_empty(),
                "nothing may be written before the section is whole"
            );
            // The pure parser agrees (on a whole section with the flush it expects).
            assert!(canonical_section(&input).is_err());
        }
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

    #[tokio::test]
    async fn limits_are_enforced_before_buffering() {
        let lines: Vec<String> = (0..10).map(|i| cmd(&format!("refs/heads/{i}"))).collect();
        let input = request(&lines);
        let tight = Limits {
            max_section_bytes: input.len() - 1,
            max_lines: 100,
        };
        assert!(matches!(
            run(&input, tight).await,
            Err(PktError::SectionTooLarge { .. })
        ));
        let few = Limits {
            max_section_bytes: 1 << 20,
            max_lines: 9,
        };
        assert!(matches!(
            run(&input, few).await,
            Err(PktError::TooManyLines { limit: 9 })
        ));
        let exact = Limits {
            max_section_bytes: input.len(),
            max_lines: 10,
        };
        assert_eq!(run(&input, exact).await.unwrap().1.commands, 10);
        // A header promising a huge line is refused on its header alone.
        let small = Limits {
            max_section_bytes: 100,
            max_lines: 100,
        };
        assert!(matches!(
            run(b"fff0", small).await,
            Err(PktError::SectionTooLarge { limit: 100 })
        ));
    }
}
