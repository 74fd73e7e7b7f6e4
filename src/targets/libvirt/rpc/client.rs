//! One connection to a libvirt daemon. Calls and streams are told apart by serial: a reader thread reads every
//! message the daemon sends and hands it to whoever registered that serial (a call waiting for its reply, or a
//! stream), so a stream's error reaches its sender while it is still sending, and nothing the daemon sends
//! blocks the connection. Writes are whole messages under a lock.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::packet::{self, Header, MsgType, Packet, Status};
use super::proto::{self, PROGRAM, RemoteError, VERSION, procs};
use super::uri::{Target, Transport};
use super::xdr::{Decoder, Encoder};
use super::{Error, Result};

/// Messages a stream's queue holds before the reader waits for the stream's owner to take them (a bound on
/// memory: at most this many messages of at most [`packet::MESSAGE_MAX`] bytes).
const STREAM_QUEUE: usize = 16;
/// How long closing the connection waits for the daemon's answer (a guard against a hung daemon; it answers
/// at once).
const CLOSE_WAIT: Duration = Duration::from_secs(10);
/// Most of `ssh`'s standard error kept for messages.
const STDERR_KEEP: usize = 4096;

struct Route {
    tx: SyncSender<Packet>,
    /// A call's route is removed after its reply; a stream's stays until the stream is done.
    stream: bool,
}

#[derive(Default)]
struct State {
    routes: HashMap<u32, Route>,
    /// Set (with the reason) once the reader thread ended: nothing more will arrive.
    closed: Option<String>,
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn closed_reason(&self) -> String {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.closed.clone())
            .unwrap_or_else(|| "the daemon closed the connection".into())
    }
}

/// What closes the transport when the client goes.
enum Closer {
    Socket(UnixStream),
    Child(Child),
}

/// A connection to a daemon.
pub struct Client {
    writer: Mutex<Option<Box<dyn Write + Send>>>,
    shared: Arc<Shared>,
    serial: AtomicU32,
    closer: Mutex<Option<Closer>>,
    /// `ssh`'s standard error (its last bytes), for messages.
    stderr: Option<Arc<Mutex<Vec<u8>>>>,
    stderr_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// What the transport is, for messages ("socket /run/libvirt/libvirt-sock", "ssh to host").
    pub(crate) what: String,
    opened: std::sync::atomic::AtomicBool,
}

fn reader_loop(mut r: Box<dyn Read + Send>, shared: Arc<Shared>) {
    let reason = loop {
        let p = match packet::read(&mut *r) {
            Ok(p) => p,
            Err(packet::PacketError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "the daemon closed the connection".to_string();
            }
            Err(e) => break e.to_string(),
        };
        // Events, keepalive probes (never asked for) and other programs are not ours.
        if p.header.prog != PROGRAM
            || !matches!(
                p.header.kind,
                MsgType::Reply | MsgType::ReplyWithFds | MsgType::Stream | MsgType::StreamHole
            )
        {
            continue;
        }
        let serial = p.header.serial;
        let (tx, stream) = {
            let Ok(mut st) = shared.state.lock() else {
                break "internal error: poisoned lock".into();
            };
            match st.routes.get(&serial) {
                Some(r) if r.stream => (r.tx.clone(), true),
                Some(_) => match st.routes.remove(&serial) {
                    Some(r) => (r.tx, false),
                    None => continue,
                },
                // Nobody waits for it (a late answer to an abandoned call): dropped.
                None => continue,
            }
        };
        if stream {
            // Blocks while the stream's queue is full: the daemon is then held back by the socket.
            if tx.send(p).is_err()
                && let Ok(mut st) = shared.state.lock()
            {
                st.routes.remove(&serial);
            }
        } else if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(p) {
            // The caller gave up waiting.
        }
    };
    if let Ok(mut st) = shared.state.lock() {
        st.closed = Some(reason);
        // Dropping the senders wakes everyone waiting.
        st.routes.clear();
    }
}

