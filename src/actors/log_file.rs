//! One process's log file under `[logs] dir`: `{process}.log`, one stored
//! line per line (the `/logs` format), rotated by size, reopened on demand.
//!
//! - **Rotation**: before a line would take the file past `max_bytes`, the
//!   file becomes `{process}.log.1`, `.1` becomes `.2` … up to `keep`
//!   files (the oldest beyond goes), and a new file starts. A single line
//!   longer than `max_bytes` gets a file of its own.
//! - **Reopen** (SIGUSR1): the file is closed and opened again by name
//!   (appending), for an outside tool that moved it away.
//! - **Failures**: a file that cannot be opened or written (directory
//!   removed, disk full) is said once in the broker's log (again only
//!   after it worked in between); the line still goes to the ring, the
//!   followers and the broker's log. The file is tried again at most once a
//!   second, and at every reopen; a missing directory is created again.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a file that failed is left alone before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Creates `dir` if missing and checks that a file can be created in it:
/// what the broker checks at start, so a `[logs] dir` that cannot work is
/// an error then, not a surprise at the first line.
pub fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".procbroker-write-test-{}", std::process::id()));
    File::create(&probe)?.write_all(b"procbroker\n")?;
    std::fs::remove_file(&probe)
}

/// A process's log file.
#[derive(Debug)]
pub struct LogFile {
    dir: PathBuf,
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<BufWriter<File>>,
    size: u64,
    /// When the last attempt failed.
    failed_at: Option<Instant>,
    /// The failure was said; said again only after it worked in between.
    error_said: bool,
}

impl LogFile {
    /// `dir/{id}.log`; opened at its first line.
    pub fn new(dir: &Path, id: &str, max_bytes: u64, keep: u32) -> Self {
        Self {
            dir: dir.to_owned(),
            path: dir.join(format!("{id}.log")),
            max_bytes: max_bytes.max(1),
            keep,
            file: None,
            size: 0,
            failed_at: None,
            error_said: false,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    fn open(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut file) = self.file.take() {
            file.flush()?;
        }
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        if self.keep == 0 {
            gone(std::fs::remove_file(&self.path))?;
        } else {
            for n in (1..self.keep).rev() {
                gone(std::fs::rename(self.numbered(n), self.numbered(n + 1)))?;
            }
            gone(std::fs::rename(&self.path, self.numbered(1)))?;
        }
        self.open()
    }

    fn failed(&mut self, e: &std::io::Error) {
        self.file = None;
        self.failed_at = Some(Instant::now());
        if !self.error_said {
            self.error_said = true;
            tracing::error!(file = %self.path.display(), error = %e,
                "cannot write the log file; the lines still go to the process's ring (/logs); \
                 the file is tried again once a second and at SIGUSR1");
        }
    }

    fn worked(&mut self) {
        self.failed_at = None;
        if self.error_said {
            self.error_said = false;
            tracing::info!(file = %self.path.display(), "writing the log file again");
        }
    }

    /// Appends `line` and a newline (buffered: see [`flush`](Self::flush)).
    pub fn write_line(&mut self, line: &str) {
        let len = line.len() as u64 + 1;
        if self.file.is_none() {
            if self.failed_at.is_some_and(|t| t.elapsed() < RETRY) {
                return;
            }
            if let Err(e) = self.open() {
                return self.failed(&e);
            }
        }
        if self.size > 0
            && self.size + len > self.max_bytes
            && let Err(e) = self.rotate()
        {
            return self.failed(&e);
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.write_all(b"\n"));
        match written {
            Ok(()) => {
                self.size += len;
                self.worked();
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) {
        if let Some(file) = self.file.as_mut()
            && let Err(e) = file.flush()
        {
            self.failed(&e);
        }
    }

    /// Closes the file and opens it again by name; false if that failed.
    pub fn reopen(&mut self) -> bool {
        self.flush();
        self.file = None;
        self.failed_at = None;
        match self.open() {
            Ok(()) => {
                self.worked();
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("procbroker-logfile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn rotates_before_a_line_would_pass_max_bytes_and_keeps_keep_files() {
        let dir = temp("rotate");
        // Lines of 10 bytes with the newline; 30 bytes hold three.
        let mut f = LogFile::new(&dir, "p.0", 30, 2);
        for i in 0..10 {
            f.write_line(&format!("line {i:04}"));
        }
        f.flush();
        assert_eq!(read(f.path()), "line 0009\n");
        assert_eq!(read(&f.numbered(1)), "line 0006\nline 0007\nline 0008\n");
        assert_eq!(read(&f.numbered(2)), "line 0003\nline 0004\nline 0005\n");
        assert!(!f.numbered(3).exists(), "keep = 2");
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let len = entry.metadata().expect("meta").len();
            assert!(len <= 30, "{entry:?} is {len} bytes");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keep_zero_starts_over_and_a_long_line_gets_a_file_of_its_own() {
        let dir = temp("keep0");
        let mut f = LogFile::new(&dir, "p.0", 20, 0);
        f.write_line("short");
        f.write_line(&"x".repeat(50));
        f.write_line("after");
        f.flush();
        assert_eq!(read(f.path()), "after\n");
        assert!(!f.numbered(1).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_what_it_holds() {
        let dir = temp("append");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("p.0.log"), "0123456789012345678\n").expect("old");
        let mut f = LogFile::new(&dir, "p.0", 30, 1);
        f.write_line("new line!");
        f.write_line("next");
        f.flush();
        assert_eq!(read(&f.numbered(1)), "0123456789012345678\nnew line!\n");
        assert_eq!(read(f.path()), "next\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reopen_follows_an_outside_rotation_and_a_broken_dir_is_retried() {
        let dir = temp("reopen");
        let mut f = LogFile::new(&dir, "p.0", 1 << 20, 1);
        f.write_line("before");
        f.flush();
        let moved = dir.join("moved.log");
        std::fs::rename(f.path(), &moved).expect("mv");
        f.write_line("still to the moved file");
        assert!(f.reopen());
        f.write_line("after");
        f.flush();
        assert_eq!(read(&moved), "before\nstill to the moved file\n");
        assert_eq!(read(f.path()), "after\n");

        // The directory replaced by a file: writing fails, quietly after
        // the first time, and works again once the directory is back.
        std::fs::remove_dir_all(&dir).expect("rm");
        std::fs::write(&dir, "not a directory").expect("file");
        assert!(!f.reopen());
        f.write_line("lost for the file");
        std::fs::remove_file(&dir).expect("rm file");
        assert!(f.reopen(), "the directory is made again");
        f.write_line("back");
        f.flush();
        assert_eq!(read(f.path()), "back\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dir_that_cannot_be_made_is_an_error_at_start() {
        let file = temp("notadir");
        std::fs::write(&file, "x").expect("file");
        assert!(prepare_dir(&file.join("logs")).is_err());
        let ok = temp("okdir");
        prepare_dir(&ok.join("a/b")).expect("made");
        assert_eq!(
            std::fs::read_dir(ok.join("a/b")).expect("dir").count(),
            0,
            "no probe left"
        );
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir_all(&ok);
    }
}
