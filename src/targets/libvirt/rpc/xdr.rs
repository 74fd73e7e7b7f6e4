//! A small XDR codec (RFC 4506) for libvirt's RPC messages: big-endian 4-byte units, strings and variable
//! opaques as a length word then the bytes padded to 4, optional data as a 0/1 word then the value.
//!
//! Decoding reads bytes that come from the daemon and trusts none of it: every length is checked against the
//! bytes left in the message and against the limit the protocol gives (`VIR_NET_MESSAGE_STRING_MAX` for
//! strings, a caller-given bound for arrays) before anything is allocated.

/// Longest string libvirt sends (`VIR_NET_MESSAGE_STRING_MAX`).
pub const STRING_MAX: usize = 4_194_304;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XdrError {
    /// The message ended inside a value.
    #[error("message truncated: {what} needs {need} bytes, {left} left")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        left: usize,
    },
    /// A length or count beyond what the protocol allows.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLong {
        /// What was being read.
        what: &'static str,
        /// The length given.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A boolean or optional-data word other than 0 or 1.
    #[error("{what}: {value} is not 0 or 1")]
    BadBool {
        /// What was being read.
        what: &'static str,
        /// The word.
        value: u32,
    },
    /// A string that is not UTF-8.
    #[error("{0}: not UTF-8")]
    NotUtf8(&'static str),
    /// Bytes left over after the last value.
    #[error("{0} unexpected bytes after the message's last value")]
    Trailing(usize),
}

/// Writes XDR into a growing buffer.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

fn pad_len(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl Encoder {
    /// An empty encoder.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// An unsigned int.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// An int.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// An unsigned hyper.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A hyper.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Fixed-length opaque data (no length word), padded.
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self.buf.extend(std::iter::repeat_n(0, pad_len(v.len())));
        self
    }

    /// Variable-length opaque data or a string: length word, bytes, padding. Lengths beyond `u32` cannot be
    /// encoded; callers send far less (the caller's message is checked against the message limit anyway).
    pub fn opaque(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.fixed(v)
    }

    /// A string.
    pub fn string(&mut self, v: &str) -> &mut Self {
        self.opaque(v.as_bytes())
    }

    /// An optional string (`remote_string`).
    pub fn opt_string(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(s) => self.u32(1).string(s),
            None => self.u32(0),
        }
    }
}

