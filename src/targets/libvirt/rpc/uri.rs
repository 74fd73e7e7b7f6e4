//! What a connection URI means: the name the daemon is asked to open and how to reach it.
//!
//! - `qemu:///system`: the system daemon's socket: `virtqemud-sock` where the modular daemons run, else the
//!   monolithic `libvirt-sock`, under `/run/libvirt` (or `/var/run/libvirt`).
//! - `qemu:///session`: the per-user daemon's socket under `$XDG_RUNTIME_DIR/libvirt/` (or
//!   `~/.cache/libvirt/`); as root, the system daemon (as libvirt's own client does).
//! - `?socket=PATH`: that socket.
//! - `qemu+ssh://[user@]host[:port]/system`: `ssh` to the host running `virt-ssh-helper qemu:///system`, whose
//!   standard input and output carry the protocol (libvirt's own "native" ssh proxy). `?keyfile=` and
//!   `?command=` (the ssh program) are honoured.

use std::path::{Path, PathBuf};

use super::Error;

/// How to reach the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A UNIX socket on this host.
    Unix(PathBuf),
    /// An `ssh` command whose stdin/stdout carry the protocol.
    Ssh {
        /// The program (`ssh`).
        program: String,
        /// Its arguments.
        args: Vec<String>,
        /// The host, for messages.
        host: String,
    },
}

/// A parsed connection URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// What `REMOTE_PROC_CONNECT_OPEN` asks the daemon for (`qemu:///system`).
    pub name: String,
    /// How to reach it.
    pub transport: Transport,
    /// A per-user session daemon that is not running may be started (as libvirt's own client does:
    /// `virtqemud` or `libvirtd` with `--timeout=120`, which exits when idle).
    pub autostart: bool,
}

/// The environment a URI is resolved in (tests give their own).
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// Running as root.
    pub root: bool,
    /// `$XDG_RUNTIME_DIR`.
    pub runtime_dir: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
}

impl Env {
    /// This process's environment.
    pub fn current() -> Env {
        use std::os::unix::fs::MetadataExt;
        Env {
            root: std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0),
            runtime_dir: std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
            home: std::env::var_os("HOME").map(PathBuf::from),
        }
    }
}

