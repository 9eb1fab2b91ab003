//! What identifies one version of a file that is watched by polling (`auth.keys_file`, the
//! `tls:` certificate, key and CA): device, inode, size and mtime, read through symlinks. A
//! Kubernetes Secret update swaps the `..data` symlink (new inode behind the same path), an edit
//! in place changes size or mtime. Polling, not inotify: a symlink swap in a parent directory is
//! exactly what inotify on the file misses, and a stat per file per second costs nothing.

use std::path::Path;
use std::time::SystemTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

/// The file's stamp now; `None` when it cannot be read (missing, a dangling symlink).
pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.modified().ok(),
    })
}
