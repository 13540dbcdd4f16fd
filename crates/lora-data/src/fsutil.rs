//! Atomic file writes: every file this crate writes goes through
//! [`write_atomic`], so a reader (or a crash) never sees half a file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temp files of concurrent writers within one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temporary path used while writing `path`: `<path>.tmp-<pid>-<n>`, in the
/// same directory so that the final rename stays on one file system.
fn temp_path(path: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    PathBuf::from(name)
}

/// Writes `bytes` to `path` atomically: creates missing parent directories,
/// writes a temporary file next to `path`, fsyncs it, renames it over `path`
/// and (on Unix) fsyncs the directory. On error the temporary file is removed
/// and `path` is left as it was.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        // Best effort: the original error is what matters.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    #[cfg(unix)]
    {
        let dir = parent.unwrap_or_else(|| Path::new("."));
        if let Ok(d) = fs::File::open(dir) {
            // Some file systems refuse fsync on a directory; the rename is done.
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_creates_dirs_and_replaces() {
        let dir = std::env::temp_dir().join(format!("lora-data-fsutil-{}", std::process::id()));
        let path = dir.join("a/b/out.txt");
        write_atomic(&path, b"one").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failure_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("lora-data-fsutil-f-{}", std::process::id()));
        fs::create_dir_all(dir.join("target_is_dir")).unwrap();
        fs::write(dir.join("target_is_dir/x"), b"x").unwrap();
        // Renaming a file over a non-empty directory fails.
        assert!(write_atomic(&dir.join("target_is_dir"), b"x").is_err());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["target_is_dir".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