fn bad(uri: &str, why: &str) -> Error {
    Error::Connect(format!("cannot use URI '{uri}': {why}"))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| {
            b.get(j)
                .and_then(|h| char::from(*h).to_digit(16))
                .and_then(|v| u8::try_from(v).ok())
        };
        match (c, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `uri` in `env`; `exists` says whether a socket path exists (the modular daemons' socket is preferred
/// when present).
pub fn parse(uri: &str, env: &Env, exists: &dyn Fn(&Path) -> bool) -> Result<Target, Error> {
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
        bad(
            uri,
            "expected DRIVER[+TRANSPORT]://[HOST]/PATH, e.g. qemu:///system",
        )
    })?;
    let (driver, transport) = match scheme.split_once('+') {
        Some((d, t)) => (d, Some(t)),
        None => (scheme, None),
    };
    if driver.is_empty() || !driver.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(bad(uri, "no driver name before '://'"));
    }
    if driver == "test" {
        return Err(bad(
            uri,
            "the test driver runs inside libvirt's C library, which imgshift does not use; connect to a daemon \
             (qemu:///system, qemu:///session)",
        ));
    }
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.find('/') {
        Some(i) => main.split_at(i),
        None => (main, ""),
    };
    let mut socket = None;
    let mut keyfile = None;
    let mut command = None;
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match k {
            "socket" => socket = Some(v),
            "keyfile" => keyfile = Some(v),
            "command" => command = Some(v),
            // libvirt's other client parameters (mode, no_verify, …) do not apply here.
            _ => {}
        }
    }
    let name = format!("{driver}://{path}");
    match transport {
        None | Some("unix") => {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "a host without a transport means TLS, which imgshift does not speak; use \
                     qemu+ssh://HOST/system",
                ));
            }
            let autostart = socket.is_none() && path == "/session" && !env.root;
            let path = match socket {
                Some(s) => PathBuf::from(s),
                None => local_socket(uri, driver, path, env, exists)?,
            };
            Ok(Target {
                name,
                transport: Transport::Unix(path),
                autostart,
            })
        }
        Some("ssh") => {
            if authority.is_empty() {
                return Err(bad(
                    uri,
                    "qemu+ssh:// needs a host: qemu+ssh://[USER@]HOST/system",
                ));
            }
            if socket.is_some() {
                return Err(bad(
                    uri,
                    "socket= is not supported over ssh (virt-ssh-helper finds the daemon's socket itself)",
                ));
            }
            let (user, hostport) = match authority.rsplit_once('@') {
                Some((u, h)) => (Some(percent_decode(u)), h),
                None => (None, authority),
            };
            let parse_port = |p: &str| {
                p.parse::<u16>()
                    .map_err(|_| bad(uri, &format!("port '{p}' is not a number")))
            };
            let (host, port) = if let Some(inner) = hostport.strip_prefix('[') {
                let (h, after) = inner
                    .split_once(']')
                    .ok_or_else(|| bad(uri, "unbalanced '[' in the host"))?;
                match after.strip_prefix(':') {
                    Some(p) => (h, Some(parse_port(p)?)),
                    None if after.is_empty() => (h, None),
                    None => return Err(bad(uri, "bad host name")),
                }
            } else {
                match hostport.split_once(':') {
                    Some((h, p)) => (h, Some(parse_port(p)?)),
                    None => (hostport, None),
                }
            };
            if host.is_empty() || host.starts_with('-') {
                return Err(bad(uri, "bad host name"));
            }
            let mut args = Vec::new();
            if let Some(p) = port {
                args.extend(["-p".to_string(), p.to_string()]);
            }
            if let Some(u) = user {
                args.extend(["-l".to_string(), u]);
            }
            if let Some(k) = keyfile {
                args.extend(["-i".to_string(), k]);
            }
            args.extend(["-T", "-e", "none", "--", host, "virt-ssh-helper"].map(String::from));
            args.push(name.clone());
            Ok(Target {
                name,
                transport: Transport::Ssh {
                    program: command.unwrap_or_else(|| "ssh".to_string()),
                    args,
                    host: host.to_string(),
                },
                autostart: false,
            })
        }
        Some(t) => Err(bad(
            uri,
            &format!("transport '{t}' is not supported (use the local socket or qemu+ssh://)"),
        )),
    }
}