impl Client {
    /// Connects to `target`'s transport (no call made yet).
    fn connect(target: &Target) -> Result<Client> {
        match &target.transport {
            Transport::Unix(path) => {
                let what = format!("socket {}", path.display());
                let s = match UnixStream::connect(path) {
                    Ok(s) => s,
                    Err(e)
                        if target.autostart
                            && matches!(
                                e.kind(),
                                std::io::ErrorKind::NotFound
                                    | std::io::ErrorKind::ConnectionRefused
                            ) =>
                    {
                        start_session_daemon(path).map_err(|m| {
                            Error::Connect(format!("cannot connect to {what}: {e}; {m}"))
                        })?
                    }
                    Err(e) => return Err(Error::Connect(format!("cannot connect to {what}: {e}"))),
                };
                let clone = |s: &UnixStream| {
                    s.try_clone()
                        .map_err(|e| Error::Connect(format!("{what}: {e}")))
                };
                let (r, c) = (clone(&s)?, clone(&s)?);
                Ok(Client::start(
                    Box::new(r),
                    Box::new(s),
                    Closer::Socket(c),
                    None,
                    what,
                ))
            }
            Transport::Ssh {
                program,
                args,
                host,
            } => {
                let what = format!("ssh to {host} (`{program} {}`)", args.join(" "));
                let mut child = Command::new(program)
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| Error::Connect(format!("cannot run {what}: {e}")))?;
                let (Some(stdin), Some(stdout), Some(stderr)) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take())
                else {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Connect(format!("{what}: no pipes")));
                };
                let kept = Arc::new(Mutex::new(Vec::new()));
                let k = Arc::clone(&kept);
                let t = std::thread::Builder::new()
                    .name("imgshift-ssh-stderr".into())
                    .spawn(move || keep_tail(stderr, &k))
                    .ok();
                let c = Client::start(
                    Box::new(stdout),
                    Box::new(stdin),
                    Closer::Child(child),
                    Some(kept),
                    what,
                );
                if let Ok(mut slot) = c.stderr_thread.lock() {
                    *slot = t;
                }
                Ok(c)
            }
        }
    }

    fn start(
        r: Box<dyn Read + Send>,
        w: Box<dyn Write + Send>,
        closer: Closer,
        stderr: Option<Arc<Mutex<Vec<u8>>>>,
        what: String,
    ) -> Client {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
        });
        let s = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("imgshift-libvirt-rx".into())
            .spawn(move || reader_loop(r, s));
        if let Err(e) = spawned
            && let Ok(mut st) = shared.state.lock()
        {
            st.closed = Some(format!("cannot start the reader thread: {e}"));
        }
        Client {
            writer: Mutex::new(Some(w)),
            shared,
            serial: AtomicU32::new(1),
            closer: Mutex::new(Some(closer)),
            stderr,
            stderr_thread: Mutex::new(None),
            what,
            opened: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Connects and opens `target`: authentication (none or polkit) and `REMOTE_PROC_CONNECT_OPEN`.
    pub fn open(target: &Target) -> Result<Arc<Client>> {
        let c = Arc::new(Client::connect(target)?);
        c.handshake(&target.name).map_err(|e| c.connect_error(e))?;
        c.opened.store(true, Ordering::Relaxed);
        Ok(c)
    }

    fn handshake(&self, name: &str) -> Result<()> {
        let types = match self.call(procs::AUTH_LIST, &[]) {
            Ok(ret) => {
                let mut d = Decoder::new(&ret);
                let n = d.count(proto::auth::LIST_MAX, 4, "auth types")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(d.i32("auth type")?);
                }
                d.finish()?;
                v
            }
            // Daemons older than authentication answer "not supported": no authentication.
            Err(e) if e.code() == Some(proto::codes::NO_SUPPORT) => Vec::new(),
            Err(e) => return Err(e),
        };
        if !(types.is_empty() || types.contains(&proto::auth::NONE)) {
            if types.contains(&proto::auth::POLKIT) {
                let ret = self.call(procs::AUTH_POLKIT, &[])?;
                let mut d = Decoder::new(&ret);
                if d.i32("polkit complete")? == 0 {
                    return Err(Error::Connect(
                        "polkit authentication did not complete".into(),
                    ));
                }
            } else {
                return Err(Error::Connect(format!(
                    "the daemon asks for authentication imgshift does not speak (types {types:?}; {} is SASL): \
                     set auth_unix_rw = \"none\" or \"polkit\" in its configuration",
                    proto::auth::SASL
                )));
            }
        }
        let mut e = Encoder::new();
        e.opt_string(Some(name)).u32(0);
        self.call(procs::CONNECT_OPEN, &e.into_bytes())?;
        Ok(())
    }

    /// An error while connecting, with what was being connected to and (for ssh) what ssh said.
    fn connect_error(&self, e: Error) -> Error {
        if let Error::Remote(_) = e {
            return e;
        }
        // ssh failed or is failing: stop it, so that all it said is read.
        if let Ok(mut c) = self.closer.lock()
            && let Some(Closer::Child(child)) = c.as_mut()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(t) = self.stderr_thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
        let said = self
            .stderr
            .as_ref()
            .and_then(|s| {
                s.lock()
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).trim().replace('\n', "; "))
            })
            .filter(|s| !s.is_empty())
            .map(|s| format!(" (ssh said: {s})"))
            .unwrap_or_default();
        Error::Connect(format!("{}: {e}{said}", self.what))
    }

    /// A new serial.
    pub(crate) fn next_serial(&self) -> u32 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `serial` (a call when `stream` is false, or a stream) and returns where its messages arrive.
    pub(crate) fn register(&self, serial: u32, stream: bool) -> Result<Receiver<Packet>> {
        let (tx, rx) = sync_channel(if stream { STREAM_QUEUE } else { 1 });
        let mut st = self
            .shared
            .state
            .lock()
            .map_err(|_| Error::Protocol("internal error: poisoned lock".into()))?;
        if let Some(r) = &st.closed {
            return Err(Error::Closed(r.clone()));
        }
        st.routes.insert(serial, Route { tx, stream });
        Ok(rx)
    }

    /// Forgets `serial`: whatever arrives for it later is dropped.
    pub(crate) fn unregister(&self, serial: u32) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.routes.remove(&serial);
        }
    }

    /// Why the connection ended.
    pub(crate) fn closed(&self) -> Error {
        Error::Closed(self.shared.closed_reason())
    }

    /// Sends one message of `kind`/`status` for procedure `proc_` and `serial`.
    pub(crate) fn send(
        &self,
        proc_: i32,
        kind: MsgType,
        serial: u32,
        status: Status,
        payload: &[u8],
    ) -> Result<()> {
        let h = Header {
            prog: PROGRAM,
            vers: VERSION,
            proc_,
            kind,
            serial,
            status,
        };
        let b = packet::encode(&h, payload).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut w = self
            .writer
            .lock()
            .map_err(|_| Error::Protocol("internal error: poisoned lock".into()))?;
        let w = w
            .as_mut()
            .ok_or_else(|| Error::Closed("the connection was closed".into()))?;
        w.write_all(&b)
            .and_then(|()| w.flush())
            .map_err(|e| Error::Closed(format!("{} ({e})", self.shared.closed_reason())))
    }

    /// Calls `proc_` with encoded `args` and returns the reply's payload.
    pub fn call(&self, proc_: i32, args: &[u8]) -> Result<Vec<u8>> {
        self.call_inner(proc_, args, None)
    }

    fn call_inner(&self, proc_: i32, args: &[u8], wait: Option<Duration>) -> Result<Vec<u8>> {
        let serial = self.next_serial();
        let rx = self.register(serial, false)?;
        if let Err(e) = self.send(proc_, MsgType::Call, serial, Status::Ok, args) {
            self.unregister(serial);
            return Err(e);
        }
        let p = match wait {
            None => rx.recv().map_err(|_| self.closed())?,
            Some(d) => match rx.recv_timeout(d) {
                Ok(p) => p,
                Err(_) => {
                    self.unregister(serial);
                    return Err(Error::Closed(format!("no answer to call {proc_} in {d:?}")));
                }
            },
        };
        reply_payload(p)
    }
}

