//! The proof of the shared secret (protocol version 2).
//!
//! A router with a secret answers a `hello` with a `challenge` carrying a
//! fresh random nonce; the worker answers with `auth{proof}`, where
//! `proof = HMAC-SHA256(key = secret, message = DOMAIN || nonce)`. The secret
//! itself never crosses the wire, and a captured proof is worth nothing on
//! another connection, whose nonce differs. `PROTOCOL.md` §14 gives the same
//! definition for implementers in other languages, with a test vector.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a challenge nonce.
pub const NONCE_LEN: usize = 32;

/// Bytes of a proof (one SHA-256 output).
pub const PROOF_LEN: usize = 32;

/// Prefix of the MAC'd message, so a proof can never be mistaken for an
/// HMAC the same secret makes for another purpose.
pub const DOMAIN: &[u8] = b"bridge-proto/2 auth\0";

/// The proof a worker that knows `secret` sends for `nonce`.
pub fn proof(secret: &[u8], nonce: &[u8]) -> [u8; PROOF_LEN] {
    // Invariant: HMAC takes keys of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(DOMAIN);
    mac.update(nonce);
    mac.finalize().into_bytes().into()
}

/// Whether `candidate` is the proof for `nonce` under `secret`, compared in
/// constant time (the time taken does not depend on where the bytes differ).
pub fn verify(secret: &[u8], nonce: &[u8], candidate: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(DOMAIN);
    mac.update(nonce);
    // `verify_slice` compares with `subtle`'s constant-time equality and
    // rejects a candidate of another length.
    mac.verify_slice(candidate).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector printed in PROTOCOL.md §14 (Python:
    /// `hmac.new(b"s3cret", b"bridge-proto/2 auth\0" + bytes(range(32)), "sha256")`).
    #[test]
    fn proof_matches_the_documented_vector() {
        let nonce: Vec<u8> = (0u8..32).collect();
        let p = proof(b"s3cret", &nonce);
        let hex: String = p.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, DOCUMENTED_PROOF_HEX);
        assert!(verify(b"s3cret", &nonce, &p));
    }

    #[test]
    fn wrong_secret_nonce_or_length_fails() {
        let nonce = [7u8; NONCE_LEN];
        let p = proof(b"right", &nonce);
        assert!(!verify(b"wrong", &nonce, &p));
        assert!(!verify(b"right", &[8u8; NONCE_LEN], &p));
        assert!(!verify(b"right", &nonce, &p[..31]));
        assert!(!verify(b"right", &nonce, &[]));
        let mut flipped = p;
        flipped[31] ^= 1;
        assert!(!verify(b"right", &nonce, &flipped));
    }

    const DOCUMENTED_PROOF_HEX: &str =
        "6786618e992b7788501a39bf91ea5fcfc87c1b71ad060647d5df98b1b95512f3";
}
