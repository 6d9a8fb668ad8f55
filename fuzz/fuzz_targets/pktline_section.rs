//! A push's command section on arbitrary bytes, as the storage node reads it from a
//! client: nothing panics; the incremental reader, `section_end` and the whole-section
//! parser agree on where a well-formed section ends; the canonical form is a fixed
//! point holding the same lines; the lenient scan and the report writer cope with
//! anything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refvote_pktline::report::{self, Report};
use refvote_pktline::section::section_end;
use refvote_pktline::sideband::{self, SideBand};
use refvote_pktline::{Limits, SectionReader, canonical_section, command, decode};

fuzz_target!(|data: &[u8]| {
    // The reader, fed in uneven pieces, takes exactly the section and nothing more.
    let mut reader = SectionReader::new(Limits::default());
    let mut at = 0;
    let mut step = 1;
    let mut refused = false;
    while at < data.len() && !reader.is_complete() {
        let end = (at + step).min(data.len());
        match reader.feed(&data[at..end]) {
            Ok(n) => at += n,
            Err(_) => {
                refused = true;
                break;
            }
        }
        step = step % 7 + 1;
    }
    let read = if refused { None } else { reader.finish().ok() };
    if let Some(section) = &read
        && !section.is_empty()
    {
        assert_eq!(&data[..section.len()], &section[..]);
        assert_eq!(section_end(data).unwrap(), Some(section.len()));
        if let Ok((canonical, summary)) = canonical_section(section) {
            let (again, _) = canonical_section(&canonical).expect("the canonical form parses");
            assert_eq!(again, canonical, "the canonical form is a fixed point");
            assert_eq!(
                canonical.len(),
                section.len(),
                "reordering keeps every byte"
            );
            if !summary.reordered {
                assert_eq!(&canonical, section);
            }
        }
    }

    // The lenient reading never panics and names at most one ref per packet.
    let scan = command::scan(data);
    assert!(scan.commands.len() <= decode::packets(data).count());

    // Whatever the refs and reason, the refusal report is well formed and reads back.
    // (Refs as the router names them: those that are UTF-8.)
    let refs: Vec<&str> = scan
        .commands
        .iter()
        .filter_map(|c| std::str::from_utf8(c.refname).ok())
        .collect();
    let mut rejected = Report::unpack_ok();
    let reason = String::from_utf8_lossy(data);
    for r in &refs {
        rejected.ng(r, &reason);
    }
    let answer = rejected.finish_within(Some(SideBand::Small), reason.as_bytes());
    let bands = sideband::demux(&answer).expect("the answer demultiplexes");
    let parsed = report::parse(&bands.data).expect("the report parses");
    assert_eq!(parsed.refs.len(), refs.len());
});