/// The payload of a reply, or the error it carries.
pub(crate) fn reply_payload(p: Packet) -> Result<Vec<u8>> {
    if p.header.kind != MsgType::Reply {
        return Err(Error::Protocol(format!(
            "expected a reply, got a {:?} message",
            p.header.kind
        )));
    }
    match p.header.status {
        Status::Ok => Ok(p.payload),
        _ => Err(remote_error(&p.payload)),
    }
}

/// The `remote_error` in `payload` (or why it could not be read).
pub(crate) fn remote_error(payload: &[u8]) -> Error {
    match RemoteError::decode(&mut Decoder::new(payload)) {
        Ok(e) => Error::Remote(e),
        Err(e) => Error::Protocol(format!("unreadable error from the daemon: {e}")),
    }
}

/// How long a session daemon this process started may take to open its socket (a hang guard: it takes
/// well under a second).
const SPAWN_WAIT: Duration = Duration::from_secs(30);

/// Starts the per-user daemon (`virtqemud`, else `libvirtd`, with `--timeout=120`: it exits after two idle
/// minutes) and connects to its socket `path` once it listens. The daemon runs in its own process group, so a
/// Ctrl-C of imgshift does not stop it, and outlives imgshift as libvirt's own client leaves it.
fn start_session_daemon(path: &std::path::Path) -> std::result::Result<UnixStream, String> {
    let found = ["virtqemud", "libvirtd"].iter().find_map(|name| {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    let Some(bin) = found else {
        return Err(
            "no session daemon runs, and neither virtqemud nor libvirtd was found to start one"
                .into(),
        );
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(&bin)
        .arg("--timeout=120")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let deadline = std::time::Instant::now() + SPAWN_WAIT;
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "{} --timeout=120 exited ({status}) without opening the socket",
                bin.display()
            ));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{} --timeout=120 did not open the socket within {SPAWN_WAIT:?}",
                bin.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn keep_tail(mut r: impl Read, kept: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = r.read(&mut buf) {
        let Some(got) = buf.get(..n).filter(|g| !g.is_empty()) else {
            break;
        };
        if let Ok(mut k) = kept.lock() {
            k.extend_from_slice(got);
            let excess = k.len().saturating_sub(STDERR_KEEP);
            k.drain(..excess);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.opened.load(Ordering::Relaxed) {
            let _ = self.call_inner(procs::CONNECT_CLOSE, &[], Some(CLOSE_WAIT));
        }
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut c) = self.closer.lock() {
            match c.take() {
                Some(Closer::Socket(s)) => {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                Some(Closer::Child(mut child)) => {
                    // ssh ends when its stdin closes; make sure of it.
                    let _ = child.kill();
                    let _ = child.wait();
                }
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::targets::libvirt::rpc::stream::{Chunk, Download, Upload};

    /// A client over one end of a socket pair; the test plays the daemon on the other end.
    fn pair() -> (Arc<Client>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let r = a.try_clone().unwrap();
        let c = a.try_clone().unwrap();
        let client = Client::start(
            Box::new(r),
            Box::new(a),
            Closer::Socket(c),
            None,
            "test".into(),
        );
        (Arc::new(client), b)
    }

    fn reply(daemon: &mut UnixStream, to: &Header, kind: MsgType, status: Status, payload: &[u8]) {
        let h = Header {
            kind,
            status,
            ..*to
        };
        daemon
            .write_all(&packet::encode(&h, payload).unwrap())
            .unwrap();
    }

    fn error_payload(code: i32, message: &str) -> Vec<u8> {
        let mut e = Encoder::new();
        e.i32(code)
            .i32(18)
            .opt_string(Some(message))
            .i32(2)
            .u32(0)
            .opt_string(None)
            .opt_string(None)
            .opt_string(None)
            .i32(0)
            .i32(0)
            .u32(0);
        e.into_bytes()
    }

    #[test]
    fn a_call_gets_its_reply_or_its_typed_error() {
        let (client, mut daemon) = pair();
        let t = std::thread::spawn(move || {
            let call = packet::read(&mut daemon).unwrap();
            assert_eq!(call.header.proc_, procs::STORAGE_VOL_LOOKUP_BY_NAME);
            assert_eq!(call.header.kind, MsgType::Call);
            // An event first (never asked for): ignored.
            let ev = Header {
                kind: MsgType::Message,
                serial: 0,
                ..call.header
            };
            daemon
                .write_all(&packet::encode(&ev, &[1, 2, 3]).unwrap())
                .unwrap();
            reply(
                &mut daemon,
                &call.header,
                MsgType::Reply,
                Status::Error,
                &error_payload(proto::codes::NO_STORAGE_VOL, "Storage volume not found"),
            );
            daemon
        });
        let e = client
            .call(procs::STORAGE_VOL_LOOKUP_BY_NAME, &[])
            .unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
        assert_eq!(e.to_string(), "Storage volume not found");
        drop(t.join().unwrap());
    }

    #[test]
    fn an_oversized_message_ends_the_connection_with_a_reason() {
        let (client, mut daemon) = pair();
        let t = std::thread::spawn(move || {
            let _ = packet::read(&mut daemon).unwrap();
            // A length word of 1 GiB: refused from the word alone, nothing allocated.
            daemon.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
            daemon
        });
        let e = client.call(procs::AUTH_LIST, &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Closed(m) if m.contains("message length 1073741824")),
            "{e:?}"
        );
        // Later calls fail at once with the same reason.
        let e = client.call(procs::AUTH_LIST, &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Closed(m) if m.contains("message length")),
            "{e:?}"
        );
        drop(t.join().unwrap());
    }

    #[test]
    fn an_upload_sends_data_and_holes_and_sees_the_daemons_error() {
        let (client, mut daemon) = pair();
        let t = std::thread::spawn(move || {
            let call = packet::read(&mut daemon).unwrap();
            assert_eq!(call.header.proc_, procs::STORAGE_VOL_UPLOAD);
            reply(&mut daemon, &call.header, MsgType::Reply, Status::Ok, &[]);
            let data = packet::read(&mut daemon).unwrap();
            assert_eq!(
                (data.header.kind, data.header.status, data.header.serial),
                (MsgType::Stream, Status::Continue, call.header.serial)
            );
            assert_eq!(data.payload, b"abc");
            let hole = packet::read(&mut daemon).unwrap();
            assert_eq!(hole.header.kind, MsgType::StreamHole);
            assert_eq!(hole.payload, [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0]);
            // The daemon fails the stream (disk full).
            reply(
                &mut daemon,
                &call.header,
                MsgType::Stream,
                Status::Error,
                &error_payload(38, "No space left on device"),
            );
            daemon
        });
        let mut up = Upload::start(&client, procs::STORAGE_VOL_UPLOAD, &[], true).unwrap();
        up.send(b"abc").unwrap();
        up.send_hole(1 << 20).unwrap();
        let daemon = t.join().unwrap();
        // The error reaches the sender: at its next send, or at the latest when it finishes.
        let e = loop {
            match up.send(b"more") {
                Ok(()) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => break e,
            }
        };
        assert_eq!(e.to_string(), "No space left on device");
        drop(up);
        drop(daemon);
    }

    #[test]
    fn a_download_reads_data_holes_and_the_empty_end_message_then_finishes() {
        let (client, mut daemon) = pair();
        let t = std::thread::spawn(move || {
            let call = packet::read(&mut daemon).unwrap();
            assert_eq!(call.header.proc_, procs::STORAGE_VOL_DOWNLOAD);
            let h = call.header;
            reply(&mut daemon, &h, MsgType::Stream, Status::Continue, b"xyz");
            // As libvirtd 9 sends them: data (at times before the call's reply), a hole, and the end as an
            // empty CONTINUE message.
            reply(&mut daemon, &h, MsgType::Reply, Status::Ok, &[]);
            let mut e = Encoder::new();
            e.i64(4096).u32(0);
            reply(
                &mut daemon,
                &h,
                MsgType::StreamHole,
                Status::Continue,
                &e.into_bytes(),
            );
            reply(&mut daemon, &h, MsgType::Stream, Status::Continue, &[]);
            // Our finish, confirmed by an empty OK.
            let fin = packet::read(&mut daemon).unwrap();
            assert_eq!(
                (fin.header.kind, fin.header.status),
                (MsgType::Stream, Status::Ok)
            );
            assert!(fin.payload.is_empty());
            reply(&mut daemon, &h, MsgType::Stream, Status::Ok, &[]);
            daemon
        });
        let mut d = Download::start(&client, procs::STORAGE_VOL_DOWNLOAD, &[], true).unwrap();
        assert_eq!(d.next_chunk().unwrap(), Chunk::Data(b"xyz".to_vec()));
        assert_eq!(d.next_chunk().unwrap(), Chunk::Hole(4096));
        assert_eq!(d.next_chunk().unwrap(), Chunk::End);
        d.finish().unwrap();
        drop(t.join().unwrap());
    }
}
