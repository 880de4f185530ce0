//! The README's Rust worker is `examples/readme_worker.rs`: the example
//! builds with the workspace (so the README's code compiles as written) and
//! this test keeps the README's text identical to it.

use std::path::Path;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The body of the first ```rust block after `marker` in `text`.
fn rust_block_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let from = text.find(marker)?;
    let start = text[from..].find("```rust\n")? + from + "```rust\n".len();
    let len = text[start..].find("```")?;
    Some(&text[start..start + len])
}

#[test]
fn the_readme_rust_worker_is_the_readme_worker_example() {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = read(&sdk.join("../README.md"));
    let block = rust_block_after(&readme, "**Rust**")
        .expect("README.md has a ```rust block after **Rust**");
    let example = read(&sdk.join("examples/readme_worker.rs"));
    // The example is its `//!` header, a blank line, then the README's code.
    let code = example
        .lines()
        .skip_while(|l| l.starts_with("//!"))
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert_eq!(
        block, code,
        "README.md's Rust worker and examples/readme_worker.rs differ: change both"
    );
    assert!(code.contains("fn main"), "a complete program: {code}");
}
