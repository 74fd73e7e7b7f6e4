//! libvirt's RPC framing (`src/rpc/virnetprotocol.x`): each message is a 4-byte length (of the whole message,
//! itself included), a 24-byte header (program, version, procedure, type, serial, status) and a payload.

use std::io::Read;

use super::xdr::{Decoder, Encoder, XdrError};

/// Largest message libvirt sends or accepts (`VIR_NET_MESSAGE_MAX`, raised to 32 MiB in libvirt 7.x), header
/// included, length word excluded. Anything longer from the server is refused before it is read.
pub const MESSAGE_MAX: usize = 33_554_432;
/// Serialised header size (`VIR_NET_MESSAGE_HEADER_MAX`).
pub const HEADER_LEN: usize = 24;
/// Length word size (`VIR_NET_MESSAGE_LEN_MAX`).
pub const LEN_LEN: usize = 4;
/// Stream data per message: what libvirt itself sends (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`), which every
/// daemon version accepts.
pub const STREAM_CHUNK: usize = 262_144;

/// `virNetMessageType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    /// Client → server: a procedure call.
    Call,
    /// Server → client: its reply.
    Reply,
    /// An asynchronous event.
    Message,
    /// Stream data (or, by status, a stream's end or error).
    Stream,
    /// A call with passed file descriptors (never used here).
    CallWithFds,
    /// A reply with passed file descriptors (never used here).
    ReplyWithFds,
    /// A hole in a sparse stream (`virNetStreamHole` payload).
    StreamHole,
}

impl MsgType {
    fn code(self) -> u32 {
        match self {
            MsgType::Call => 0,
            MsgType::Reply => 1,
            MsgType::Message => 2,
            MsgType::Stream => 3,
            MsgType::CallWithFds => 4,
            MsgType::ReplyWithFds => 5,
            MsgType::StreamHole => 6,
        }
    }

    fn from_code(c: u32) -> Option<MsgType> {
        Some(match c {
            0 => MsgType::Call,
            1 => MsgType::Reply,
            2 => MsgType::Message,
            3 => MsgType::Stream,
            4 => MsgType::CallWithFds,
            5 => MsgType::ReplyWithFds,
            6 => MsgType::StreamHole,
            _ => return None,
        })
    }
}

/// `virNetMessageStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Success (calls always; replies without error; a stream's end).
    Ok,
    /// A `remote_error` follows (or, from the client on a stream, an abort).
    Error,
    /// More stream data follows.
    Continue,
}

impl Status {
    fn code(self) -> u32 {
        match self {
            Status::Ok => 0,
            Status::Error => 1,
            Status::Continue => 2,
        }
    }

    fn from_code(c: u32) -> Option<Status> {
        Some(match c {
            0 => Status::Ok,
            1 => Status::Error,
            2 => Status::Continue,
            _ => return None,
        })
    }
}

/// `virNetMessageHeader`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Program (`REMOTE_PROGRAM`, the keepalive program, …).
    pub prog: u32,
    /// Program version.
    pub vers: u32,
    /// Procedure.
    pub proc_: i32,
    /// Message type.
    pub kind: MsgType,
    /// Serial of the call this belongs to.
    pub serial: u32,
    /// Status.
    pub status: Status,
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Its header.
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Why a message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The transport failed (or closed).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The length word is out of range.
    #[error("message length {0} is outside 28..={max}", max = MESSAGE_MAX + LEN_LEN)]
    BadLength(u64),
    /// The header is malformed.
    #[error("malformed message header: {0}")]
    Header(String),
    /// An outgoing message too long for the protocol.
    #[error("outgoing message of {0} bytes exceeds libvirt's limit")]
    TooLong(usize),
}

impl From<XdrError> for PacketError {
    fn from(e: XdrError) -> Self {
        PacketError::Header(e.to_string())
    }
}

/// Encodes `header` and `payload` as one message, length word included.
pub fn encode(header: &Header, payload: &[u8]) -> Result<Vec<u8>, PacketError> {
    let total = LEN_LEN + HEADER_LEN + payload.len();
    if total - LEN_LEN > MESSAGE_MAX {
        return Err(PacketError::TooLong(total));
    }
    let mut e = Encoder::new();
    e.u32(u32::try_from(total).map_err(|_| PacketError::TooLong(total))?)
        .u32(header.prog)
        .u32(header.vers)
        .i32(header.proc_)
        .u32(header.kind.code())
        .u32(header.serial)
        .u32(header.status.code());
    let mut b = e.into_bytes();
    b.extend_from_slice(payload);
    Ok(b)
}

