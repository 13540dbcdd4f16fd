//! Reading labelled text for classification from CSV, TSV or JSON Lines.
//!
//! All formats are read as UTF-8 (a leading byte-order mark is dropped, CRLF
//! line ends are fine). CSV and TSV have a header row and may quote fields
//! (RFC 4180 style, so a quoted field may span lines); TSV uses the same
//! quoting rules as CSV with a tab as the delimiter. Labels are trimmed
//! strings; in JSON Lines a number or bool label is turned into its JSON text
//! (`1`, `true`). Text is kept as written, and may be empty.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

use crate::error::{DataError, Result};

/// A file format of labelled text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// Tab-separated values with a header row.
    Tsv,
    /// JSON Lines: one JSON object per line.
    Jsonl,
}

impl Format {
    /// Guesses the format from the file extension (case-insensitive):
    /// `.csv` → CSV, `.tsv`/`.txt` → TSV, `.jsonl`/`.json` → JSON Lines.
    pub fn from_path(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" | "txt" => Ok(Format::Tsv),
            "jsonl" | "json" => Ok(Format::Jsonl),
            _ => Err(DataError::UnknownFormat {
                path: path.to_path_buf(),
                ext: if ext.is_empty() { "(none)".into() } else { format!(".{ext}") },
            }),
        }
    }

    /// The lower-case name (`csv`, `tsv`, `jsonl`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Jsonl => "jsonl",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = DataError;

    /// Parses `csv`, `tsv` or `jsonl` (also `json`), case-insensitively.
    fn from_str(s: &str) -> Result<Format> {
        match s.trim().to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            "jsonl" | "json" => Ok(Format::Jsonl),
            _ => Err(DataError::BadFormatName(s.to_string())),
        }
    }
}

/// One text with its label (if the file has a label column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text, as written in the file.
    pub text: String,
    /// The trimmed label, `None` when no label column was asked for.
    pub label: Option<String>,
    /// 1-based line of the file where this example starts (0: not from a file).
    pub line: usize,
}

impl Example {
    /// An example not read from a file (`line` 0).
    pub fn new(text: impl Into<String>, label: Option<String>) -> Self {
        Example {
            text: text.into(),
            label,
            line: 0,
        }
    }
}

/// Reads the examples of `path`.
///
/// `text_col` names the text column (JSON key); `label_col`, when given, names
/// the label column, and then every row must have a non-empty label. `format`
/// overrides the guess from the extension. Blank lines are skipped.
pub fn read_examples(
    path: &Path,
    text_col: &str,
    label_col: Option<&str>,
    format: Option<Format>,
) -> Result<Vec<Example>> {
    let format = match format {
        Some(f) => f,
        None => Format::from_path(path)?,
    };
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = decode_utf8(path, &bytes)?;
    if text.trim().is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let examples = match format {
        Format::Csv => read_delimited(path, text, b',', text_col, label_col)?,
        Format::Tsv => read_delimited(path, text, b'\t', text_col, label_col)?,
        Format::Jsonl => read_jsonl(path, text, text_col, label_col)?,
    };
    if examples.is_empty() {
        return Err(DataError::NoRows {
            path: path.to_path_buf(),
        });
    }
    Ok(examples)
}

/// Checks that `bytes` are UTF-8 and drops a leading byte-order mark; reports
/// the line and byte column of the first bad byte.
fn decode_utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        DataError::NotUtf8 {
            path: path.to_path_buf(),
            line,
            column: good.len() - line_start + 1,
        }
    })
}

/// Finds `name` among `columns` (compared after trimming); errors if absent
/// or present twice.
fn find_column(path: &Path, line: usize, columns: &[String], name: &str) -> Result<usize> {
    let want = name.trim();
    let mut hits = columns.iter().enumerate().filter(|(_, c)| c.as_str() == want);
    match (hits.next(), hits.next()) {
        (Some((i, _)), None) => Ok(i),
        (Some(_), Some(_)) => Err(DataError::DuplicateColumn {
            path: path.to_path_buf(),
            line,
            column: name.to_string(),
        }),
        (None, _) => Err(DataError::MissingColumn {
            path: path.to_path_buf(),
            line,
            column: name.to_string(),
            available: columns.to_vec(),
        }),
    }
}

