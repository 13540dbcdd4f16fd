//! JSON written byte for byte the way PEFT writes `adapter_config.json`:
//! `json.dumps(d, indent=2, sort_keys=True)` — two-space indent, `", "`-free
//! item separators (`","` + newline), `": "` after keys, keys sorted at every
//! level, non-ASCII escaped as `\uXXXX` (`ensure_ascii=True`), floats in
//! Python's `repr` (`0.1`, `16.0`, `1e-05`), and no trailing newline.

use serde_json::ser::{Formatter, PrettyFormatter};
use serde_json::{Map, Value};
use std::io;

/// Serialize `value` like Python's `json.dumps(value, indent=2, sort_keys=True)`.
pub fn to_python_json(value: &Value) -> String {
    let sorted = sort_keys(value);
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter::new());
    // Writing a `Value` into a Vec cannot fail: there is no I/O and every key is a string.
    if serde::Serialize::serialize(&sorted, &mut ser).is_err() {
        return String::new();
    }
    // Only ASCII is written (ensure_ascii), so this is valid UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// A copy with object keys in sorted order at every level (Python sorts by
/// code point; Rust's `str` order on UTF-8 is the same order). Sorting here
/// rather than relying on `serde_json::Map` keeps the output sorted even when
/// another crate in the build enables serde_json's `preserve_order`.
fn sort_keys(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let mut out = Map::new();
            for (k, v) in entries {
                out.insert(k.clone(), sort_keys(v));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(sort_keys).collect()),
        other => other.clone(),
    }
}

/// Python's `repr(float)`: shortest round-trip digits; positional notation
/// when the decimal exponent is in [-4, 16), with `.0` added to integral
/// values; otherwise `d.ddde+XX` with at least two exponent digits.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    // Rust's `{:e}` gives the shortest round-trip digits: "1.5e16", "1e-5", "0e0".
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            if n <= exp + 1 {
                format!("{sign}{digits}{}.0", "0".repeat((exp + 1 - n) as usize))
            } else {
                let (int, frac) = digits.split_at((exp + 1) as usize);
                format!("{sign}{int}.{frac}")
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let mant = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

struct PyFormatter {
    inner: PrettyFormatter<'static>,
}

impl PyFormatter {
    fn new() -> Self {
        Self {
            inner: PrettyFormatter::with_indent(b"  "),
        }
    }
}

impl Formatter for PyFormatter {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(py_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(py_float_repr(value as f64).as_bytes())
    }

    /// `ensure_ascii=True`: everything outside printable ASCII (0x20..=0x7e)
    /// becomes `\uXXXX` (lowercase hex, UTF-16 surrogate pairs above U+FFFF).
    /// Control characters never reach here; serde_json escapes them itself,
    /// the same way Python does.
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if (' '..='~').contains(&c) {
                let mut buf = [0u8; 4];
                w.write_all(c.encode_utf8(&mut buf).as_bytes())?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{:04x}", u)?;
                }
            }
        }
        Ok(())
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.inner.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.inner.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        // Expected strings are Python 3's repr() of the same floats.
        for (x, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (0.05, "0.05"),
            (16.0, "16.0"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1234567890123456.0, "1234567890123456.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (22.627416997969522, "22.627416997969522"),
            (-2.5, "-2.5"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let v: Value = serde_json::from_str(
            r#"{"b": [1, 2.0, "x"], "a": {"z": [], "y": {}}, "é": "naïve 😀\u007f", "c": null}"#,
        )
        .unwrap();
        // json.dumps(v, indent=2, sort_keys=True)
        let want = "{\n  \"a\": {\n    \"y\": {},\n    \"z\": []\n  },\n  \"b\": [\n    1,\n    2.0,\n    \"x\"\n  ],\n  \"c\": null,\n  \"\\u00e9\": \"na\\u00efve \\ud83d\\ude00\\u007f\"\n}";
        assert_eq!(to_python_json(&v), want);
    }
}
