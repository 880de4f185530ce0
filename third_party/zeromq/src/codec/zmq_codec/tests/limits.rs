//! Size caps (`SocketOptions::max_frame_size` / `max_message_size`) are enforced
//! on the length header, before anything is reserved for the frame body.

use super::*;

const CHUNK: usize = 64 * 1024; // default read_buffer max size

fn capped_codec(max_frame: Option<usize>, max_message: Option<usize>) -> ZmqCodec {
    let mut options = SocketOptions::default();
    if let Some(max) = max_frame {
        options.max_frame_size(max);
    }
    if let Some(max) = max_message {
        options.max_message_size(max);
    }
    ZmqCodec::with_options(&options)
}

fn greeting() -> BytesMut {
    BytesMut::from(ZmqGreeting::default())
}

/// Encodes one frame header: long form when `len > 255`.
fn header(flags: u8, len: usize) -> Vec<u8> {
    if len > 255 {
        let mut header = vec![flags | 0b0000_0010];
        header.extend_from_slice(&(len as u64).to_be_bytes());
        header
    } else {
        vec![flags, len as u8]
    }
}

fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = header(flags, body.len());
    frame.extend_from_slice(body);
    frame
}

fn decode_greeting(codec: &mut ZmqCodec, src: &mut BytesMut) {
    assert!(matches!(codec.decode(src), Ok(Some(Message::Greeting(_)))));
}

fn assert_decode_error(result: Result<Option<Message>, CodecError>, cap: &str) {
    match result {
        Err(CodecError::Decode(reason)) => assert!(reason.contains(cap), "{reason}"),
        other => panic!("expected a decode error naming {cap}, got {other:?}"),
    }
}

#[test]
fn huge_long_frame_header_is_rejected_before_reserving() {
    // The exact attack: ZMTP 3.0 NULL greeting, then a long frame of 2^60 bytes.
    // Uncapped, this reserve aborts the process (memory allocation failed).
    const CAP: usize = 1024 * 1024;
    let mut codec = capped_codec(Some(CAP), None);
    let mut src = greeting();
    src.extend_from_slice(&[0x02]);
    src.extend_from_slice(&(1u64 << 60).to_be_bytes());

    decode_greeting(&mut codec, &mut src);
    assert_decode_error(codec.decode(&mut src), "max_frame_size");
    assert!(src.capacity() <= CAP + CHUNK, "capacity {}", src.capacity());

    // The message cap alone also stops it.
    let mut codec = capped_codec(None, Some(CAP));
    let mut src = greeting();
    src.extend_from_slice(&[0x02]);
    src.extend_from_slice(&(1u64 << 60).to_be_bytes());
    decode_greeting(&mut codec, &mut src);
    assert_decode_error(codec.decode(&mut src), "max_message_size");
    assert!(src.capacity() <= CAP + CHUNK, "capacity {}", src.capacity());
}

#[test]
fn frame_at_the_cap_passes_and_one_byte_over_fails() {
    for cap in [100, 255, 256, 300_000] {
        let body = vec![7_u8; cap];
        let mut codec = capped_codec(Some(cap), None);
        let mut src = greeting();
        src.extend_from_slice(&frame(0, &body));
        decode_greeting(&mut codec, &mut src);
        let Ok(Some(Message::Message(message))) = codec.decode(&mut src) else {
            panic!("a frame of exactly max_frame_size ({cap}) must decode");
        };
        assert_eq!(message.get(0).map(Bytes::len), Some(cap));

        let body = vec![7_u8; cap + 1];
        let mut codec = capped_codec(Some(cap), None);
        let mut src = greeting();
        // Only the header has arrived: the cap is checked before the body is read.
        src.extend_from_slice(&header(0, body.len()));
        decode_greeting(&mut codec, &mut src);
        assert_decode_error(codec.decode(&mut src), "max_frame_size");
        assert!(src.capacity() <= cap + CHUNK);
    }
}

#[test]
fn command_frames_are_capped_too() {
    let mut ready = BytesMut::from(ZmqCommand::ready(crate::SocketType::DEALER));
    let ready_len = ready.len() - 2; // short command frame: flags + length byte

    let mut codec = capped_codec(Some(ready_len), None);
    let mut src = greeting();
    src.unsplit(ready.clone());
    decode_greeting(&mut codec, &mut src);
    assert!(matches!(
        codec.decode(&mut src),
        Ok(Some(Message::Command(_)))
    ));

    let mut codec = capped_codec(Some(ready_len - 1), None);
    let mut src = greeting();
    src.unsplit(ready.split());
    decode_greeting(&mut codec, &mut src);
    assert_decode_error(codec.decode(&mut src), "max_frame_size");

    // A long command header (flags 0x06) of 2^60 bytes.
    let mut codec = capped_codec(Some(1024), None);
    let mut src = greeting();
    src.extend_from_slice(&[0x06]);
    src.extend_from_slice(&(1u64 << 60).to_be_bytes());
    decode_greeting(&mut codec, &mut src);
    assert_decode_error(codec.decode(&mut src), "max_frame_size");
}

#[test]
fn multipart_total_over_the_message_cap_fails() {
    // Three parts of 100 bytes: 3 * (100 + 64) = 492 bytes counted.
    let part = [1_u8; 100];
    let mut wire = Vec::new();
    wire.extend_from_slice(&frame(1, &part));
    wire.extend_from_slice(&frame(1, &part));
    wire.extend_from_slice(&frame(0, &part));

    let mut codec = capped_codec(Some(100), Some(492));
    let mut src = greeting();
    src.extend_from_slice(&wire);
    decode_greeting(&mut codec, &mut src);
    let Ok(Some(Message::Message(message))) = codec.decode(&mut src) else {
        panic!("a message of exactly max_message_size must decode");
    };
    assert_eq!(message.len(), 3);

    // The count restarts with each message.
    src.extend_from_slice(&wire);
    assert!(matches!(
        codec.decode(&mut src),
        Ok(Some(Message::Message(_)))
    ));

    let mut codec = capped_codec(Some(100), Some(491));
    let mut src = greeting();
    src.extend_from_slice(&wire);
    decode_greeting(&mut codec, &mut src);
    assert_decode_error(codec.decode(&mut src), "max_message_size");
}

#[test]
fn endless_empty_more_frames_eventually_fail() {
    const CAP: usize = 64 * 1024;
    let mut codec = capped_codec(None, Some(CAP));
    let mut src = greeting();
    decode_greeting(&mut codec, &mut src);

    let mut parts = 0;
    let error = loop {
        src.extend_from_slice(&[1, 0].repeat(1000));
        match codec.decode(&mut src) {
            Ok(None) => parts += 1000,
            Ok(Some(message)) => panic!("unexpected {message:?}"),
            Err(error) => break error,
        }
        assert!(parts <= CAP, "empty MORE frames never hit the cap");
    };
    assert!(matches!(error, CodecError::Decode(reason) if reason.contains("max_message_size")));
    assert!(codec
        .buffered_message
        .as_ref()
        .is_some_and(|message| message.len() <= CAP / 64));
}

#[test]
fn defaults_keep_accepting_large_frames() {
    let body = vec![3_u8; 2 * 1024 * 1024];
    let mut codec = ZmqCodec::new();
    let mut src = greeting();
    src.extend_from_slice(&frame(0, &body));
    decode_greeting(&mut codec, &mut src);
    let Ok(Some(Message::Message(message))) = codec.decode(&mut src) else {
        panic!("uncapped codec must accept a 2 MiB frame");
    };
    assert_eq!(message.get(0).map(Bytes::len), Some(body.len()));
}
