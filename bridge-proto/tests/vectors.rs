//! Golden vectors: the committed bytes under `vectors/` are the protocol.
//!
//! For every message in the catalogue (`common::catalogue`), encoding it must
//! give exactly the stored `.msgpack` bytes, decoding those bytes must give the
//! message back, and the stored `.json` must be the same bytes rendered as
//! JSON. Frames under `vectors/invalid/` must be rejected with the listed kind
//! of error. Any difference fails: a change to the wire format has to be a
//! deliberate regeneration (`REGENERATE_VECTORS=1`, see `PROTOCOL.md`) that
//! shows up in review as changed vector files.

mod common;

use std::{collections::BTreeSet, fs, path::Path};

use common::*;
use serde::Serialize;

/// Writes `contents` to `path` when regenerating; returns what is stored.
fn stored(path: &Path, contents: &[u8]) -> Vec<u8> {
    if regenerating() {
        fs::create_dir_all(path.parent().expect("vector paths have a parent"))
            .expect("create vector directory");
        fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    fs::read(path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (run `{REGENERATE}=1 cargo test -p bridge-proto --test vectors` \
             to create missing vectors)",
            path.display()
        )
    })
}

#[test]
fn catalogue_has_a_main_vector_for_every_kind() {
    let vectors = catalogue();
    let mut names = BTreeSet::new();
    for v in &vectors {
        assert!(
            names.insert((v.direction().name(), v.name)),
            "duplicate vector {}",
            v.rel()
        );
        let kind = v.name.split('.').next().expect("split yields one item");
        assert_eq!(kind, v.msg.kind(), "vector {} holds another kind", v.rel());
    }
    for (direction, kinds) in [
        (Direction::ToWorker, &TO_WORKER_KINDS[..]),
        (Direction::FromWorker, &FROM_WORKER_KINDS[..]),
        (Direction::Publication, &["publication"][..]),
    ] {
        let covered: BTreeSet<&str> = vectors
            .iter()
            .filter(|v| v.direction() == direction)
            .map(|v| v.name)
            .collect();
        for kind in kinds {
            assert!(
                covered.contains(kind),
                "no main vector `{kind}` for {}",
                direction.name()
            );
        }
    }
}

#[test]
fn golden_vectors_match_encoder_decoder_and_json() {
    for v in catalogue() {
        let encoded = v.msg.encode();
        let bytes = stored(&v.msgpack_path(), &encoded);
        assert_eq!(
            hex(&encoded),
            hex(&bytes),
            "encoding the catalogue message differs from {}",
            v.rel()
        );
        let decoded = v
            .msg
            .decode_like(&bytes)
            .unwrap_or_else(|e| panic!("{} does not decode: {e}", v.rel()));
        assert_eq!(decoded, v.msg, "{} decodes to another message", v.rel());

        let generic = Mp::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", v.rel()));
        assert_eq!(
            generic.get("v"),
            Some(&Mp::Uint(u64::from(bridge_proto::PROTOCOL_VERSION))),
            "{}: v",
            v.rel()
        );
        assert_eq!(
            generic.get("kind"),
            Some(&Mp::Str(v.msg.kind().to_owned())),
            "{}: kind",
            v.rel()
        );
        let text = generic.to_json_text();
        let stored_text = stored(&v.json_path(), text.as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&stored_text),
            text,
            "{} is not the JSON rendering of its .msgpack",
            v.json_path().display()
        );
        // The rendering must be plain JSON that any parser reads.
        serde_json::from_slice::<serde_json::Value>(&stored_text)
            .unwrap_or_else(|e| panic!("{}: {e}", v.json_path().display()));
    }
}

#[derive(Serialize)]
struct IndexEntry<'a> {
    file: String,
    direction: &'a str,
    rejection: &'a str,
    why: &'a str,
}

#[test]
fn invalid_vectors_are_rejected_with_the_listed_error() {
    let dir = vectors_dir().join("invalid");
    let cases = invalid_catalogue();
    let index: Vec<IndexEntry<'_>> = cases
        .iter()
        .map(|c| IndexEntry {
            file: format!("{}.msgpack", c.name),
            direction: c.direction.name(),
            rejection: c.rejection.name(),
            why: c.why,
        })
        .collect();
    let mut index_text = serde_json::to_string_pretty(&index).expect("index serializes");
    index_text.push('\n');
    let stored_index = stored(&dir.join("index.json"), index_text.as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&stored_index),
        index_text,
        "vectors/invalid/index.json is stale"
    );
    for c in &cases {
        let bytes = stored(&dir.join(format!("{}.msgpack", c.name)), &c.bytes);
        assert_eq!(hex(&bytes), hex(&c.bytes), "invalid/{}.msgpack", c.name);
        match c.direction.decode(&bytes) {
            Ok(m) => panic!("invalid/{} ({}) decoded to {m:?}", c.name, c.why),
            Err(e) => assert!(
                c.rejection.matches(&e),
                "invalid/{}: expected a {} error, got {e:?}",
                c.name,
                c.rejection.name()
            ),
        }
    }
}

/// Every file under `vectors/` belongs to a catalogue entry, so a renamed or
/// removed vector cannot linger and mislead the other implementations.
#[test]
fn no_stale_vector_files() {
    let mut expected = BTreeSet::from(["README.md".to_owned(), "invalid/index.json".to_owned()]);
    for v in catalogue() {
        let base = v.rel();
        let stem = base.trim_end_matches(".msgpack");
        expected.insert(format!("{stem}.msgpack"));
        expected.insert(format!("{stem}.json"));
    }
    for c in invalid_catalogue() {
        expected.insert(format!("invalid/{}.msgpack", c.name));
    }
    let root = vectors_dir();
    let mut found = BTreeSet::new();
    for sub in ["", "to_worker", "from_worker", "invalid"] {
        let Ok(entries) = fs::read_dir(root.join(sub)) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("read vectors directory entry");
            if entry.file_type().expect("file type").is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if sub.is_empty() {
                name
            } else {
                format!("{sub}/{name}")
            };
            found.insert(rel);
        }
    }
    if regenerating() {
        for stale in found.difference(&expected) {
            fs::remove_file(root.join(stale)).expect("remove stale vector");
        }
        return;
    }
    let stale: Vec<_> = found.difference(&expected).collect();
    assert!(
        stale.is_empty(),
        "files under vectors/ that no test writes: {stale:?}"
    );
}
