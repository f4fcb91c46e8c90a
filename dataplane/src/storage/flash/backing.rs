//! What a tier is stored on: a regular file (created and sized if missing)
//! or a block device used directly, and its split into per-core regions.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::libc;

use super::layout::{round_down, SECTOR};

/// A tier's file or device, checked and sized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub path: PathBuf,
    /// Bytes the tier uses, from offset 0; a multiple of 4 KiB.
    pub size: u64,
    pub block_device: bool,
}

/// One core's share of a backing: `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Recorded in the superblock, so regions cannot be swapped silently.
    pub index: u32,
    pub start: u64,
    pub len: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Checks `path` for use as a tier of `size` bytes (`None`: the whole device
/// or the existing file). A missing file is created and its space reserved;
/// a shorter file is grown; a longer one keeps its size and only its first
/// `size` bytes are used. Block devices are never resized: asking for more
/// than the device holds is an error. Sizes must be multiples of 4 KiB.
pub fn prepare_backing(path: &Path, size: Option<u64>) -> io::Result<Backing> {
    if let Some(s) = size {
        if s == 0 || !s.is_multiple_of(SECTOR) {
            return Err(invalid(format!("{}: size {s} is not a positive multiple of 4096", path.display())));
        }
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    if meta.as_ref().is_some_and(|m| m.file_type().is_block_device()) {
        let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path)?;
        let dev = device_size(&f)?;
        let sector = logical_sector(&f)?;
        if sector as u64 > SECTOR {
            return Err(invalid(format!(
                "{}: logical sector of {sector} bytes is larger than the 4096 bytes Pollen writes",
                path.display()
            )));
        }
        let size = match size {
            Some(s) if s > dev => {
                return Err(invalid(format!(
                    "{}: asked for {s} bytes, the device holds {dev}",
                    path.display()
                )))
            }
            Some(s) => s,
            None => round_down(dev, SECTOR),
        };
        if size == 0 {
            return Err(invalid(format!("{}: device is smaller than 4096 bytes", path.display())));
        }
        return Ok(Backing { path: path.to_path_buf(), size, block_device: true });
    }
    match &meta {
        Some(m) if !m.is_file() => {
            return Err(invalid(format!("{}: neither a regular file nor a block device", path.display())))
        }
        _ => {}
    }
    let existing = meta.as_ref().map_or(0, |m| m.len());
    let size = match size {
        Some(s) => s,
        None if existing == 0 => {
            return Err(invalid(format!("{}: a new or empty file needs a size (PATH:SIZE)", path.display())))
        }
        None => round_down(existing, SECTOR),
    };
    if size == 0 {
        return Err(invalid(format!("{}: file is smaller than 4096 bytes", path.display())));
    }
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    if existing < size {
        reserve(&f, existing, size)?;
    }
    Ok(Backing { path: path.to_path_buf(), size, block_device: false })
}

/// Grows `f` to `size` bytes with the new space allocated, so a full disk
/// shows now rather than as ENOSPC in the middle of a write; where the file
/// system cannot allocate ahead, the file is just extended.
fn reserve(f: &File, from: u64, size: u64) -> io::Result<()> {
    let r = nix::fcntl::fallocate(
        f,
        nix::fcntl::FallocateFlags::empty(),
        from as libc::off_t,
        (size - from) as libc::off_t,
    );
    match r {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => f.set_len(size),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn device_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    // The end of a block device is its size; unlike BLKGETSIZE64 this needs
    // no per-architecture ioctl number.
    let mut f = f;
    f.seek(SeekFrom::End(0))
}

fn logical_sector(f: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live local of that type.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::BLKSSZGET, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as u32)
}

impl Backing {
    /// `n` equal regions covering the backing, aligned to 1 MiB when they
    /// are large enough (64 MiB) and to 4 KiB otherwise.
    pub fn regions(&self, n: u32) -> io::Result<Vec<Region>> {
        if n == 0 {
            return Err(invalid("no regions asked for".into()));
        }
        let per = self.size / n as u64;
        let align = if per >= 64 << 20 { 1 << 20 } else { SECTOR };
        let per = round_down(per, align);
        if per == 0 {
            return Err(invalid(format!(
                "{}: {} bytes cannot be split {n} ways",
                self.path.display(),
                self.size
            )));
        }
        Ok((0..n).map(|i| Region { index: i, start: i as u64 * per, len: per }).collect())
    }
}

/// Parses a tier's command-line form `PATH[:SIZE]`, SIZE in bytes with an
/// optional K, M, G or T suffix (powers of 1024). A colon whose tail is not
/// a size belongs to the path.
pub fn parse_spec(spec: &str) -> Result<(PathBuf, Option<u64>), String> {
    if let Some((path, tail)) = spec.rsplit_once(':') {
        if let Some(size) = parse_size(tail) {
            if path.is_empty() {
                return Err(format!("{spec:?}: no path"));
            }
            return Ok((PathBuf::from(path), Some(size)));
        }
    }
    if spec.is_empty() {
        return Err("empty tier path".into());
    }
    Ok((PathBuf::from(spec), None))
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!(parse_spec("/a/b:4G"), Ok((PathBuf::from("/a/b"), Some(4 << 30))));
        assert_eq!(parse_spec("/a/b:4096"), Ok((PathBuf::from("/a/b"), Some(4096))));
        assert_eq!(parse_spec("/dev/nvme0n1"), Ok((PathBuf::from("/dev/nvme0n1"), None)));
        assert_eq!(parse_spec("/odd:name"), Ok((PathBuf::from("/odd:name"), None)));
        assert!(parse_spec(":4G").is_err());
        assert!(parse_spec("").is_err());
        assert_eq!(parse_spec("/x:99999999999T"), Ok((PathBuf::from("/x:99999999999T"), None)), "overflow");
    }

    #[test]
    fn files_are_created_grown_and_checked() {
        let dir = super::super::tests::TestDir::new("backing");
        let p = dir.path().join("tier");
        assert!(prepare_backing(&p, None).is_err(), "a new file needs a size");
        assert!(prepare_backing(&p, Some(5000)).is_err(), "not a sector multiple");
        let b = prepare_backing(&p, Some(1 << 20)).unwrap();
        assert_eq!((b.size, b.block_device), (1 << 20, false));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        // Reopen without a size: the file's; with a larger one: grown.
        assert_eq!(prepare_backing(&p, None).unwrap().size, 1 << 20);
        assert_eq!(prepare_backing(&p, Some(2 << 20)).unwrap().size, 2 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        // A smaller size uses a prefix and leaves the file alone.
        assert_eq!(prepare_backing(&p, Some(1 << 20)).unwrap().size, 1 << 20);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
        assert!(prepare_backing(dir.path(), Some(4096)).is_err(), "a directory");
        let r = b.regions(3).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| x.len % SECTOR == 0 && x.start % SECTOR == 0));
        assert!(r[2].start + r[2].len <= b.size);
    }
}
