//! The HTTP/2 frame follower of each connection (`server::conn::Frames`, hand-written), which
//! counts the client's SETTINGS frames to close a connection sending too many: fed the bytes in
//! pieces of any size, it counts what a reading of the whole byte stream at once counts, is left
//! in the same place (inside a frame header or a payload), and refuses exactly when the stream
//! holds more SETTINGS frames than the bound.
//!
//! Input: the first byte sets the sizes of the pieces; the rest is what the client sends after
//! its 24-byte preface.

use crate::server::{Frames, MAX_SETTINGS};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn check(bytes: &[u8]) {
    let Some((&seed, stream)) = bytes.split_first() else {
        return;
    };
    // The model: the whole stream read at once, frame by frame.
    let (mut settings, mut at) = (0u32, 0usize);
    while at + 9 <= stream.len() {
        let header = &stream[at..at + 9];
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        settings += u32::from(header[3] == 4 && header[4] & 1 == 0);
        at += 9 + len;
    }
    let (have, skip) = if at > stream.len() {
        (0, at - stream.len())
    } else {
        (stream.len() - at, 0)
    };

    // The follower, fed the preface and the stream in pieces of 1 to 16 bytes (and then some).
    let mut follower = Frames::default();
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(stream);
    let mut accepted = true;
    let (mut rest, mut size) = (input.as_slice(), usize::from(seed));
    while !rest.is_empty() && accepted {
        let n = (size % 16 + 1).min(rest.len());
        accepted = follower.follow(&rest[..n]);
        rest = &rest[n..];
        size = size.wrapping_mul(31).wrapping_add(7);
    }
    assert_eq!(
        accepted,
        settings <= MAX_SETTINGS,
        "{settings} SETTINGS frames"
    );
    if accepted {
        assert_eq!(follower.settings, settings);
        assert_eq!((follower.have, follower.skip), (have, skip));
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let frame = |kind: u8, flags: u8, payload: &[u8]| {
        let len = (payload.len() as u32).to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 1];
        out.extend_from_slice(payload);
        out
    };
    let settings = frame(4, 0, &[0, 4, 0, 0, 255, 255]);
    let mut flood = vec![3];
    for _ in 0..=MAX_SETTINGS {
        flood.extend_from_slice(&settings);
    }
    let mut envoy = vec![0];
    envoy.extend(frame(4, 0, &[0, 3, 0, 0, 0, 100]));
    envoy.extend(frame(8, 0, &[0, 15, 0, 1]));
    envoy.extend(frame(1, 4, b"headers"));
    envoy.extend(frame(0, 1, b"\0\0\0\0\x02hi"));
    envoy.extend(frame(4, 1, b""));
    let mut cut = envoy.clone();
    cut.truncate(envoy.len() - 5);
    vec![flood, envoy, cut, vec![9, 0, 0]]
}