/// Reads XDR from a message's bytes.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// A decoder over `buf`.
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder { buf }
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), XdrError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(XdrError::Trailing(self.buf.len()))
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        if n > self.buf.len() {
            return Err(XdrError::Truncated {
                what,
                need: n,
                left: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn word<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], XdrError> {
        let b = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    /// An unsigned int.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, XdrError> {
        Ok(u32::from_be_bytes(self.word(what)?))
    }

    /// An int.
    pub fn i32(&mut self, what: &'static str) -> Result<i32, XdrError> {
        Ok(i32::from_be_bytes(self.word(what)?))
    }

    /// An unsigned hyper.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, XdrError> {
        Ok(u64::from_be_bytes(self.word(what)?))
    }

    /// A hyper.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, XdrError> {
        Ok(i64::from_be_bytes(self.word(what)?))
    }

    /// A bool (0 or 1).
    pub fn bool(&mut self, what: &'static str) -> Result<bool, XdrError> {
        match self.u32(what)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(XdrError::BadBool { what, value }),
        }
    }

    /// Fixed-length opaque data of `n` bytes (and its padding).
    pub fn fixed(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        let v = self.take(n, what)?;
        self.take(pad_len(n), what)?;
        Ok(v)
    }

    /// Variable-length opaque data of at most `max` bytes.
    pub fn opaque(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], XdrError> {
        let len = self.u32(what)?;
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        if n > max {
            return Err(XdrError::TooLong {
                what,
                len: u64::from(len),
                max: max as u64,
            });
        }
        self.fixed(n, what)
    }

    /// A string (`remote_nonnull_string`).
    pub fn string(&mut self, what: &'static str) -> Result<String, XdrError> {
        let b = self.opaque(STRING_MAX, what)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| XdrError::NotUtf8(what))
    }

    /// An optional string (`remote_string`).
    pub fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, XdrError> {
        if self.bool(what)? {
            Ok(Some(self.string(what)?))
        } else {
            Ok(None)
        }
    }

    /// The element count of a variable-length array of at most `max` elements, each at least `min_size` bytes:
    /// checked against both before the caller allocates anything.
    pub fn count(
        &mut self,
        max: usize,
        min_size: usize,
        what: &'static str,
    ) -> Result<usize, XdrError> {
        let len = self.u32(what)?;
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        let fits = n
            .checked_mul(min_size.max(1))
            .is_some_and(|bytes| bytes <= self.buf.len());
        if n > max || !fits {
            return Err(XdrError::TooLong {
                what,
                len: u64::from(len),
                max: max.min(self.buf.len() / min_size.max(1)) as u64,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn encodes_words_strings_and_options() {
        let mut e = Encoder::new();
        e.u32(1)
            .i32(-2)
            .u64(0x0102_0304_0506_0708)
            .string("abcde")
            .opt_string(None)
            .opt_string(Some("xy"))
            .fixed(&[9; 16]);
        let b = e.into_bytes();
        let mut want = vec![0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe, 1, 2, 3, 4, 5, 6, 7, 8];
        want.extend_from_slice(&[0, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 0]);
        want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2, b'x', b'y', 0, 0]);
        want.extend_from_slice(&[9; 16]);
        assert_eq!(b, want);

        let mut d = Decoder::new(&b);
        assert_eq!(d.u32("a").unwrap(), 1);
        assert_eq!(d.i32("b").unwrap(), -2);
        assert_eq!(d.u64("c").unwrap(), 0x0102_0304_0506_0708);
        assert_eq!(d.string("d").unwrap(), "abcde");
        assert_eq!(d.opt_string("e").unwrap(), None);
        assert_eq!(d.opt_string("f").unwrap().as_deref(), Some("xy"));
        assert_eq!(d.fixed(16, "g").unwrap(), &[9; 16]);
        d.finish().unwrap();
    }

    #[test]
    fn rejects_lengths_past_the_message_or_the_limit() {
        // A string claiming 100 bytes with 4 present.
        let b = [0, 0, 0, 100, b'a', b'b', b'c', b'd'];
        assert!(matches!(
            Decoder::new(&b).string("s"),
            Err(XdrError::Truncated { need: 100, .. })
        ));
        // A string longer than STRING_MAX is refused before anything is read.
        let b = [0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            Decoder::new(&b).string("s"),
            Err(XdrError::TooLong { .. })
        ));
        // An array count whose elements cannot fit in what is left.
        let b = [0, 0x10, 0, 0, 0, 0, 0, 0];
        assert!(Decoder::new(&b).count(usize::MAX, 4, "n").is_err());
        assert!(Decoder::new(&[0, 0, 0, 5]).count(4, 0, "n").is_err());
        assert_eq!(
            Decoder::new(&[0, 0, 0, 1, 0, 0, 0, 0])
                .count(4, 4, "n")
                .unwrap(),
            1
        );
        // Booleans other than 0/1, truncated words, missing padding, trailing bytes.
        assert!(Decoder::new(&[0, 0, 0, 2]).bool("b").is_err());
        assert!(Decoder::new(&[0, 0, 0]).u32("w").is_err());
        assert!(Decoder::new(&[0, 0, 0, 1, b'a']).string("s").is_err());
        assert!(
            Decoder::new(&[0, 0, 0, 2, 0xff, 0xfe, 0, 0])
                .string("s")
                .is_err()
        );
        let mut d = Decoder::new(&[0, 0, 0, 0, 1]);
        d.u32("w").unwrap();
        assert_eq!(d.finish(), Err(XdrError::Trailing(1)));
    }

    #[test]
    fn never_panics_on_any_short_input() {
        // Every prefix of a valid message decodes to an error or a value, never a panic.
        let mut e = Encoder::new();
        e.string("hello").opt_string(Some("x")).u64(7);
        let b = e.into_bytes();
        for n in 0..b.len() {
            let mut d = Decoder::new(&b[..n]);
            let _ = d
                .string("s")
                .and_then(|_| d.opt_string("o"))
                .and_then(|_| d.u64("h"));
        }
    }
}
