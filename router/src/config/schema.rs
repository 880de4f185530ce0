//! Stage 1 of reading a routes file: the schema (field names and value
//! types), with **every** problem reported in one pass.
//!
//! serde stops at the first error, so one unknown field would hide a value
//! of the wrong type next to it. Here the file is parsed into a JSON value
//! first (a syntax error is the only problem then: nothing after it can be
//! read), and deserialized with [`serde_path_to_error`], which says where the
//! error is. The offending field is reported by its JSON path
//! (`routes[1].maxInFlight`), taken out of the value, and the rest is read
//! again, until it deserializes. What was taken out is left to its default,
//! so stage 2 (the rules serde cannot check) still runs on everything else;
//! its problems at or inside a location reported here are dropped, because
//! that field was never read.

use serde_json::{Map, Value};
use serde_path_to_error::Segment;

use super::{Problem, RoutesFile};

/// Bound on repairs of one file: every repair removes or fills one field,
/// so this is only reached by a file with this many problems.
const MAX_PROBLEMS: usize = 1000;

/// Placeholders for required fields that are missing, so the rest of their
/// object can still be read. Stage 2 would report these values; it does not,
/// because the missing field is reported at the same location.
fn placeholder(field: &str) -> Option<Value> {
    match field {
        "routes" => Some(Value::Array(Vec::new())),
        "path" => Some(Value::String(String::new())),
        _ => None,
    }
}

/// Reads `value` as a routes file. `None` when what is left cannot be read
/// at all (the top level is not an object); the problems found either way.
pub(super) fn read(mut value: Value) -> (Option<RoutesFile>, Vec<Problem>) {
    let mut problems: Vec<Problem> = Vec::new();
    if !value.is_object() {
        let found = kind_of(&value);
        let message = format!("must be a JSON object with a `routes` list, found {found}");
        return (None, vec![Problem::new("routes file", message)]);
    }
    lists_for_objects(&mut value, &mut problems);
    while problems.len() < MAX_PROBLEMS {
        let err = match serde_path_to_error::deserialize::<_, RoutesFile>(&value) {
            Ok(file) => return (Some(file), problems),
            Err(err) => err,
        };
        let segments: Vec<Segment> = err.path().iter().cloned().collect();
        let message = err.inner().to_string();
        let missing = missing_field(&message);
        let mut location = location_of(&segments);
        if let Some(field) = missing {
            location = join(&location, field);
        }
        if !problems.iter().any(|p| covers(&p.location, &location)) {
            problems.push(Problem::new(
                location.clone(),
                explain(&message, missing.is_some()),
            ));
        }
        let repaired = match missing {
            Some(field) => fill(&mut value, &segments, field),
            None => remove(&mut value, &segments),
        };
        if !repaired {
            return (None, problems);
        }
    }
    (None, problems)
}

/// The objects of the schema, where serde would also take a list (a struct
/// can be read from its fields in order): `["/ws"]` is not a route.
const OBJECTS: [(&str, &str); 5] = [
    ("defaults", "a `defaults` object"),
    ("rateLimit", "a `rateLimit` object"),
    ("circuitBreaker", "a `circuitBreaker` object"),
    ("auth", "an `auth` object"),
    ("resume", "a `resume` object"),
];

/// Takes out (and reports) the fields of `object` that should be objects
/// and are lists.
fn drop_lists(object: &mut Map<String, Value>, at: &str, problems: &mut Vec<Problem>) {
    for (field, what) in OBJECTS {
        if object.get(field).is_some_and(Value::is_array) {
            object.remove(field);
            problems.push(Problem::new(
                join(at, field),
                format!("invalid type: a list, expected {what}"),
            ));
        }
    }
}

/// Reports (and takes out) every list where the schema has an object.
fn lists_for_objects(value: &mut Value, problems: &mut Vec<Problem>) {
    let Some(root) = value.as_object_mut() else {
        return;
    };
    if let Some(defaults) = root.get_mut("defaults").and_then(Value::as_object_mut) {
        drop_lists(defaults, "defaults", problems);
    }
    if root.get("defaults").is_some_and(Value::is_array) {
        root.remove("defaults");
        problems.push(Problem::new(
            "defaults",
            "invalid type: a list, expected a `defaults` object",
        ));
    }
    let Some(routes) = root.get_mut("routes").and_then(Value::as_array_mut) else {
        return;
    };
    for (i, route) in routes.iter_mut().enumerate() {
        let at = format!("routes[{i}]");
        match route {
            Value::Object(object) => drop_lists(object, &at, problems),
            Value::Array(_) => {
                problems.push(Problem::new(
                    at,
                    "invalid type: a list, expected a route object",
                ));
                let mut placeholder = Map::new();
                placeholder.insert("path".to_owned(), Value::String(String::new()));
                *route = Value::Object(placeholder);
            }
            _ => {}
        }
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Whether a problem at `outer` already accounts for one at `inner`: the
/// same location, or a field or element inside it.
pub(super) fn covers(outer: &str, inner: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// `routes[1].maxInFlight` for the segments `routes`, 1, `maxInFlight`.
fn location_of(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, key),
            Segment::Enum { variant } => out = join(&out, variant),
            Segment::Unknown => out = join(&out, "?"),
        }
    }
    if out.is_empty() {
        "routes file".to_owned()
    } else {
        out
    }
}

