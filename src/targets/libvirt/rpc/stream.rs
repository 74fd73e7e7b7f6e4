//! Streams (`virStreamPtr` over RPC): after the call that opens it (`REMOTE_PROC_STORAGE_VOL_UPLOAD`,
//! `…_DOWNLOAD`) is answered, data travels as `VIR_NET_STREAM` messages (status CONTINUE) with the call's
//! serial, holes of a sparse stream as `VIR_NET_STREAM_HOLE` messages. The daemon marks the end of a download
//! with an empty CONTINUE message. The client ends a stream with status OK (finish, which the daemon confirms
//! with an empty OK message once everything is written) or ERROR (an abort); the daemon reports a failure as a
//! `remote_error` with status ERROR.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Duration;

use super::client::{Client, remote_error, reply_payload};
use super::packet::{MsgType, Packet, STREAM_CHUNK, Status};
use super::xdr::{Decoder, Encoder};
use super::{Error, Result};

/// Most stream messages kept while waiting for the reply that opens the stream.
const EARLY_MAX: usize = 64;
/// How long an abort waits for the daemon's confirmation (a guard against a hung daemon).
const ABORT_WAIT: Duration = Duration::from_secs(60);

struct Open {
    client: Arc<Client>,
    proc_: i32,
    serial: u32,
    rx: Receiver<Packet>,
    /// Stream messages that arrived before the reply to the opening call (the daemon may start sending a
    /// download before it answers).
    early: VecDeque<Packet>,
    /// Finished or aborted: nothing more to send.
    done: bool,
}

impl Open {
    /// Calls `proc_` with `args` and waits for the reply that opens the stream.
    fn start(client: &Arc<Client>, proc_: i32, args: &[u8]) -> Result<Open> {
        let serial = client.next_serial();
        let rx = client.register(serial, true)?;
        let mut s = Open {
            client: Arc::clone(client),
            proc_,
            serial,
            rx,
            early: VecDeque::new(),
            done: true,
        };
        s.client
            .send(proc_, MsgType::Call, serial, Status::Ok, args)?;
        loop {
            let p = s.rx.recv().map_err(|_| s.client.closed())?;
            if p.header.kind == MsgType::Reply {
                reply_payload(p)?;
                break;
            }
            if s.early.len() >= EARLY_MAX {
                return Err(Error::Protocol(format!(
                    "more than {EARLY_MAX} stream messages before the reply"
                )));
            }
            s.early.push_back(p);
        }
        s.done = false;
        Ok(s)
    }

    fn send(&self, kind: MsgType, status: Status, payload: &[u8]) -> Result<()> {
        self.client
            .send(self.proc_, kind, self.serial, status, payload)
    }

    fn recv(&mut self) -> Result<Packet> {
        match self.early.pop_front() {
            Some(p) => Ok(p),
            None => self.rx.recv().map_err(|_| self.client.closed()),
        }
    }

    /// Sends the finish message and waits for the daemon's confirmation (or its error).
    fn finish(&mut self) -> Result<()> {
        self.done = true;
        self.send(MsgType::Stream, Status::Ok, &[])?;
        loop {
            let p = self.recv()?;
            match (p.header.kind, p.header.status) {
                (MsgType::Stream, Status::Ok) => return Ok(()),
                (_, Status::Error) => return Err(remote_error(&p.payload)),
                // Data still in flight before the confirmation (a download finished early).
                _ => {}
            }
        }
    }

    /// Aborts: the daemon stops and confirms (its error, if any, is of no interest then).
    fn abort(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if self.send(MsgType::Stream, Status::Error, &[]).is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + ABORT_WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(p) if p.header.status != Status::Continue => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.abort();
        self.client.unregister(self.serial);
    }
}

/// An upload stream (`virStorageVolUpload`), sparse when opened with the sparse flag.
pub struct Upload {
    s: Open,
    sparse: bool,
}

impl Upload {
    /// Opens it: `proc_` called with `args`; `sparse` when the call asked for a sparse stream.
    pub(crate) fn start(
        client: &Arc<Client>,
        proc_: i32,
        args: &[u8],
        sparse: bool,
    ) -> Result<Upload> {
        Ok(Upload {
            s: Open::start(client, proc_, args)?,
            sparse,
        })
    }

