//! Every JSON number comes back exactly as sent, through the router and a
//! Rust worker: random doubles in their shortest and in 17-digit form (the
//! form that serde_json without `float_roundtrip` got wrong by 1–2 ulp in
//! about 11 % of cases), integers at the edges of i64/u64 and of exact
//! doubles, and strings that need escaping. The same check for the Python
//! SDK lives in `worker-sdk/python/tests/test_numbers.py`.

use std::time::Duration;

use e2e_tests::{run, RouterProc};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);
const ECHO_ROUTES: &str = r#"{"routes": [{"path": "/ws", "service": "echo"}]}"#;

/// xorshift64*: reproducible from the seed printed on failure.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A finite double with random bits: every exponent, both signs,
    /// subnormals included.
    fn double(&mut self) -> f64 {
        loop {
            let d = f64::from_bits(self.next());
            if d.is_finite() {
                return d;
            }
        }
    }

    /// A double in [0, 1), the range of the reported case.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sends `data_json` (already JSON text) as `echo` data and returns the
/// reply's `data`, parsed.
async fn echo(router: &RouterProc, id: &str, data_json: &str) -> Value {
    let mut c = router.client("/ws").await;
    c.send_text(&format!(
        r#"{{"type":"echo","id":"{id}","data":{data_json}}}"#
    ))
    .await;
    let r = c.next_for_id(id, e2e_tests::RECV_TIMEOUT).await;
    assert_eq!(r["done"], true, "{r}");
    r["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubles_come_back_bit_for_bit() {
    run(LIMIT, async {
        let router = RouterProc::start(ECHO_ROUTES, &[]).await;
        let _w = router.worker("echo_worker", &["echo"], &[]).await;
        router.wait_live_workers("echo", 1).await;

        // The case that was reported, in the form it was sent.
        let got = echo(&router, "reported", "0.11312789811552293").await;
        assert_eq!(
            got.as_f64().unwrap().to_bits(),
            0.113_127_898_115_522_93_f64.to_bits()
        );
        assert_eq!(got.to_string(), "0.11312789811552293");

        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        let mut rng = Rng(seed);
        let values: Vec<f64> = (0..2000)
            .map(|i| if i % 2 == 0 { rng.double() } else { rng.unit() })
            .collect();
        // Each value twice: shortest form (what most encoders write) and
        // 17 significant digits (what the failing case used).
        let texts: Vec<String> = values
            .iter()
            .flat_map(|v| [serde_json::to_string(v).unwrap(), format!("{v:.16e}")])
            .collect();
        let got = echo(&router, "random", &format!("[{}]", texts.join(","))).await;
        let got = got.as_array().expect("an array back");
        assert_eq!(got.len(), texts.len());
        for (i, (g, text)) in got.iter().zip(&texts).enumerate() {
            let want = values[i / 2];
            let back = g
                .as_f64()
                .unwrap_or_else(|| panic!("seed {seed}: {text} came back as {g}"));
            assert_eq!(
                back.to_bits(),
                want.to_bits(),
                "seed {seed}: {text} came back as {g}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_at_the_edges_and_unicode_come_back_unchanged() {
    run(LIMIT, async {
        let router = RouterProc::start(ECHO_ROUTES, &[]).await;
        let _w = router.worker("echo_worker", &["echo"], &[]).await;
        router.wait_live_workers("echo", 1).await;
        let cases = [
            "9007199254740992",     // 2^53
            "-9007199254740992",    // -2^53
            "9007199254740993",     // 2^53 + 1: not a double, an integer
            "18446744073709551615", // 2^64 - 1
            "-9223372036854775808", // -2^63
            "9223372036854775807",  // 2^63 - 1
            "0",
            "-0.0",
            "1.0",
            "5e-324",
            "1.7976931348623157e308",
            "2.2250738585072014e-308",
            r#""é😀\u0000\"\\ \u2028""#,
            r#"{"nested":[1,2.5,{"k":-1e-7}]}"#,
        ];
        for (i, case) in cases.iter().enumerate() {
            let got = echo(&router, &format!("c{i}"), case).await;
            let want: Value = serde_json::from_str(case).unwrap();
            assert_eq!(got, want, "{case}");
            // Integers stay integers of the same value and sign; doubles keep
            // their bits (including -0.0).
            match (got.as_f64(), want.as_f64()) {
                (Some(g), Some(w)) if want.is_f64() => {
                    assert!(got.is_f64(), "{case} came back as {got}");
                    assert_eq!(g.to_bits(), w.to_bits(), "{case} came back as {got}");
                }
                _ => assert_eq!(got.to_string(), want.to_string(), "{case}"),
            }
        }
    })
    .await;
}
