//! Hostile rclone output (issue 8, item 5; docs/reliability.md): every recorded log of rclone
//! 1.60.1 and 1.75.2 (`tests/fixtures/rclone-logs/`), with hostile lines spliced in, must fold
//! to the same counts as the clean log. The hostile lines are truncated copies of the log's own
//! JSON lines, invalid UTF-8, lines over and at the 1 MiB cap, unknown message kinds and field
//! types, and plain-text fatal output (Go panics, runtime fatals, goroutine dumps).
//!
//! Both ways the product reads rclone's stderr are exercised: [`events::count_lines`] (the
//! streaming reader) and `parse_line` + `observe` over lines split as `Rclone::stream` splits
//! them (at `\n`, each cut at 1 MiB).

use std::io::{BufRead, BufReader, Read};

use offsite::events::{self, BucketCounts, MAX_LINE_BYTES};
use serde_json::Value;

mod rclone_logs;
use rclone_logs::LOGS;

/// Small hostile lines, spliced between every pair of lines (without their `\n`).
fn small_hostile() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        // invalid UTF-8: lone continuation bytes, a cut sequence, overlong NUL, surrogate
        &b"\xff\xfe\xfd"[..],
        b"\x80\x81 rclone \xc3",
        b"\xc0\x80\xed\xa0\x80",
        b"{\"level\":\"info\",\"msg\":\"\xff\xfe unknown\",\"object\":\"a\xffb\"}",
        b"\x00\x00\x00",
        b"\x1b[2J\x1b[31mred\x1b[0m",
        // unknown message kinds, levels and field types
        br#"{"level":"info","msg":"Something rclone 9.0 says","object":"x","size":5}"#,
        br#"{"level":"notice","msg":"Starting bandwidth limiter at 1Mi Byte/s"}"#,
        br#"{"level":"trace9","msg":"unknown level","object":"y"}"#,
        br#"{"level":{"nested":true},"msg":"level is an object"}"#,
        br#"{"level":"info","msg":42}"#,
        br#"{"level":"info","msg":null,"object":"a.txt"}"#,
        br#"{"level":"info","msg":"stats as a string","stats":"corrupt"}"#,
        br#"{"level":"info","msg":"stats as a list","stats":[1,2,3]}"#,
        br#"{"level":"info","msg":"size nonsense","size":"abc","object":"q"}"#,
        br#"{"level":"info","msg":"huge size","size":1e400,"object":"q"}"#,
        br#"{"level":"info","msg":"negative size","size":-1,"object":"q"}"#,
        br#"{"level":"info","msg":"unknown keys","pid":1,"extra":{"a":[{"b":null}]}}"#,
        br#"{"time":"2026-12-03T19:36:46Z","level":"info","msg":"Skipped something new"}"#,
        br#"{"level":"info"}"#,
        b"{}",
        b"[]",
        b"\"a bare string\"",
        b"12345",
        b"null",
        // plain-text fatal output
        b"panic: runtime error: invalid memory address or nil pointer dereference",
        b"[signal SIGSEGV: segmentation violation code=0x1 addr=0x0 pc=0x1234]",
        b"goroutine 1 [running]:",
        b"github.com/rclone/rclone/fs/sync.(*syncCopyMove).run(0xc000123456)",
        b"\t/home/runner/work/rclone/fs/sync/sync.go:1234 +0x1d",
        b"fatal error: concurrent map writes",
        b"runtime: out of memory: cannot allocate 1048576-byte block",
        b"2026/12/03 19:13:00 ERROR : a plain-text error line",
        b"2026/12/03 19:13:00 Fatal error received - not attempting retries",
        b"",
        b"\r",
        b"   ",
    ]
    .iter()
    .map(|l| l.to_vec())
    .collect();
    // Deeply nested JSON (past serde_json's recursion limit).
    v.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    v.push(
        format!(
            r#"{{"level":"info","msg":{}"x"{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        )
        .into_bytes(),
    );
    v
}