fn join(location: &str, field: &str) -> String {
    if location.is_empty() || location == "routes file" {
        field.to_owned()
    } else {
        format!("{location}.{field}")
    }
}

/// The field name of serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// serde's message, made friendlier where it helps: an unknown field gets
/// the known field it most likely meant, instead of the whole list.
fn explain(message: &str, missing: bool) -> String {
    if missing {
        return "missing (this field is required)".to_owned();
    }
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_owned();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_owned();
    };
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match closest(unknown, &known) {
        Some(suggestion) => format!("unknown field `{unknown}`; did you mean `{suggestion}`?"),
        None => message.to_owned(),
    }
}

/// The known name closest to `unknown`: one that contains it or is
/// contained in it (ignoring case), else one within a third of its length
/// in edits.
fn closest<'a>(unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let lower = unknown.to_lowercase();
    if lower.len() >= 3 {
        if let Some(k) = known.iter().find(|k| {
            let k = k.to_lowercase();
            k.contains(&lower) || lower.contains(&k)
        }) {
            return Some(k);
        }
    }
    known
        .iter()
        .map(|k| (strsim::levenshtein(&k.to_lowercase(), &lower), *k))
        .filter(|(d, k)| *d <= (k.len().min(unknown.len()) / 3).max(1))
        .min()
        .map(|(_, k)| k)
}

/// The object at `segments` (the root for none).
fn object_at<'a>(value: &'a mut Value, segments: &[Segment]) -> Option<&'a mut Map<String, Value>> {
    let mut node = value;
    for segment in segments {
        node = match segment {
            Segment::Map { key } => node.as_object_mut()?.get_mut(key)?,
            Segment::Seq { index } => node.as_array_mut()?.get_mut(*index)?,
            _ => return None,
        };
    }
    node.as_object_mut()
}

/// Gives the object at `segments` a placeholder for its missing `field`.
fn fill(value: &mut Value, segments: &[Segment], field: &str) -> bool {
    match (object_at(value, segments), placeholder(field)) {
        (Some(object), Some(v)) => object.insert(field.to_owned(), v).is_none(),
        _ => false,
    }
}

/// Takes the bad node out: the nearest field that holds it is removed (an
/// element of a list takes its whole list with it), except a route that is
/// not an object, which becomes an empty route so the others keep their
/// indexes.
fn remove(value: &mut Value, segments: &[Segment]) -> bool {
    if let [Segment::Map { key }, Segment::Seq { index }] = segments {
        if key == "routes" {
            let Some(slot) = value.get_mut("routes").and_then(|r| r.get_mut(*index)) else {
                return false;
            };
            let mut route = Map::new();
            route.insert("path".to_owned(), Value::String(String::new()));
            *slot = Value::Object(route);
            return true;
        }
    }
    let Some(last_key) = segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    let Segment::Map { key } = &segments[last_key] else {
        return false;
    };
    object_at(value, &segments[..last_key]).is_some_and(|o| o.remove(key).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_is_by_path_segment() {
        assert!(covers("routes[1]", "routes[1]"));
        assert!(covers("routes[1]", "routes[1].path"));
        assert!(covers("routes", "routes[0].path"));
        assert!(!covers("routes[1]", "routes[10].path"));
        assert!(!covers("routes[1].auth", "routes[1].authx"));
    }

    #[test]
    fn unknown_fields_get_the_field_they_most_likely_meant() {
        let known = ["requestTimeoutMs", "maxInFlight", "pythonModule", "path"];
        for (unknown, want) in [
            ("timeoutMs", Some("requestTimeoutMs")),
            ("pythonModul", Some("pythonModule")),
            ("maxinflight", Some("maxInFlight")),
            ("pth", Some("path")),
            ("colour", None),
        ] {
            assert_eq!(closest(unknown, &known), want, "{unknown}");
        }
    }
}