    /// An error the daemon already sent (it stops writing at the first one).
    fn check(&mut self) -> Result<()> {
        loop {
            let next = match self.s.early.pop_front() {
                Some(p) => Ok(p),
                None => self.s.rx.try_recv(),
            };
            match next {
                Ok(p) if p.header.status == Status::Error => {
                    // The daemon ended the stream: nothing to abort.
                    self.s.done = true;
                    return Err(remote_error(&p.payload));
                }
                Ok(_) => {}
                Err(TryRecvError::Empty) => return Ok(()),
                Err(TryRecvError::Disconnected) => {
                    self.s.done = true;
                    return Err(self.s.client.closed());
                }
            }
        }
    }

    /// Sends `data`, in messages of at most [`STREAM_CHUNK`] bytes.
    pub fn send(&mut self, data: &[u8]) -> Result<()> {
        self.check()?;
        for piece in data.chunks(STREAM_CHUNK) {
            self.s.send(MsgType::Stream, Status::Continue, piece)?;
        }
        Ok(())
    }

    /// Sends a hole of `len` bytes (the volume reads zeros there; a file volume does not allocate it).
    pub fn send_hole(&mut self, len: u64) -> Result<()> {
        if !self.sparse {
            return Err(Error::Protocol(
                "a hole on a stream that is not sparse".into(),
            ));
        }
        self.check()?;
        let len =
            i64::try_from(len).map_err(|_| Error::Protocol(format!("hole of {len} bytes")))?;
        let mut e = Encoder::new();
        e.i64(len).u32(0);
        self.s
            .send(MsgType::StreamHole, Status::Continue, &e.into_bytes())
    }

    /// Ends the upload; the daemon confirms once everything is written (or returns the error).
    pub fn finish(mut self) -> Result<()> {
        self.check()?;
        self.s.finish()
    }

    /// Aborts the upload.
    pub fn abort(mut self) {
        self.s.abort();
    }
}

/// A piece of a download.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Data.
    Data(Vec<u8>),
    /// A hole of this many bytes (zeros).
    Hole(u64),
    /// The end.
    End,
}

/// A download stream (`virStorageVolDownload`).
pub struct Download {
    s: Open,
    sparse: bool,
    ended: bool,
}

impl Download {
    /// Opens it: `proc_` called with `args`; `sparse` when the call asked for a sparse stream.
    pub(crate) fn start(
        client: &Arc<Client>,
        proc_: i32,
        args: &[u8],
        sparse: bool,
    ) -> Result<Download> {
        Ok(Download {
            s: Open::start(client, proc_, args)?,
            sparse,
            ended: false,
        })
    }

    /// The next piece. Data messages are at most [`super::packet::MESSAGE_MAX`] bytes each.
    pub fn next_chunk(&mut self) -> Result<Chunk> {
        if self.ended {
            return Ok(Chunk::End);
        }
        let p = self.s.recv()?;
        match (p.header.kind, p.header.status) {
            (_, Status::Error) => {
                self.s.done = true;
                Err(remote_error(&p.payload))
            }
            // The end of the data is an empty data message (an OK message is the answer to our finish).
            (MsgType::Stream, Status::Continue) if p.payload.is_empty() => {
                self.ended = true;
                Ok(Chunk::End)
            }
            (MsgType::Stream, Status::Continue) => Ok(Chunk::Data(p.payload)),
            (MsgType::StreamHole, Status::Continue) if self.sparse => {
                let mut d = Decoder::new(&p.payload);
                let len = d.i64("hole length")?;
                d.u32("hole flags")?;
                d.finish()?;
                u64::try_from(len)
                    .map(Chunk::Hole)
                    .map_err(|_| Error::Protocol(format!("hole of {len} bytes")))
            }
            (k, st) => Err(Error::Protocol(format!(
                "unexpected {k:?}/{st:?} message in a download"
            ))),
        }
    }

    /// Ends a download that reached its end (the daemon confirms).
    pub fn finish(mut self) -> Result<()> {
        if !self.ended {
            return Err(Error::Protocol("download finished before its end".into()));
        }
        self.s.finish()
    }

    /// Aborts the download.
    pub fn abort(mut self) {
        self.s.abort();
    }
}