/// Lines at and over the cap: cut and kept as text, or (unknown kinds) parsed and ignored.
fn big_hostile() -> Vec<Vec<u8>> {
    let exact = {
        let head = br#"{"level":"info","msg":"Big unknown message","object":""#;
        let tail = br#""}"#;
        let mut l = head.to_vec();
        l.resize(MAX_LINE_BYTES - tail.len(), b'o');
        l.extend_from_slice(tail);
        l
    };
    assert_eq!(exact.len(), MAX_LINE_BYTES);
    vec![
        vec![b'x'; MAX_LINE_BYTES + 1],
        vec![0xff; 3 * MAX_LINE_BYTES / 2],
        // A known message over the cap: cut, so it is not counted.
        format!(
            r#"{{"level":"info","msg":"Copied (new)","object":"{}","size":1}}"#,
            "n".repeat(MAX_LINE_BYTES)
        )
        .into_bytes(),
        format!(
            r#"{{"level":"error","msg":"Failed to copy: {}","object":"o"}}"#,
            "e".repeat(MAX_LINE_BYTES * 2)
        )
        .into_bytes(),
        exact,
    ]
}

/// Truncated copies of the log's own JSON lines: every 7th cut point of each.
fn truncated_copies(log: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for line in log.split(|&b| b == b'\n').filter(|l| l.starts_with(b"{")) {
        for cut in (1..line.len()).step_by(7).chain([line.len() - 1]) {
            out.push(line[..cut].to_vec());
        }
    }
    out
}

/// `log` with `hostile[i % len]` spliced before line i and at the end.
fn splice(log: &[u8], hostile: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let lines: Vec<&[u8]> = log.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        out.extend_from_slice(&hostile[i % hostile.len()]);
        out.push(b'\n');
        out.extend_from_slice(line);
    }
    out.extend_from_slice(&hostile[lines.len() % hostile.len()]);
    out.push(b'\n');
    out
}

/// `log` with `hostile[i]` spliced before line i (the rest at the end): each line once.
fn splice_once(log: &[u8], hostile: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    let lines: Vec<&[u8]> = log.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if let Some(h) = hostile.get(i) {
            out.extend_from_slice(h);
            out.push(b'\n');
        }
        out.extend_from_slice(line);
    }
    for h in hostile.iter().skip(lines.len()) {
        out.extend_from_slice(h);
        out.push(b'\n');
    }
    out
}

/// `parse_line` + `observe` over lines split as `Rclone::stream` does.
fn counts_as_streamed(log: &[u8]) -> BucketCounts {
    let mut counts = BucketCounts::default();
    let mut r = BufReader::with_capacity(64 * 1024, log);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut line)
            .unwrap();
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') && n == MAX_LINE_BYTES {
            let mut sink = Vec::new();
            r.read_until(b'\n', &mut sink).unwrap();
        }
        counts.observe(&events::parse_line(&line));
    }
    counts
}

/// Every count, with the two diagnostics that hostile text may legitimately change removed:
/// `last_error` (a Go panic line is a good last error) and `unhandled_text`.
fn summary(c: &BucketCounts) -> Value {
    let mut v = serde_json::to_value(c).unwrap();
    let m = v.as_object_mut().unwrap();
    m.remove("last_error");
    m.remove("unhandled_text");
    v
}

#[track_caller]
fn assert_bounded(c: &BucketCounts, what: &str) {
    assert!(c.unhandled_text.len() <= 20, "{what}");
    for t in &c.unhandled_text {
        assert!(
            t.len() <= 2000 + 4,
            "{what}: kept a {}-byte text line",
            t.len()
        );
    }
    assert!(
        c.last_error.as_ref().is_none_or(|e| e.len() <= 2000 + 4),
        "{what}"
    );
}

