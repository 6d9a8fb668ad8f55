//! The hook↔votingd frame on arbitrary bytes, as votingd reads it: header, body,
//! decode, field checks. Nothing panics, and an accepted request survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refvote_proto::hook::{self, request};

fuzz_target!(|data: &[u8]| {
    let Some((header, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = hook::frame_len(*header) else {
        return;
    };
    let body = &body[..len.min(body.len())];
    let Ok(req) = hook::decode_request(body) else {
        return;
    };
    if let Some(request::Kind::Vote(vote)) = &req.kind
        && let Ok(phase) = vote.check()
    {
        assert_eq!(phase as i32, vote.phase);
        assert_eq!(vote.hash.len(), 32);
    }
    let frame = hook::encode_frame(&req);
    let len = hook::frame_len(frame[..4].try_into().unwrap()).unwrap_or(frame.len() - 4);
    assert_eq!(hook::decode_request(&frame[4..4 + len]), Ok(req));
});
