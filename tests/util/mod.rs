//! Helpers for the CLI integration tests: run the built binary, run qemu-img (the format oracle), make images.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod aws;
pub mod libvirt;
pub mod ova;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The imgshift binary under test, from this worktree.
///
/// The target directory is shared between worktrees, so `target/debug/imgshift` (CARGO_BIN_EXE_imgshift) may
/// have been replaced by another worktree's build between this run's build and now (a full workspace run
/// reaches some test binaries minutes later). Cargo keeps each worktree's binary in `deps/imgshift-<hash>`,
/// and a dev binary's debug info names the directory it was built from; so the binary used is the uplifted one
/// when it names this worktree, else the newest `deps/imgshift-<hash>` that does and answers `--version`. A hard
/// link to it (same inode, no copy) under CARGO_TARGET_TMPDIR, named by PID, keeps it while the tests run;
/// links left by finished test processes are removed.
pub fn imgshift_bin() -> PathBuf {
    static LINK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LINK.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_imgshift"));
        let pick = if built_here(&built) {
            built.clone()
        } else {
            ours_in_deps(&built).unwrap_or_else(|| built.clone())
        };
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("imgshift-bin-")
                    && !Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let link = dir.join(format!("imgshift-bin-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        match std::fs::hard_link(&pick, &link) {
            Ok(()) => link,
            Err(_) => pick,
        }
    })
    .clone()
}

/// Whether the binary's debug info names this worktree (DWARF comp_dir, NUL-terminated).
fn built_here(bin: &Path) -> bool {
    let needle = concat!(env!("CARGO_MANIFEST_DIR"), "\0").as_bytes();
    std::fs::read(bin).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
}

/// The newest `deps/imgshift-<16 hex>` built from this worktree that is the CLI (not a unit-test harness).
fn ours_in_deps(built: &Path) -> Option<PathBuf> {
    let deps = built.parent()?.join("deps");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
        .ok()?
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("imgshift-")
                .is_some_and(|h| h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found.into_iter().rev().map(|(_, p)| p).find(|p| {
        built_here(p)
            && Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success() && o.stdout.starts_with(b"imgshift "))
    })
}

/// Result of a command run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    /// Panics with the output unless the exit code is 0.
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "command failed: stdout={} stderr={}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs imgshift with `args`.
pub fn imgshift(args: &[&str]) -> Run {
    Run::from(Command::new(imgshift_bin()).args(args).output().unwrap())
}

/// How long a measured run may go without finishing before the test fails as hung: a guard against a test
/// that never returns, not a speed claim (every measured run does well under a second of work).
pub const HANG_GUARD_SECS: u64 = 300;

/// Result of a measured run: exit code, stderr, and the work it did — peak RSS in KiB (GNU time) and what the
/// kernel counted it reading (rchar: bytes through read(2)/pread(2); syscr: read calls; from /proc/PID/io).
/// No wall time: tests bound the work done, never the time taken.
#[derive(Debug)]
pub struct Measured {
    pub code: i32,
    pub stderr: String,
    pub max_rss_kib: u64,
    pub rchar: u64,
    pub syscr: u64,
}

/// Runs imgshift under GNU time (Debian package `time`) for its peak RSS, inside a `sh` whose /proc/PID/io,
/// read after it has reaped the run, holds what the run read (the kernel adds a reaped child's I/O counts to
/// its parent's). The run is killed as hung after [`HANG_GUARD_SECS`].
pub fn imgshift_measured(args: &[&str]) -> Measured {
    let dir = tempfile::tempdir().unwrap();
    let tfile = dir.path().join("time");
    let iofile = dir.path().join("io");
    let script = r#"timeout -k 10 "$HANG" /usr/bin/time -f "%M" -o "$TFILE" "$@"; s=$?; cat /proc/$$/io >"$IOFILE"; exit $s"#;
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(imgshift_bin())
        .args(args)
        .env("HANG", HANG_GUARD_SECS.to_string())
        .env("TFILE", &tfile)
        .env("IOFILE", &iofile)
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code != 124 && code != 137,
        "imgshift {args:?} hung: killed after {HANG_GUARD_SECS} s (a hang guard, not a speed limit)"
    );
    let t = std::fs::read_to_string(&tfile).unwrap_or_else(|e| {
        panic!("no output from /usr/bin/time ({e}): install it with `apt-get install time`")
    });
    let max_rss_kib: u64 = t
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("bad time output {t:?}"));
    let io = std::fs::read_to_string(&iofile).unwrap();
    let field = |name: &str| -> u64 {
        io.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/io: {io:?}"))
    };
    Measured {
        code,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        max_rss_kib,
        rchar: field("rchar:"),
        syscr: field("syscr:"),
    }
}