fn local_socket(
    uri: &str,
    driver: &str,
    path: &str,
    env: &Env,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<PathBuf, Error> {
    let modular = format!("virt{driver}d-sock");
    let dirs: Vec<PathBuf> = match path {
        "/system" => vec!["/run/libvirt".into(), "/var/run/libvirt".into()],
        "/session" if env.root => vec!["/run/libvirt".into(), "/var/run/libvirt".into()],
        "/session" => match (&env.runtime_dir, &env.home) {
            (Some(r), _) => vec![r.join("libvirt")],
            (None, Some(h)) => vec![h.join(".cache/libvirt")],
            (None, None) => {
                return Err(bad(
                    uri,
                    "neither XDG_RUNTIME_DIR nor HOME is set, so the session daemon's socket is unknown; add \
                     ?socket=PATH",
                ));
            }
        },
        _ => {
            return Err(bad(
                uri,
                "the path must be /system or /session (or give the socket with ?socket=PATH)",
            ));
        }
    };
    for d in &dirs {
        for f in [modular.as_str(), "libvirt-sock"] {
            let p = d.join(f);
            if exists(&p) {
                return Ok(p);
            }
        }
    }
    // None exists: name the monolithic daemon's socket in the error that follows.
    Ok(dirs
        .first()
        .map(|d| d.join("libvirt-sock"))
        .unwrap_or_else(|| PathBuf::from("/run/libvirt/libvirt-sock")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn env() -> Env {
        Env {
            root: false,
            runtime_dir: Some("/run/user/1000".into()),
            home: Some("/home/u".into()),
        }
    }

    fn unix(t: &Target) -> &Path {
        match &t.transport {
            Transport::Unix(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn local_uris() {
        let none = |_: &Path| false;
        let t = parse("qemu:///system", &env(), &none).unwrap();
        assert_eq!(t.name, "qemu:///system");
        assert_eq!(unix(&t), Path::new("/run/libvirt/libvirt-sock"));
        let modular = |p: &Path| p == Path::new("/run/libvirt/virtqemud-sock");
        let t = parse("qemu:///system", &env(), &modular).unwrap();
        assert_eq!(unix(&t), Path::new("/run/libvirt/virtqemud-sock"));
        let t = parse("qemu:///session", &env(), &none).unwrap();
        assert_eq!(t.name, "qemu:///session");
        assert_eq!(unix(&t), Path::new("/run/user/1000/libvirt/libvirt-sock"));
        assert!(t.autostart, "a session daemon is started when none runs");
        assert!(!parse("qemu:///system", &env(), &none).unwrap().autostart);
        assert!(
            !parse("qemu:///session?socket=/s", &env(), &none)
                .unwrap()
                .autostart
        );
        let root = Env {
            root: true,
            ..env()
        };
        let t = parse("qemu:///session", &root, &none).unwrap();
        assert_eq!(unix(&t), Path::new("/run/libvirt/libvirt-sock"));
        let t = parse(
            "qemu:///system?socket=/var/tmp/x%20y/libvirt-sock",
            &env(),
            &none,
        )
        .unwrap();
        assert_eq!(t.name, "qemu:///system");
        assert_eq!(unix(&t), Path::new("/var/tmp/x y/libvirt-sock"));
        let t = parse("qemu+unix:///session?socket=/s", &env(), &none).unwrap();
        assert_eq!(
            (t.name.as_str(), unix(&t)),
            ("qemu:///session", Path::new("/s"))
        );
    }

    #[test]
    fn ssh_uris() {
        let none = |_: &Path| false;
        let t = parse(
            "qemu+ssh://admin@kvm1:2222/system?keyfile=/k",
            &env(),
            &none,
        )
        .unwrap();
        assert_eq!(t.name, "qemu:///system");
        assert_eq!(
            t.transport,
            Transport::Ssh {
                program: "ssh".into(),
                args: [
                    "-p",
                    "2222",
                    "-l",
                    "admin",
                    "-i",
                    "/k",
                    "-T",
                    "-e",
                    "none",
                    "--",
                    "kvm1",
                    "virt-ssh-helper",
                    "qemu:///system"
                ]
                .map(String::from)
                .to_vec(),
                host: "kvm1".into(),
            }
        );
        let t = parse(
            "qemu+ssh://kvm1/system?command=/bin/fake-ssh",
            &env(),
            &none,
        )
        .unwrap();
        let Transport::Ssh { program, args, .. } = t.transport else {
            panic!()
        };
        assert_eq!(program, "/bin/fake-ssh");
        assert_eq!(args.first().map(String::as_str), Some("-T"));
    }

    #[test]
    fn refusals_say_why() {
        let none = |_: &Path| false;
        for (u, why) in [
            ("qemu", "expected"),
            ("qemu://host/system", "TLS"),
            ("qemu+tls://host/system", "transport 'tls'"),
            ("qemu+ssh:///system", "needs a host"),
            ("qemu+ssh://-oProxyCommand=x/system", "bad host"),
            ("qemu:///embed", "/system or /session"),
            ("test:///default", "test driver"),
        ] {
            let e = parse(u, &env(), &none).unwrap_err().to_string();
            assert!(e.contains(why), "{u}: {e}");
        }
    }
}
