//! The one way snfc writes a file that must survive a crash (checkpoints, arrays, images):
//! a temporary file with a unique name next to the target, synced, renamed over the target,
//! and the directory synced, so the target is always either the old file or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A failed atomic write: which step failed, on which file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot {step}: {source}")]
pub struct WriteError {
    pub path: String,
    pub step: String,
    #[source]
    pub source: std::io::Error,
}

fn err(path: &Path, step: impl Into<String>) -> impl FnOnce(std::io::Error) -> WriteError {
    let path = path.display().to_string();
    let step = step.into();
    move |source| WriteError { path, step, source }
}

/// A temporary name next to `path` that no other writer (another thread, process, or a
/// crashed earlier run) uses: `.NAME.tmp-PID-COUNTER`.
fn temporary_name(path: &Path) -> Result<PathBuf, WriteError> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let file_name = path.file_name().ok_or_else(|| WriteError {
        path: path.display().to_string(),
        step: "write it".into(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path has no file name",
        ),
    })?;
    Ok(path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

/// Fault injection for the crash tests: with `SNFC_ABORT_BEFORE_RENAME=NAME:K` the process
/// aborts on its K-th atomic write of a file called NAME, after the temporary file is written
/// and before the rename — where a crash in the middle of a checkpoint write lands. No effect
/// unless the variable is set.
fn abort_if_injected(path: &Path) {
    static WRITES: AtomicUsize = AtomicUsize::new(0);
    let Ok(spec) = std::env::var("SNFC_ABORT_BEFORE_RENAME") else {
        return;
    };
    let Some((name, k)) = spec.rsplit_once(':') else {
        return;
    };
    if path
        .file_name()
        .is_some_and(|f| f.to_string_lossy() == name)
    {
        let n = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
        if k.parse() == Ok(n) {
            eprintln!(
                "SNFC_ABORT_BEFORE_RENAME: aborting before renaming {}",
                path.display()
            );
            std::process::abort();
        }
    }
}

/// Write `bytes` to `path` atomically (see the module docs); creates missing parent
/// directories. On failure the temporary file is removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(err(&dir, "create the directory"))?;
    let tmp = temporary_name(path)?;
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(err(&tmp, "create it"))?;
        f.write_all(bytes).map_err(err(&tmp, "write it"))?;
        f.sync_all().map_err(err(&tmp, "sync it"))?;
        drop(f);
        abort_if_injected(path);
        fs::rename(&tmp, path).map_err(err(path, format!("rename {} to it", tmp.display())))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // The rename itself is durable once the directory entry is synced (POSIX; a no-op
    // elsewhere).
    #[cfg(unix)]
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(err(&dir, "sync the directory"))?;
    Ok(())
}

/// Writes batches of files atomically on a background thread, so that a training loop does not
/// wait for the disk (a checkpoint of tens of MB with fsync takes tens of ms): [`submit`]
/// waits only for the previous batch, and dropping the writer waits for the last one, so an
/// error path still leaves every submitted file complete on disk.
///
/// [`submit`]: BackgroundWriter::submit
#[derive(Default)]
pub struct BackgroundWriter {
    pending: Option<std::thread::JoinHandle<Result<(), WriteError>>>,
}

impl BackgroundWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait for the previous batch (returning its error, if any), then start writing `files`
    /// in order, each with [`write_atomically`].
    pub fn submit(&mut self, files: Vec<(PathBuf, Vec<u8>)>) -> Result<(), WriteError> {
        self.wait()?;
        let first = files.first().map(|(p, _)| p.clone()).unwrap_or_default();
        let handle = std::thread::Builder::new()
            .name("snfc-writer".into())
            .spawn(move || {
                files
                    .iter()
                    .try_for_each(|(path, bytes)| write_atomically(path, bytes))
            })
            .map_err(err(&first, "start the writer thread"))?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Wait until every submitted file is written.
    pub fn wait(&mut self) -> Result<(), WriteError> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(WriteError {
                    path: "(background writer)".into(),
                    step: "finish writing".into(),
                    source: std::io::Error::other("the writer thread panicked"),
                })
            }),
        }
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_target_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.bin");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_atomically(&p, b"old").unwrap();
        // A directory in the way of the rename: the old content of a file stays untouched.
        let blocked = dir.path().join("d");
        fs::create_dir_all(blocked.join("x")).unwrap();
        let e = write_atomically(&blocked, b"new").unwrap_err();
        assert!(e.to_string().contains("rename"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn temporary_names_are_unique() {
        let p = Path::new("/x/ckpt.safetensors");
        assert_ne!(temporary_name(p).unwrap(), temporary_name(p).unwrap());
    }

    #[test]
    fn background_writes_land_in_order_and_errors_surface() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        let mut w = BackgroundWriter::new();
        w.submit(vec![(a.clone(), b"1".to_vec()), (b.clone(), b"2".to_vec())])
            .unwrap();
        w.submit(vec![(a.clone(), b"3".to_vec())]).unwrap();
        w.wait().unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"3");
        assert_eq!(fs::read(&b).unwrap(), b"2");
        // A failed batch is reported by the next submit (or wait), naming the file.
        let blocked = dir.path().join("d");
        fs::create_dir_all(blocked.join("x")).unwrap();
        w.submit(vec![(blocked.clone(), b"x".to_vec())]).unwrap();
        let e = w.submit(vec![]).unwrap_err();
        assert!(e.to_string().contains("d: cannot rename"), "{e}");
        // Dropping waits: the file is complete once the writer is gone.
        let c = dir.path().join("c.bin");
        let mut w = BackgroundWriter::new();
        w.submit(vec![(c.clone(), vec![7u8; 1 << 20])]).unwrap();
        drop(w);
        assert_eq!(fs::read(&c).unwrap().len(), 1 << 20);
    }
}
