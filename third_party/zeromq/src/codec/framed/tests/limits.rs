//! The read path under size caps: arbitrary peer input never panics and never
//! grows a connection's read buffer past the cap plus one read chunk.

use super::*;
use futures::FutureExt;
use proptest::prelude::*;

/// Hands out the input in reads of the given sizes (cycled), like a transport
/// that splits the stream at arbitrary points.
struct ChunkedReader {
    input: Vec<u8>,
    position: usize,
    chunks: Vec<usize>,
    next_chunk: usize,
}

impl AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buffer: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let chunk = self.chunks[self.next_chunk % self.chunks.len()];
        self.next_chunk += 1;
        let count = buffer
            .len()
            .min(chunk)
            .min(self.input.len() - self.position);
        buffer[..count].copy_from_slice(&self.input[self.position..self.position + count]);
        self.position += count;
        Poll::Ready(Ok(count))
    }
}

fn capped_reader(input: Vec<u8>, chunks: Vec<usize>, options: SocketOptions) -> ZmqFramedRead {
    let reader = ChunkedReader {
        input,
        position: 0,
        chunks,
        next_chunk: 0,
    };
    ZmqFramedRead::new(Box::new(reader), Arc::new(options))
}

/// The tightest size cap: no frame body may exceed it.
fn cap(options: &SocketOptions) -> usize {
    match (options.max_frame_size, options.max_message_size) {
        (Some(frame), Some(message)) => frame.min(message),
        (Some(cap), None) | (None, Some(cap)) => cap,
        (None, None) => unreachable!("only capped readers have a bound"),
    }
}

/// Upper bound on the read buffer's capacity: the largest demand of the decoder
/// (a frame up to the cap, or the 64-byte greeting) plus one read chunk.
fn capacity_bound(options: &SocketOptions) -> usize {
    cap(options).max(64) + options.read_buffer_max_size
}

#[async_rt::test]
async fn huge_frame_header_ends_the_stream_without_allocating() {
    const CAP: usize = 1024 * 1024;
    let mut input = BytesMut::from(ZmqGreeting::default()).to_vec();
    input.push(0x02);
    input.extend_from_slice(&(1u64 << 60).to_be_bytes());
    input.extend_from_slice(&[0; 1000]);
    let mut options = SocketOptions::default();
    options.max_frame_size(CAP);
    let bound = capacity_bound(&options);
    let mut reader = capped_reader(input, vec![usize::MAX], options);

    assert!(matches!(
        reader.next().await,
        Some(Ok(Message::Greeting(_)))
    ));
    assert!(matches!(
        reader.next().await,
        Some(Err(CodecError::Decode(reason))) if reason.contains("max_frame_size")
    ));
    assert!(reader.buffer.capacity() <= bound);
    // The stream ends after the error, so every socket type drops the peer.
    assert!(reader.next().await.is_none());
}

#[derive(Debug, Clone)]
enum Segment {
    Raw(Vec<u8>),
    Frame {
        flags: u8,
        len: Len,
        complete: bool,
        cut: usize,
    },
}

#[derive(Debug, Clone)]
enum Len {
    Absolute(u64),
    /// Just under or over the reader's cap, where buffer growth is tightest.
    NearCap(i64),
}

fn segment() -> impl Strategy<Value = Segment> {
    let flags = prop_oneof![
        4 => prop::sample::select(vec![0u8, 1, 2, 3, 4, 6]),
        1 => any::<u8>(),
    ];
    let len = prop_oneof![
        2 => (0u64..=300).prop_map(Len::Absolute),
        1 => (0u64..=5000).prop_map(Len::Absolute),
        1 => any::<u64>().prop_map(Len::Absolute),
        1 => prop::sample::select(vec![1u64 << 60, u64::MAX]).prop_map(Len::Absolute),
        3 => (-600i64..=2).prop_map(Len::NearCap),
    ];
    let frame = (flags, len, prop::bool::weighted(0.8), 0usize..5000).prop_map(
        |(flags, len, complete, cut)| Segment::Frame {
            flags,
            len,
            complete,
            cut,
        },
    );
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Segment::Raw),
        4 => frame,
    ]
}

fn encode(greeting: bool, prefix: &[u8], segments: &[Segment], cap: usize) -> Vec<u8> {
    let mut wire = if greeting {
        BytesMut::from(ZmqGreeting::default()).to_vec()
    } else {
        prefix.to_vec()
    };
    for segment in segments {
        match segment {
            Segment::Raw(bytes) => wire.extend_from_slice(bytes),
            Segment::Frame {
                flags,
                len,
                complete,
                cut,
            } => {
                let mut len = match *len {
                    Len::Absolute(len) => len,
                    Len::NearCap(delta) => (cap as i64 + delta).max(0) as u64,
                };
                wire.push(*flags);
                if flags & 0b0000_0010 != 0 {
                    wire.extend_from_slice(&len.to_be_bytes());
                } else {
                    len %= 256;
                    wire.push(len as u8);
                }
                // Mostly the declared body (up to 5000 bytes), sometimes cut short.
                let full = len.min(5000) as usize;
                let body_len = if *complete { full } else { (*cut).min(full) };
                wire.resize(wire.len() + body_len, 0xab);
            }
        }
    }
    wire
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_input_never_panics_or_overgrows_the_buffer(
        greeting in prop::bool::weighted(0.9),
        prefix in prop::collection::vec(any::<u8>(), 64),
        segments in prop::collection::vec(segment(), 0..40),
        chunks in prop::collection::vec(1usize..=700, 1..8),
        max_frame in prop::option::of(1usize..=2048),
        max_message in 1usize..=4096,
        message_capped in any::<bool>(),
        initial_read in 1usize..=64,
        max_read in 1usize..=512,
        retain in any::<bool>(),
    ) {
        let mut options = SocketOptions::default();
        options.read_buffer(initial_read, max_read.max(initial_read), 2);
        if let Some(max_frame) = max_frame {
            options.max_frame_size(max_frame);
        }
        if message_capped || max_frame.is_none() {
            options.max_message_size(max_message);
        }
        let bound = capacity_bound(&options);
        let wire = encode(greeting, &prefix, &segments, cap(&options));
        let wire_len = wire.len();
        let mut reader = capped_reader(wire, chunks, options);
        // Holding decoded frames keeps their storage shared, which changes how
        // the read buffer grows; exercise both.
        let mut retained = Vec::new();

        for _ in 0..=wire_len + 2 {
            let item = reader
                .next()
                .now_or_never()
                .expect("the reader never returns Pending");
            prop_assert!(
                reader.buffer.capacity() <= bound,
                "capacity {} over bound {}", reader.buffer.capacity(), bound
            );
            match item {
                None => break,
                Some(Ok(message)) => {
                    if retain {
                        retained.push(message);
                    }
                }
                Some(Err(_)) => {
                    prop_assert!(reader.next().now_or_never().expect("ready").is_none());
                    break;
                }
            }
        }
        prop_assert!(reader.next().now_or_never().expect("ready").is_none());
    }
}