/// Turns byte offsets into 1-based line numbers, scanning forward only.
///
/// The csv crate's own line count is off by one after CRLF line ends, and its
/// record offset may point at the line end before the record, so the line is
/// that of the first byte at or after the offset that is not `\r` or `\n`.
struct LineCounter<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        LineCounter { text: text.as_bytes(), pos: 0, line: 1 }
    }

    /// The line of the record starting at byte `offset` (offsets must not
    /// decrease between calls).
    fn line_at(&mut self, offset: u64) -> usize {
        let mut target = (offset as usize).min(self.text.len());
        while target < self.text.len() && matches!(self.text[target], b'\r' | b'\n') {
            target += 1;
        }
        if target > self.pos {
            self.line += self.text[self.pos..target].iter().filter(|&&b| b == b'\n').count();
            self.pos = target;
        }
        self.line
    }
}

/// A csv-crate error, with the line of its position (or `fallback_line`).
fn csv_error(path: &Path, lines: &mut LineCounter, fallback_line: usize, e: &csv::Error) -> DataError {
    let line = e.position().map_or(fallback_line, |p| lines.line_at(p.byte()));
    DataError::Csv {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    }
}

/// Reads CSV (`delim` = `,`) or TSV (`delim` = tab) with a header row.
fn read_delimited(
    path: &Path,
    text: &str,
    delim: u8,
    text_col: &str,
    label_col: Option<&str>,
) -> Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delim)
        .has_headers(true)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut lines = LineCounter::new(text);
    let header = reader.headers().map_err(|e| csv_error(path, &mut lines, 1, &e))?;
    let header_line = header.position().map_or(1, |p| lines.line_at(p.byte()));
    let columns: Vec<String> = header.iter().map(|c| c.trim().to_string()).collect();
    let ti = find_column(path, header_line, &columns, text_col)?;
    let li = label_col
        .map(|c| find_column(path, header_line, &columns, c).map(|i| (c, i)))
        .transpose()?;

    let mut out = Vec::new();
    let mut last_line = header_line;
    for record in reader.records() {
        let record = record.map_err(|e| csv_error(path, &mut lines, last_line + 1, &e))?;
        let line = record.position().map_or(last_line + 1, |p| lines.line_at(p.byte()));
        last_line = line;
        if record.iter().all(|f| f.trim().is_empty()) {
            continue; // a line of blanks only
        }
        if record.len() != columns.len() {
            return Err(DataError::RaggedRow {
                path: path.to_path_buf(),
                line,
                expected: columns.len(),
                found: record.len(),
            });
        }
        let label = match li {
            None => None,
            Some((name, i)) => {
                let l = record.get(i).unwrap_or("").trim();
                if l.is_empty() {
                    return Err(DataError::MissingLabel {
                        path: path.to_path_buf(),
                        line,
                        column: name.to_string(),
                    });
                }
                Some(l.to_string())
            }
        };
        out.push(Example {
            text: record.get(ti).unwrap_or("").to_string(),
            label,
            line,
        });
    }
    Ok(out)
}