/// Total size of the files (not folders) under `dir`, recursively: what a run over them could read once.
pub fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => bytes_under(&e.path()),
                    Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Runs qemu-img; panics with its output (and how to install it) on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let r = qemu_img_status(args);
    assert_eq!(
        r.code, 0,
        "qemu-img {args:?} failed: {}{}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Runs qemu-img and returns its result without judging it.
pub fn qemu_img_status(args: &[&str]) -> Run {
    Run::from(Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run qemu-img ({e}): install it with `apt-get install qemu-utils` (the tests' format oracle)")
    }))
}

/// Runs qemu-io (shipped with qemu-utils) on an image.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(img).output().unwrap_or_else(|e| {
        panic!("cannot run qemu-io ({e}): install it with `apt-get install qemu-utils`")
    });
    assert!(
        out.status.success(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh temporary folder.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgshift-cli")
        .tempdir()
        .unwrap()
}

/// Writes a sparse raw file of `size` bytes with pseudo-random data in `data` ranges and explicit zero bytes in
/// `zeros` ranges; holes elsewhere.
pub fn make_raw(path: &Path, size: u64, data: &[(u64, u64)], zeros: &[(u64, u64)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64 ^ size;
    for &(off, len) in data {
        let mut buf = vec![0u8; len as usize];
        for chunk in buf.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let b = seed.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        f.write_all_at(&buf, off).unwrap();
    }
    for &(off, len) in zeros {
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    }
}

/// Asserts qemu-img compare finds the same content.
pub fn assert_same(a: &Path, fa: &str, b: &Path, fb: &str) {
    let r = qemu_img_status(&[
        "compare",
        "-f",
        fa,
        "-F",
        fb,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(
        r.code, 0,
        "qemu-img compare {a:?} {b:?}: {}{}",
        r.stdout, r.stderr
    );
}

/// Asserts qemu-img check is clean.
pub fn assert_check_clean(img: &Path, fmt: &str) {
    let r = qemu_img_status(&["check", "-f", fmt, img.to_str().unwrap()]);
    assert_eq!(
        r.code, 0,
        "qemu-img check {img:?}: {}{}",
        r.stdout, r.stderr
    );
}

/// The only files in `dir` (names), sorted; used to prove no partial output is left.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `path` as &str.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Where `.ci/standins` keeps its state (pid files, logs, and `standins.env`, the stand-ins' addresses).
pub fn standin_dir() -> PathBuf {
    std::env::var_os("IMGSHIFT_STANDIN_DIR").map_or_else(
        || PathBuf::from("/var/tmp/imgshift-standins"),
        PathBuf::from,
    )
}

/// A stand-in's address: the environment variable `key` when set; else the `key=VALUE` line that
/// `.ci/standins start` wrote to `standins.env` in [`standin_dir`] (the stand-ins listen on ports chosen when
/// they start); else `default`, the port stand-ins started before that file existed used.
pub fn standin(key: &str, default: &str) -> String {
    if let Some(v) = std::env::var(key).ok().filter(|v| !v.is_empty()) {
        return v;
    }
    let file = standin_dir().join("standins.env");
    std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
        })
        .unwrap_or_else(|| default.to_string())
}

/// A plain HTTP/1.0 GET of `path` at `url` (`http://host:port`): the status line and headers, and as much of
/// the body as came within a few seconds; `None` when nothing answers. For health checks of the stand-ins.
pub fn http_get(url: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let hostport = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&hostport)
        .ok()?
        .next()?;
    let timeout = std::time::Duration::from_secs(10);
    let mut conn = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    conn.set_read_timeout(Some(timeout)).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.0\r\nHost: {hostport}\r\nx-ms-version: 2025-01-05\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = conn.take(1 << 20).read_to_end(&mut buf);
    (!buf.is_empty()).then(|| String::from_utf8_lossy(&buf).replace("\r\n", "\n"))
}
