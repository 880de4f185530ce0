//! The fan-out benchmark's shared pieces (BENCHMARKS.md, "Fan-out"): the
//! clock, the publication's data, the frame a subscriber receives, and the
//! publisher's fixed-rate schedule. `fanout_publisher` (through the router),
//! `broadcast_baseline` (no router) and `loadgen --mode fanout` all use them,
//! so both targets put the same bytes on the wire and are timed alike.
//!
//! # The clock
//! Publisher and load generator run on the same machine and read the same
//! clock: `CLOCK_MONOTONIC`, which Linux keeps system-wide (every process
//! reads the same value at the same instant), and which, unlike
//! `CLOCK_REALTIME`, never steps when NTP adjusts the time. A publication
//! carries `sent_ns`, read just before it is handed to the router (or, in the
//! baseline, to the broadcast channel); the subscriber reads the clock again
//! when the frame is decoded. The difference is the publish-to-receive latency.
//!
//! # The data
//! `{"pseq":N,"sent_ns":T}`: `pseq` counts publications from 0, so each
//! subscriber can check that it got every one exactly once, in order.

use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock shared by the publisher and
/// the subscribers of one machine.
pub fn now_ns() -> u64 {
    // clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux (the clock always
    // exists and the out-pointer is valid); 0 would only shorten a latency.
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            let ns = i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec());
            u64::try_from(ns).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// The data of publication `pseq`, as JSON text.
pub fn data_text(pseq: u64, sent_ns: u64) -> String {
    format!(r#"{{"pseq":{pseq},"sent_ns":{sent_ns}}}"#)
}

/// The frame a subscriber receives, as the router writes a publication:
/// `{"type","topic","data","seq"}` with the connection's own `seq`.
pub fn frame_text(msg_type: &str, topic: &str, data: &str, seq: u64) -> String {
    format!(r#"{{"type":"{msg_type}","topic":"{topic}","data":{data},"seq":{seq}}}"#)
}

/// What a subscriber needs from a delivered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub pseq: u64,
    pub sent_ns: u64,
}

/// Reads `pseq` and `sent_ns` from a delivered frame without parsing the
/// whole JSON: at 100 000 deliveries per second the subscriber's own cost
/// must stay small next to the server's. `None` for any other frame (a
/// subscription acknowledgement, an error). Never panics.
pub fn parse_delivery(frame: &str) -> Option<Delivery> {
    Some(Delivery {
        pseq: number_after(frame, "\"pseq\":")?,
        sent_ns: number_after(frame, "\"sent_ns\":")?,
    })
}

/// The unsigned integer right after the first `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = text[at..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .take(20)
        .count();
    text[at..at + digits].parse().ok()
}

/// The subscribe frame of the router's client protocol; the broadcast
/// baseline takes the same one and answers the same acknowledgement.
pub fn subscribe_text(topic: &str) -> String {
    format!(r#"{{"type":"subscribe","id":"sub","data":{{"topic":"{topic}"}}}}"#)
}

/// The router's acknowledgement of [`subscribe_text`].
pub fn subscribed_text(topic: &str) -> String {
    format!(r#"{{"type":"subscribed","id":"sub","data":{{"topic":"{topic}"}},"done":true}}"#)
}

/// Publications at a fixed rate: publication `k` is due `k / rate` after
/// the start, whatever the earlier ones cost (a late one does not push the
/// later ones back, so the rate holds over the run).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub rate: f64,
    pub count: u64,
}

impl Schedule {
    /// `rate` per second for `seconds`: `round(rate * seconds)` publications.
    pub fn new(rate: f64, seconds: f64) -> Result<Self, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("the rate must be a positive number, got {rate}"));
        }
        if !(seconds.is_finite() && seconds > 0.0) {
            return Err(format!("the duration must be positive, got {seconds}"));
        }
        let count = (rate * seconds).round() as u64;
        if count == 0 {
            return Err("rate x duration is less than one publication".into());
        }
        Ok(Self { rate, count })
    }

    /// When publication `k` is due, after the start.
    pub fn due(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_parse_from_the_frames_both_servers_write() {
        let data = data_text(42, 1_700_000_000_123);
        let frame = frame_text("fanout", "bench", &data, 7);
        assert_eq!(
            frame,
            r#"{"type":"fanout","topic":"bench","data":{"pseq":42,"sent_ns":1700000000123},"seq":7}"#
        );
        assert_eq!(
            parse_delivery(&frame),
            Some(Delivery {
                pseq: 42,
                sent_ns: 1_700_000_000_123
            })
        );
        // The router serialises maps in key order; the order does not matter.
        let router = r#"{"type":"fanout","topic":"bench","data":{"sent_ns":5,"pseq":0},"seq":2}"#;
        assert_eq!(
            parse_delivery(router),
            Some(Delivery {
                pseq: 0,
                sent_ns: 5
            })
        );
    }

    #[test]
    fn other_frames_and_garbage_are_not_deliveries() {
        for text in [
            subscribed_text("bench").as_str(),
            "",
            "\"pseq\":",
            r#"{"pseq":,"sent_ns":1}"#,
            r#"{"pseq":-1,"sent_ns":1}"#,
            r#"{"pseq":1}"#,
            r#"{"pseq":99999999999999999999999,"sent_ns":1}"#,
            r#"{"pseq":1,"sent_ns":"1"}"#,
            "\"pseq\":\u{e9}",
        ] {
            assert_eq!(parse_delivery(text), None, "{text:?}");
        }
    }

    #[test]
    fn schedule_spreads_publications_evenly() {
        let s = Schedule::new(100.0, 6.0).unwrap();
        assert_eq!(s.count, 600);
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(150), Duration::from_millis(1500));
        assert!(Schedule::new(0.0, 1.0).is_err());
        assert!(Schedule::new(f64::NAN, 1.0).is_err());
        assert!(Schedule::new(1.0, 0.1).is_err());
    }

    #[test]
    fn the_clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(a > 0 && b >= a);
    }
}
