//! One training run per directory: `OUT/.lock`, held with the operating system's file lock for
//! as long as a run lives, with the holder's pid inside.
//!
//! The lock is the kernel's (`flock`), so a run killed by SIGKILL or a power cut leaves no lock
//! behind: the file stays, with the dead run's pid, and the next run takes it over and says so.
//! A run that ends cleanly empties the file, so a pid found in a lock that could be taken is
//! always a run that did not end cleanly.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock's file name inside a run directory.
pub const LOCK_FILE: &str = ".lock";

/// A held run lock; dropping it releases the lock (and removes the directory again when this
/// lock created it and the run left nothing else in it).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    path: PathBuf,
    /// The directories that acquiring the lock created, deepest first.
    created: Vec<PathBuf>,
    /// The pid that the lock file held when it was taken over: a run that did not end cleanly.
    pub stale_pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another `snfc train` (pid {pid}): one run per directory; wait for it \
         to finish, stop it (kill {pid}), or train into another --out"
    )]
    Held { dir: String, pid: String },
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

impl RunLock {
    /// Take the lock of run directory `dir`, creating the directory (and its missing parents)
    /// if needed. Fails at once, naming the holder's pid, when another process holds it.
    pub fn acquire(dir: &Path) -> Result<RunLock, LockError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |error| LockError::Io { path, error }
        };
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(LOCK_FILE);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path);
        let mut file = match opened {
            Ok(f) => f,
            Err(e) => {
                remove_created(&created, &path);
                return Err(io(&path)(e));
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            // Someone else's lock: their file and directory are left as they are.
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    dir: dir.display().to_string(),
                    pid: holder(&mut file).unwrap_or_else(|| "unknown".to_string()),
                });
            }
            // A file system without locks (some network mounts): the pid alone decides.
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                if let Some(pid) = holder(&mut file).filter(|p| process_runs(p)) {
                    return Err(LockError::Held {
                        dir: dir.display().to_string(),
                        pid,
                    });
                }
            }
            Err(TryLockError::Error(e)) => {
                remove_created(&created, &path);
                return Err(io(&path)(e));
            }
        }
        let mut lock = RunLock {
            stale_pid: holder(&mut file).and_then(|p| p.parse().ok()),
            file,
            path: path.clone(),
            created,
        };
        let me = std::process::id();
        lock.file
            .set_len(0)
            .and_then(|()| lock.file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(lock.file, "{me}"))
            .and_then(|()| lock.file.sync_data())
            .map_err(io(&path))?;
        Ok(lock)
    }
}

/// The pid written in a lock file, if any.
fn holder(file: &mut File) -> Option<String> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    let pid = text.trim();
    (!pid.is_empty()).then(|| pid.to_string())
}

/// Remove the lock file `path` and the directories `created` (deepest first) when nothing else
/// is in them: a run that could not start leaves no directory behind.
fn remove_created(created: &[PathBuf], path: &Path) {
    let Some(deepest) = created.first() else {
        return;
    };
    let only_lock = std::fs::read_dir(deepest).is_ok_and(|entries| {
        entries
            .flatten()
            .all(|e| e.file_name().to_str() == Some(LOCK_FILE))
    });
    if only_lock {
        let _ = std::fs::remove_file(path);
        for dir in created {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// Whether a process with this pid runs (Linux: it has a `/proc` entry; elsewhere assumed).
fn process_runs(pid: &str) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid).exists()
    } else {
        true
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // An empty lock file marks a clean end; the kernel lock goes with the file handle.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
        remove_created(&self.created, &self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_with_the_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/run");
        let first = RunLock::acquire(&dir).unwrap();
        assert_eq!(first.stale_pid, None);
        let held = std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(held.trim(), std::process::id().to_string());
        let e = RunLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {}", std::process::id())) && e.contains("in use"),
            "{e}"
        );
        // The refused attempt left the holder's directory and lock alone.
        assert!(dir.join(LOCK_FILE).exists());
        drop(first);
        // Nothing but the lock was in the directories it created: all gone again.
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn a_lock_left_by_a_dead_run_is_taken_over_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "{}\n").unwrap();
        // What a SIGKILLed run leaves: its pid in an unlocked file.
        std::fs::write(dir.join(LOCK_FILE), "4194301\n").unwrap();
        let lock = RunLock::acquire(&dir).unwrap();
        assert_eq!(lock.stale_pid, Some(4194301));
        drop(lock);
        // A clean end empties the file and keeps a directory that holds a run.
        assert_eq!(std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), "");
        assert!(dir.join("metrics.jsonl").exists());
        assert_eq!(RunLock::acquire(&dir).unwrap().stale_pid, None);
    }
}
