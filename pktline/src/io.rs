//! The two async adapters of the `tokio` feature: a receive-pack request streamed
//! through the canonical ordering ([`crate::canonical`]).
//!
//! Only the command section is held in memory, and only up to [`Limits`]; everything
//! after its flush (push options, when requested, then the raw packfile) is streamed
//! through unchanged, chunk by chunk, with the writer's backpressure.

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::MAX_PKT_LEN;
use crate::canonical::{Summary, canonical_section};
use crate::section::{Limits, PktError, SectionReader};

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

/// Reads the command section, its flush-pkt included, asking `input` for no byte past
/// it. Returns an empty vector for an empty input.
async fn read_section<R: AsyncRead + Unpin>(
    input: &mut R,
    limits: Limits,
) -> Result<Vec<u8>, PktError> {
    let mut reader = SectionReader::new(limits);
    let mut buf = Vec::new();
    while reader.wants() > 0 {
        buf.resize(reader.wants().min(MAX_PKT_LEN), 0);
        let n = input.read(&mut buf).await.map_err(PktError::Read)?;
        if n == 0 {
            break;
        }
        reader.feed(&buf[..n])?;
    }
    reader.finish()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::tests::{CAPS, cmd, first, pkt, request};
    use crate::encode::FLUSH;

    async fn run(input: &[u8], limits: Limits) -> Result<(Vec<u8>, Summary), PktError> {
        let mut out = Vec::new();
        let summary = canonicalize(input, &mut out, limits).await?;
        Ok((out, summary))
    }

    const A: &str = crate::canonical::tests::A;
    const B: &str = crate::canonical::tests::B;

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

    /// The reader is left exactly at the first byte after the section, whatever the
    /// input's chunking (the node hands the rest of the stream on itself).
    #[tokio::test]
    async fn read_canonical_section_leaves_the_rest_unread() {
        let mut input = request(&[first("refs/heads/b"), cmd("refs/heads/a")]);
        input.extend_from_slice(b"0009ci.skip0000PACK");
        let (client, mut server) = tokio::io::duplex(7);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            server.write_all(&input).await.unwrap();
        });
        let mut client = client;
        let (section, summary) = read_canonical_section(&mut client, Limits::default())
            .await
            .unwrap();
        assert!(summary.reordered);
        assert_eq!(
            section,
            request(&[first("refs/heads/a"), cmd("refs/heads/b")])
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        feed.await.unwrap();
        assert_eq!(rest, b"0009ci.skip0000PACK");
    }
}