/// The JSON type of `v` for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads JSON Lines.
fn read_jsonl(
    path: &Path,
    text: &str,
    text_col: &str,
    label_col: Option<&str>,
) -> Result<Vec<Example>> {
    if text.trim_start().starts_with('[') {
        return Err(DataError::JsonArray {
            path: path.to_path_buf(),
        });
    }
    let p = || -> PathBuf { path.to_path_buf() };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(raw).map_err(|e| DataError::Json {
            path: p(),
            line,
            message: e.to_string(),
        })?;
        let Value::Object(obj) = value else {
            return Err(DataError::JsonNotObject {
                path: p(),
                line,
                found: json_kind(&value),
            });
        };
        let field = |name: &str| -> Result<&Value> {
            obj.get(name).ok_or_else(|| DataError::MissingColumn {
                path: p(),
                line,
                column: name.to_string(),
                available: obj.keys().cloned().collect(),
            })
        };
        let scalar = |name: &str, v: &Value| -> Result<String> {
            match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Err(DataError::FieldType {
                    path: p(),
                    line,
                    field: name.to_string(),
                    found: json_kind(other),
                }),
            }
        };
        let text = scalar(text_col, field(text_col)?)?;
        let label = match label_col {
            None => None,
            Some(name) => {
                let v = field(name)?;
                let missing = || DataError::MissingLabel {
                    path: p(),
                    line,
                    column: name.to_string(),
                };
                if v.is_null() {
                    return Err(missing());
                }
                let l = scalar(name, v)?.trim().to_string();
                if l.is_empty() {
                    return Err(missing());
                }
                Some(l)
            }
        };
        out.push(Example { text, label, line });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `bytes` to a fresh temp file named `name` (in a directory of
    /// its own, removed by [`cleanup`]) and returns its path.
    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lora-data-table-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn cleanup(path: &Path) {
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn err(name: &str, bytes: &[u8], label: Option<&str>) -> String {
        let path = tmp(name, bytes);
        let e = read_examples(&path, "text", label, None).unwrap_err().to_string();
        cleanup(&path);
        assert!(e.contains(name), "{e}");
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn formats_from_extension() {
        assert_eq!(Format::from_path(Path::new("a/b.CSV")).unwrap(), Format::Csv);
        assert_eq!(Format::from_path(Path::new("b.tsv")).unwrap(), Format::Tsv);
        assert_eq!(Format::from_path(Path::new("b.txt")).unwrap(), Format::Tsv);
        assert_eq!(Format::from_path(Path::new("b.json")).unwrap(), Format::Jsonl);
        assert_eq!(Format::from_path(Path::new("b.jsonl")).unwrap(), Format::Jsonl);
        let e = Format::from_path(Path::new("data/b.parquet")).unwrap_err().to_string();
        assert!(e.contains("data/b.parquet") && e.contains(".parquet"), "{e}");
        let e = Format::from_path(Path::new("noext")).unwrap_err().to_string();
        assert!(e.contains("noext") && e.contains("(none)"), "{e}");
        assert_eq!("JSONL".parse::<Format>().unwrap(), Format::Jsonl);
        assert!("xml".parse::<Format>().is_err());
    }

    #[test]
    fn csv_with_bom_crlf_quotes_and_newlines() {
        let data = b"\xEF\xBB\xBFtext,label\r\nhello,pos\r\n\"multi\r\nline, quoted\",  neg \r\n\"say \"\"hi\"\"\",1\r\n,pos\r\n";
        let path = tmp("ok.csv", data);
        let ex = read_examples(&path, "text", Some("label"), None).unwrap();
        assert_eq!(ex.len(), 4);
        assert_eq!(ex[0], Example { text: "hello".into(), label: Some("pos".into()), line: 2 });
        assert_eq!(ex[1].text, "multi\r\nline, quoted");
        assert_eq!(ex[1].label.as_deref(), Some("neg"));
        assert_eq!(ex[1].line, 3);
        assert_eq!(ex[2].text, "say \"hi\"");
        assert_eq!(ex[2].line, 5);
        assert_eq!(ex[3].text, "", "empty text is allowed");
        // no label column asked for
        let ex = read_examples(&path, "text", None, None).unwrap();
        assert!(ex.iter().all(|e| e.label.is_none()));
        cleanup(&path);
    }

    #[test]
    fn tsv_and_override() {
        let path = tmp("ok.tsv", b"id\ttext\tlabel\n1\ta, b\t0\n2\tc\t1\n\n");
        let ex = read_examples(&path, "text", Some("label"), None).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].text, "a, b");
        cleanup(&path);
        // Same bytes, forced to TSV despite a .csv-looking name.
        let path = tmp("really_tabs.dat", b"text\tlabel\nx\ty\n");
        let ex = read_examples(&path, "text", Some("label"), Some(Format::Tsv)).unwrap();
        assert_eq!(ex[0].label.as_deref(), Some("y"));
        cleanup(&path);
    }

    #[test]
    fn jsonl_scalars_and_errors() {
        let data = b"{\"text\": \"a\", \"label\": 1}\r\n\n{\"text\": \"b\", \"label\": true}\n{\"text\": 3, \"label\": \" x \"}\n";
        let path = tmp("ok.jsonl", data);
        let ex = read_examples(&path, "text", Some("label"), None).unwrap();
        let labels: Vec<_> = ex.iter().map(|e| e.label.clone().unwrap()).collect();
        assert_eq!(labels, ["1", "true", "x"]);
        assert_eq!(ex[1].line, 3);
        assert_eq!(ex[2].text, "3");
        cleanup(&path);

        let e = err("bad.jsonl", b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"a\", \n", Some("label"));
        assert!(e.contains("line 2") && e.contains("malformed JSON") && e.contains("column"), "{e}");
        let e = err("arr.jsonl", b"{\"text\": [1], \"label\": 1}\n", Some("label"));
        assert!(e.contains("line 1") && e.contains("'text' is an array"), "{e}");
        let e = err("null.jsonl", b"{\"text\": \"a\", \"label\": null}\n", Some("label"));
        assert!(e.contains("empty label in column 'label'"), "{e}");
        let e = err("keys.jsonl", b"{\"sentence\": \"a\", \"label\": 1}\n", Some("label"));
        assert!(e.contains("no column 'text'") && e.contains("label, sentence"), "{e}");
        let e = err("notobj.jsonl", b"[1, 2]\n", None);
        assert!(e.contains("JSON array"), "{e}");
        let e = err("notobj2.jsonl", b"{\"text\": \"a\"}\n\"str\"\n", None);
        assert!(e.contains("line 2") && e.contains("a string"), "{e}");
    }

    #[test]
    fn csv_errors_name_file_and_line() {
        let e = err("missing.csv", b"sentence,label\na,b\n", Some("label"));
        assert!(e.contains("no column 'text'; available columns: sentence, label"), "{e}");
        let e = err("ragged.csv", b"text,label\na,b\nc,d,e\n", Some("label"));
        assert!(e.contains("line 3") && e.contains("3 fields") && e.contains("has 2"), "{e}");
        let e = err("ragged_crlf.csv", b"text,label\r\na,b\r\n\r\nc,d,e\r\n", Some("label"));
        assert!(e.contains("line 4") && e.contains("3 fields"), "{e}");
        let e = err("nolabel.csv", b"text,label\na,b\nc,  \n", Some("label"));
        assert!(e.contains("line 3") && e.contains("empty label"), "{e}");
        let e = err("empty.csv", b"", None);
        assert!(e.contains("empty"), "{e}");
        let e = err("blank.csv", b" \r\n\n", None);
        assert!(e.contains("empty"), "{e}");
        let e = err("header_only.csv", b"text,label\r\n", None);
        assert!(e.contains("no data rows"), "{e}");
        let e = err("dup.csv", b"text,text\na,b\n", None);
        assert!(e.contains("more than once"), "{e}");
        let e = err("latin1.csv", b"text,label\nok,1\ncaf\xe9,2\n", None);
        assert!(e.contains("line 3, byte 4") && e.contains("UTF-8"), "{e}");
        let path = std::env::temp_dir().join("lora-data-definitely-missing.csv");
        let e = read_examples(&path, "text", None, None).unwrap_err().to_string();
        assert!(e.contains("lora-data-definitely-missing.csv: file not found"), "{e}");
    }
}
