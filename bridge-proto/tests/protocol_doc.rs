//! `PROTOCOL.md` is written for people, but the parts another implementation
//! copies (field tables and hex dumps) are checked here against the golden
//! vectors, which `tests/vectors.rs` checks against the code. A field added
//! to a struct without a table row, a reordered field, a wrong type or a
//! stale hex dump fails this test.
//!
//! Two markers in the document tie it to the vectors:
//! - `<!-- fields: <direction>/<kind> -->` before the field table of a kind
//!   (columns: Field, Type, Required, Meaning), or before a line starting
//!   with "No fields" for kinds without fields;
//! - `<!-- vector: <path under vectors/> -->` before a ```text block of hex
//!   bytes, with commentary after `#` on each line.

mod common;

use std::{collections::BTreeMap, fs, path::Path};

use common::*;

fn protocol_md() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("PROTOCOL.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[derive(Debug)]
struct Field {
    name: String,
    ty: String,
    required: bool,
}

/// The text after `<!-- {tag}: ` up to ` -->` if `line` is such a marker.
fn marker<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.trim()
        .strip_prefix("<!-- ")?
        .strip_prefix(tag)?
        .strip_prefix(": ")?
        .strip_suffix(" -->")
        .map(str::trim)
}

fn cell(s: &str) -> String {
    s.trim().trim_matches('`').to_owned()
}

/// `direction/kind` -> documented fields, in document order.
fn field_tables(doc: &str) -> BTreeMap<String, Vec<Field>> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut tables = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(key) = marker(line, "fields") else {
            continue;
        };
        let mut rest = lines[i + 1..].iter().skip_while(|l| l.trim().is_empty());
        let first = rest.next().copied().unwrap_or_default();
        let fields = if first.starts_with('|') {
            let header: Vec<String> = first.split('|').map(cell).collect();
            assert_eq!(
                header,
                ["", "Field", "Type", "Required", "Meaning", ""],
                "table header for {key}"
            );
            rest.skip(1) // the |---| separator
                .take_while(|l| l.starts_with('|'))
                .map(|row| {
                    let cells: Vec<String> = row.split('|').map(cell).collect();
                    assert_eq!(cells.len(), 6, "row of {key}: {row}");
                    let required = match cells[3].as_str() {
                        "yes" => true,
                        "no" => false,
                        other => panic!("{key}.{}: Required is {other:?}", cells[1]),
                    };
                    Field {
                        name: cells[1].clone(),
                        ty: cells[2].clone(),
                        required,
                    }
                })
                .collect()
        } else {
            assert!(
                first.starts_with("No fields"),
                "marker for {key} is followed by neither a table nor \"No fields\""
            );
            Vec::new()
        };
        assert!(
            tables.insert(key.to_owned(), fields).is_none(),
            "two field tables for {key}"
        );
    }
    tables
}

/// Whether `value` is of the documented `ty` (the vocabulary of PROTOCOL.md §3).
fn has_type(value: &Mp, ty: &str) -> bool {
    match (ty, value) {
        ("str", Mp::Str(_)) | ("bool", Mp::Bool(_)) | ("bin", Mp::Bin(_)) => true,
        ("uint16", Mp::Uint(n)) => u16::try_from(*n).is_ok(),
        ("uint32", Mp::Uint(n)) => u32::try_from(*n).is_ok(),
        ("uint64", Mp::Uint(_)) => true,
        ("array<str>", Mp::Array(items)) => items.iter().all(|i| matches!(i, Mp::Str(_))),
        ("map<str,str>", Mp::Map(entries)) => entries
            .iter()
            .all(|(k, v)| matches!((k, v), (Mp::Str(_), Mp::Str(_)))),
        ("value", v) => is_json_value(v),
        _ => false,
    }
}

fn is_json_value(value: &Mp) -> bool {
    match value {
        Mp::Bin(_) => false,
        Mp::Float(f) => f.is_finite(),
        Mp::Array(items) => items.iter().all(is_json_value),
        Mp::Map(entries) => entries
            .iter()
            .all(|(k, v)| matches!(k, Mp::Str(_)) && is_json_value(v)),
        _ => true,
    }
}

#[test]
fn every_kind_has_a_field_table_in_wire_order() {
    let tables = field_tables(&protocol_md());
    let vectors = catalogue();
    let mut expected_keys: Vec<String> = TO_WORKER_KINDS
        .iter()
        .map(|k| format!("to_worker/{k}"))
        .chain(FROM_WORKER_KINDS.iter().map(|k| format!("from_worker/{k}")))
        .chain(std::iter::once("publication/publication".to_owned()))
        .collect();
    expected_keys.sort();
    let documented: Vec<String> = tables.keys().cloned().collect();
    assert_eq!(documented, expected_keys, "field tables in PROTOCOL.md");

    for (key, fields) in &tables {
        let (direction, kind) = key.split_once('/').expect("marker is direction/kind");
        let of_kind: Vec<(&Vector, Mp)> = vectors
            .iter()
            .filter(|v| v.direction().name() == direction && v.msg.kind() == kind)
            .map(|v| (v, Mp::decode(&v.msg.encode()).expect("catalogue encodes")))
            .collect();
        let (_, main) = of_kind
            .iter()
            .find(|(v, _)| v.name == kind)
            .unwrap_or_else(|| panic!("no main vector for {key}"));

        // The main vector has every field, so its keys are the wire order.
        let wire: Vec<&str> = main
            .entries()
            .expect("a map")
            .into_iter()
            .map(|(k, _)| k)
            .skip(2)
            .collect();
        let doc: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            doc, wire,
            "{key}: PROTOCOL.md fields vs. wire order (messages.rs)"
        );

        for f in fields {
            let mut absent_somewhere = false;
            for (v, generic) in &of_kind {
                match generic.get(&f.name) {
                    Some(value) => assert!(
                        has_type(value, &f.ty),
                        "{}: field {} is documented as {} but holds {value:?}",
                        v.rel(),
                        f.name,
                        f.ty
                    ),
                    None => {
                        assert!(!f.required, "{}: required field {} absent", v.rel(), f.name);
                        absent_somewhere = true;
                    }
                }
            }
            if !f.required {
                assert!(
                    absent_somewhere,
                    "{key}: optional field {} is present in every vector; add a variant without it",
                    f.name
                );
            }
        }
    }
}

#[test]
fn hex_dumps_are_the_vector_bytes() {
    let doc = protocol_md();
    let lines: Vec<&str> = doc.lines().collect();
    let mut checked = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some(rel) = marker(line, "vector") else {
            continue;
        };
        let mut rest = lines[i + 1..].iter().skip_while(|l| l.trim().is_empty());
        assert_eq!(
            rest.next().map(|l| l.trim()),
            Some("```text"),
            "a ```text block must follow the marker for {rel}"
        );
        let mut bytes = Vec::new();
        for l in rest.take_while(|l| l.trim() != "```") {
            let hex_part = l.split('#').next().unwrap_or_default();
            for token in hex_part.split_whitespace() {
                assert!(
                    token.len() == 2 && token.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{rel}: {token:?} is not a hex byte (commentary goes after #)"
                );
                bytes.push(u8::from_str_radix(token, 16).expect("checked hex digits"));
            }
        }
        let path = vectors_dir().join(rel);
        let stored = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert_eq!(hex(&bytes), hex(&stored), "PROTOCOL.md hex dump of {rel}");
        checked += 1;
    }
    assert!(
        checked >= 2,
        "PROTOCOL.md shows at least a heartbeat and a request"
    );
}