/// Decodes a header from its 24 bytes.
pub fn decode_header(b: &[u8]) -> Result<Header, PacketError> {
    let mut d = Decoder::new(b);
    let prog = d.u32("program")?;
    let vers = d.u32("version")?;
    let proc_ = d.i32("procedure")?;
    let kind = d.u32("type")?;
    let serial = d.u32("serial")?;
    let status = d.u32("status")?;
    d.finish()?;
    Ok(Header {
        prog,
        vers,
        proc_,
        kind: MsgType::from_code(kind)
            .ok_or_else(|| PacketError::Header(format!("unknown message type {kind}")))?,
        serial,
        status: Status::from_code(status)
            .ok_or_else(|| PacketError::Header(format!("unknown status {status}")))?,
    })
}

/// Reads one message. Its length is checked (at least a header, at most [`MESSAGE_MAX`]) before the payload
/// is allocated.
pub fn read(r: &mut dyn Read) -> Result<Packet, PacketError> {
    let mut len = [0u8; LEN_LEN];
    r.read_exact(&mut len)?;
    let total = u32::from_be_bytes(len);
    let body = usize::try_from(total)
        .ok()
        .and_then(|t| t.checked_sub(LEN_LEN))
        .filter(|&b| (HEADER_LEN..=MESSAGE_MAX).contains(&b))
        .ok_or(PacketError::BadLength(u64::from(total)))?;
    let mut hdr = [0u8; HEADER_LEN];
    r.read_exact(&mut hdr)?;
    let header = decode_header(&hdr)?;
    let mut payload = vec![0u8; body - HEADER_LEN];
    r.read_exact(&mut payload)?;
    Ok(Packet { header, payload })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn hdr() -> Header {
        Header {
            prog: 0x2000_8086,
            vers: 1,
            proc_: 66,
            kind: MsgType::Call,
            serial: 7,
            status: Status::Ok,
        }
    }

    #[test]
    fn frames_a_call_as_libvirt_does() {
        let b = encode(&hdr(), &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            b,
            [
                0, 0, 0, 32, 0x20, 0x00, 0x80, 0x86, 0, 0, 0, 1, 0, 0, 0, 66, 0, 0, 0, 0, 0, 0, 0,
                7, 0, 0, 0, 0, 1, 2, 3, 4
            ]
        );
        let p = read(&mut &b[..]).unwrap();
        assert_eq!(p.header, hdr());
        assert_eq!(p.payload, [1, 2, 3, 4]);
    }

    #[test]
    fn reads_a_hand_built_stream_hole() {
        // A server's hole message: type 6, status CONTINUE, payload hyper length + flags.
        let b = [
            0, 0, 0, 40, 0x20, 0x00, 0x80, 0x86, 0, 0, 0, 1, 0, 0, 0, 209, 0, 0, 0, 6, 0, 0, 0, 9,
            0, 0, 0, 2, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0,
        ];
        let p = read(&mut &b[..]).unwrap();
        assert_eq!(p.header.kind, MsgType::StreamHole);
        assert_eq!(p.header.status, Status::Continue);
        assert_eq!(p.header.proc_, 209);
        let mut d = Decoder::new(&p.payload);
        assert_eq!(d.i64("len").unwrap(), 0x10_0000);
        assert_eq!(d.u32("flags").unwrap(), 0);
    }

    #[test]
    fn refuses_bad_lengths_and_headers_without_allocating() {
        // Below a header, above the maximum, u32::MAX: refused from the length word alone.
        for total in [0u32, 27, (MESSAGE_MAX + LEN_LEN + 1) as u32, u32::MAX] {
            let b = total.to_be_bytes();
            assert!(
                matches!(read(&mut &b[..]), Err(PacketError::BadLength(_))),
                "{total}"
            );
        }
        // Unknown type and status.
        let mut b = encode(&hdr(), &[]).unwrap();
        b[19] = 9;
        assert!(matches!(read(&mut &b[..]), Err(PacketError::Header(_))));
        let mut b = encode(&hdr(), &[]).unwrap();
        b[27] = 3;
        assert!(matches!(read(&mut &b[..]), Err(PacketError::Header(_))));
        // A length promising more than arrives: an I/O error (EOF), never a panic.
        let mut b = encode(&hdr(), &[0; 8]).unwrap();
        b.truncate(30);
        assert!(matches!(read(&mut &b[..]), Err(PacketError::Io(_))));
        // Every prefix of a valid message fails cleanly.
        let b = encode(&hdr(), &[5; 12]).unwrap();
        for n in 0..b.len() {
            assert!(read(&mut &b[..n]).is_err());
        }
    }

    #[test]
    fn refuses_to_send_oversized_messages() {
        let big = vec![0u8; MESSAGE_MAX];
        assert!(matches!(encode(&hdr(), &big), Err(PacketError::TooLong(_))));
    }
}
