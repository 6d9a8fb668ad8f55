//! The hook's stdin parser on arbitrary bytes: it never panics, and what it accepts
//! obeys the vote key's rules (32 hex digits, independent of the order of the lines).
#![no_main]

use libfuzzer_sys::fuzz_target;
use refvote_hook::input;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = input::parse(data) else {
        return;
    };
    assert!(!update.lines.is_empty());
    let key = update.key_base();
    assert_eq!(key.len(), 32);
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
    let _ = update.is_packed_refs_side();
    // The same lines in reverse order are the same update as far as the key goes.
    let reversed: String = update
        .lines
        .iter()
        .rev()
        .map(|l| format!("{} {} {}\n", l.old, l.new, l.refname))
        .collect();
    let again = input::parse(reversed.as_bytes()).expect("re-parsing accepted lines");
    assert_eq!(again.key_base(), key);
});