#[track_caller]
fn assert_same(log: &[u8], hostile_log: &[u8], what: &str) {
    let clean = events::count_lines(log);
    let want = summary(&clean);
    let mut readers = vec![
        ("count_lines", events::count_lines(hostile_log)),
        ("as streamed", counts_as_streamed(hostile_log)),
    ];
    // Lines split across reads, at every offset; too slow for the megabyte lines in debug.
    if hostile_log.len() < 1 << 20 {
        readers.push((
            "count_lines, 5-byte buffer",
            events::count_lines(BufReader::with_capacity(5, hostile_log)),
        ));
    }
    for (how, got) in readers {
        assert_eq!(summary(&got), want, "{what} ({how})");
        assert_bounded(&got, what);
        if clean.last_error.is_some() {
            assert!(got.last_error.is_some(), "{what} ({how}): last error lost");
        }
    }
}

#[test]
fn clean_logs_read_the_same_both_ways() {
    for (name, log) in LOGS {
        assert_eq!(
            summary(&events::count_lines(*log)),
            summary(&counts_as_streamed(log)),
            "{name}"
        );
    }
}

#[test]
fn small_hostile_lines_between_every_line() {
    let hostile = small_hostile();
    for (name, log) in LOGS {
        // Rotated, so that each hostile line follows many different recorded lines.
        for shift in (0..hostile.len()).step_by(3) {
            let mut h = hostile.clone();
            h.rotate_left(shift);
            assert_same(log, &splice(log, &h), &format!("{name}, shift {shift}"));
        }
    }
}

#[test]
fn truncated_copies_of_the_logs_own_lines() {
    for (name, log) in LOGS {
        let t = truncated_copies(log);
        if !t.is_empty() {
            assert_same(log, &splice(log, &t), name);
        }
    }
}

#[test]
fn one_megabyte_lines() {
    let big = big_hostile();
    for (name, log) in LOGS {
        assert_same(log, &splice_once(log, &big), name);
    }
}

#[test]
fn crlf_and_a_missing_final_newline() {
    for (name, log) in LOGS {
        let crlf: Vec<u8> = log
            .iter()
            .flat_map(|&b| {
                if b == b'\n' {
                    vec![b'\r', b'\n']
                } else {
                    vec![b]
                }
            })
            .collect();
        assert_same(log, &crlf, &format!("{name} CRLF"));
        let trimmed = log.strip_suffix(b"\n").unwrap_or(log);
        assert_same(log, trimmed, &format!("{name} without final newline"));
    }
}

/// A record cut off in the middle names rclone's flag phrases in a field rclone never meant as
/// a message (here, an object name): it must not raise the flags.
#[test]
fn a_damaged_record_raises_no_flags() {
    let (_, log) = LOGS[0];
    let cut = |msg: &str| {
        let full = format!(
            r#"{{"level":"error","msg":"{msg}","object":"o","objectType":"*local.Object"}}"#
        );
        full[..full.len() - 20].to_string().into_bytes()
    };
    let h = vec![
        cut("Got fatal error on delete: --max-delete threshold reached"),
        cut("not deleting files as there were IO errors"),
    ];
    let c = events::count_lines(&splice(log, &h)[..]);
    assert!(!c.max_delete_reached && !c.io_errors_skipped_deletes);
    assert_eq!(summary(&c), summary(&events::count_lines(log)));
}

/// Random bytes: no panic, and memory stays bounded.
#[test]
fn random_bytes_never_panic() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut noise = Vec::with_capacity(4 << 20);
    for _ in 0..(4 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly printable with some braces and newlines, so lines are of every length.
        noise.push(match x % 16 {
            0 => b'\n',
            1 => b'{',
            2 => b'"',
            3 => (x >> 8) as u8,
            _ => b'a' + (x % 26) as u8,
        });
    }
    let c = events::count_lines(&noise[..]);
    assert_bounded(&c, "noise");
    assert_eq!((c.copied, c.deleted), (0, 0));
    let c = counts_as_streamed(&noise);
    assert_bounded(&c, "noise as streamed");
}
