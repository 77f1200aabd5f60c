//! Bounds on YAML files before they reach the YAML parser, so a hostile or
//! broken manifest or config costs milliseconds, not minutes or gigabytes:
//!
//! - the file is read only up to a size limit ([`read_bounded`]);
//! - nesting deeper than [`MAX_DEPTH`] is refused ([`check_shape`]): the
//!   parser's cost grows with the square of the nesting (100,000 `[` took
//!   over 30 s), so depth is measured by a linear pre-scan;
//! - aliases (`*name`) are refused: an alias can repeat a whole anchored
//!   tree, and aliases of aliases grow it exponentially ("billion laughs").
//!   Anchors alone are harmless and allowed.
//!
//! The pre-scan is a small YAML tokenizer that knows quotes, comments, block
//! scalars and flow collections well enough to never count what the parser
//! would not; where it is unsure it counts (a deeper estimate), which only
//! matters for files near the limit that no real manifest comes close to.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Deepest nesting of block and flow collections accepted.
pub const MAX_DEPTH: usize = 64;

/// Reads `path` as UTF-8 if it holds at most `max` bytes; larger files are
/// refused before they are read whole.
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<String, String> {
    // O_NONBLOCK: opening a FIFO planted as the file must not wait for a
    // writer (it would hang discovery); it is refused below. On a regular
    // file the flag changes nothing.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    match file.metadata() {
        Ok(meta) if !meta.is_file() => {
            return Err(
                "is not a regular file (a FIFO, device or directory); refusing to read it".into(),
            );
        }
        Err(e) => return Err(format!("cannot read: {e}")),
        Ok(_) => {}
    }
    let too_big = |size: String| {
        format!("is {size}, more than the {max}-byte limit for {what}; is this the right file?")
    };
    if let Ok(meta) = file.metadata()
        && meta.is_file()
        && meta.len() > max
    {
        return Err(too_big(format!("{} bytes", meta.len())));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(too_big("larger than that".to_string()));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Checks that `text` nests at most `max_depth` collections deep and has no
/// aliases. The error names the line.
pub fn check_shape(text: &str, max_depth: usize) -> Result<(), String> {
    let deep = |line: usize| {
        format!(
            "nests deeper than {max_depth} levels (at line {line}); such YAML is refused before parsing. Flatten it"
        )
    };
    // Columns of the enclosing block collections.
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // Inside a quoted scalar that goes on past its line.
    let mut quote: Option<u8> = None;
    // Inside a block scalar (`|`, `>`): lines indented more than this column
    // are its text.
    let mut block_scalar: Option<usize> = None;
    for (index, line) in text.split('\n').enumerate() {
        let number = index + 1;
        let line = line.as_bytes();
        let indent = line.iter().take_while(|b| **b == b' ').count();
        let blank = line[indent..].iter().all(u8::is_ascii_whitespace);
        if let Some(owner) = block_scalar {
            if blank || indent > owner {
                continue;
            }
            block_scalar = None;
        }
        let mut i = 0;
        // A position where a node may begin, so `[`, `{`, quotes, `*`, `|`
        // and `>` are indicators rather than part of a plain scalar.
        let mut node_start = true;
        // The line held a `key:` (a block scalar then belongs to the key).
        let mut keyed = false;
        if quote.is_none() && flow == 0 {
            if blank || line[indent] == b'#' {
                continue;
            }
            if indent == 0 && (line.starts_with(b"---") || line.starts_with(b"...")) {
                indents.clear();
                i = 3;
            } else {
                while indents.last().is_some_and(|top| *top > indent) {
                    indents.pop();
                }
                if indents.last().is_none_or(|top| *top < indent) {
                    indents.push(indent);
                }
                i = indent;
                // Compact nesting on one line: `- - - x`, `- ? x`.
                while i < line.len()
                    && matches!(line[i], b'-' | b'?')
                    && line.get(i + 1).is_none_or(|b| matches!(b, b' ' | b'\t'))
                {
                    i += 1;
                    while line.get(i).is_some_and(|b| matches!(b, b' ' | b'\t')) {
                        i += 1;
                    }
                    if indents.last().is_none_or(|top| *top < i) {
                        indents.push(i);
                    }
                    if indents.len() > max_depth {
                        return Err(deep(number));
                    }
                }
            }
            if indents.len() > max_depth {
                return Err(deep(number));
            }
        }
        let mut prev: Option<u8> = None;
        while i < line.len() {
            let b = line[i];
            i += 1;
            if let Some(q) = quote {
                if q == b'"' && b == b'\\' {
                    i += 1;
                } else if b == q {
                    if q == b'\'' && line.get(i) == Some(&b'\'') {
                        i += 1;
                    } else {
                        quote = None;
                        node_start = false;
                    }
                }
                prev = Some(b);
                continue;
            }
            let after_space = prev.is_none_or(|p| p == b' ' || p == b'\t');
            match b {
                b' ' | b'\t' | b'\r' => {}
                b'#' if after_space => break,
                b'"' | b'\'' if node_start => quote = Some(b),
                b'[' | b'{' if flow > 0 || node_start => {
                    flow += 1;
                    if indents.len() + flow > max_depth {
                        return Err(deep(number));
                    }
                    node_start = true;
                }
                b']' | b'}' if flow > 0 => {
                    flow -= 1;
                    node_start = false;
                }
                b',' if flow > 0 => node_start = true,
                b':' if line
                    .get(i)
                    .is_none_or(|n| matches!(n, b' ' | b'\t' | b'\r'))
                    || (flow > 0
                        && line.get(i).is_some_and(|n| matches!(n, b',' | b']' | b'}'))) =>
                {
                    node_start = true;
                    keyed = true;
                }
                b'*' if node_start => {
                    return Err(format!(
                        "line {number}: aliases (`*name`) are not accepted: one alias can repeat a whole tree, and nested ones grow it exponentially. Write the value out"
                    ));
                }
                b'|' | b'>' if node_start && flow == 0 => {
                    let rest = &line[i..];
                    let header = rest
                        .iter()
                        .take_while(|c| matches!(c, b'-' | b'+' | b'0'..=b'9'))
                        .count();
                    let tail = &rest[header..];
                    let tail = &tail[tail.iter().take_while(|c| c.is_ascii_whitespace()).count()..];
                    if tail.is_empty() || tail[0] == b'#' {
                        // The text is indented past the node that owns the
                        // scalar: the key, or the `-` before it.
                        let owner = if keyed || indents.len() < 2 {
                            indents.last().copied().unwrap_or(0)
                        } else {
                            indents[indents.len() - 2]
                        };
                        block_scalar = Some(owner);
                        break;
                    }
                    node_start = false;
                }
                b'&' | b'!' if node_start => {
                    // An anchor or tag before the node: skip its name.
                    while i < line.len() && !matches!(line[i], b' ' | b'\t' | b',' | b']' | b'}') {
                        i += 1;
                    }
                }
                _ => node_start = false,
            }
            prev = Some(b);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("plugin.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_bounded(&fifo, 1024, "a manifest").unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }

    fn depth_ok(text: &str, max: usize) -> bool {
        match check_shape(text, max) {
            Ok(()) => true,
            Err(e) if e.contains("nests deeper") => false,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    #[test]
    fn counts_flow_nesting() {
        assert!(depth_ok("a: [[[1]]]", 4));
        assert!(!depth_ok("a: [[[1]]]", 3));
        assert!(!depth_ok(&"[".repeat(100_000), 64));
        assert!(!depth_ok(&"{a: ".repeat(100), 64));
    }

    #[test]
    fn counts_block_nesting_by_indentation_and_compact_sequences() {
        let mut nested = String::new();
        for level in 0..10 {
            nested.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        assert!(depth_ok(&nested, 10));
        assert!(!depth_ok(&nested, 9));
        // Three sequences and the scalar's own column.
        assert!(depth_ok("- - - x", 4));
        assert!(!depth_ok("- - - x", 2));
        assert!(!depth_ok(&"- ".repeat(1000), 64));
        // Siblings do not add up.
        assert!(depth_ok("a: 1\nb: 2\nc:\n  d: 3\ne: 4\n", 2));
    }

    #[test]
    fn brackets_in_scalars_comments_and_block_text_do_not_count() {
        let text = format!(
            "a: \"{open}\"\nb: '{open}'\nc: x{open}\n# {open}\nd: |\n  {open}\n  *x\ne: - {open}\nf: 1 # {open}\n",
            open = "[".repeat(200)
        );
        assert!(depth_ok(&text, 3), "{:?}", check_shape(&text, 3));
        let script = "- run: |\n    [[ -f x ]] && echo '{'\n  other: *oops\n";
        assert!(check_shape(script, 8).unwrap_err().contains("aliases"));
    }

    #[test]
    fn text_left_of_a_block_scalar_is_not_skipped() {
        // Not indented past `a`: not the scalar's text, so it is counted.
        let text = format!("- a: |\n  {}", "[".repeat(100));
        assert!(!depth_ok(&text, 64));
    }

    #[test]
    fn quotes_span_lines_and_escape() {
        let text = "a: \"one \\\" [[[[\n  two [[[[\"\nb: 'it''s [[[['\n";
        assert!(depth_ok(text, 1), "{:?}", check_shape(text, 1));
    }

    #[test]
    fn refuses_aliases_and_allows_anchors() {
        assert!(check_shape("a: &x 1\nb: 2\n", 8).is_ok());
        let err = check_shape("a: &x [1]\nb: *x\n", 8).unwrap_err();
        assert!(err.contains("line 2") && err.contains("aliases"), "{err}");
        assert!(check_shape("a: [1, *x]\n", 8).is_err());
        assert!(check_shape("<<: *base\n", 8).is_err());
        // Not an alias: inside a plain scalar.
        assert!(check_shape("cmd: echo a*b *\n", 8).is_ok());
    }

    #[test]
    fn reads_only_up_to_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.yaml");
        std::fs::write(&path, "a: 1\n".repeat(1000)).unwrap();
        let err = read_bounded(&path, 100, "a test file").unwrap_err();
        assert!(
            err.contains("5000 bytes") && err.contains("100-byte limit"),
            "{err}"
        );
        assert_eq!(read_bounded(&path, 5000, "x").unwrap().len(), 5000);
        std::fs::write(&path, b"a: \xff\n").unwrap();
        assert!(read_bounded(&path, 100, "x").unwrap_err().contains("UTF-8"));
    }
}
