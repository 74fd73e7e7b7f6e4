//! `PageSink`: the fixed-VHD byte stream cut into Put Page requests for the disk's page blob.
//!
//! The blob is divided into 4 MiB windows (the Put Page maximum). The writer's data runs (zero ranges never
//! arrive: the engine and the VHD writer skip them) are gathered per window, adjacent runs merged, so that every
//! request lies inside one window: at most 4 MiB, 512-aligned (a short last run at the end of the source is
//! padded with zeros to a whole page), and never past the data part. A window is the unit of the resume journal:
//! journal slot `i` is window `i`, and the last slot is the footer, which is sent last, after every window.

use imgshift_converters::{Error, Sink};
use tokio::sync::mpsc;

use super::{FOOTER, MAX_PUT_PAGE, PAGE};
use crate::journal::Bitmap;

/// One Put Page request: `data.len()` is a multiple of 512 and at most 4 MiB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Blob offset (512-aligned).
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// What the sink hands to the uploader.
#[derive(Debug)]
pub enum Piece {
    /// The non-zero pages of one 4 MiB window (journal slot `slot`).
    Window {
        /// Window index = journal slot.
        slot: u64,
        /// The requests, in offset order, inside the window.
        pages: Vec<Page>,
    },
    /// The VHD footer at the end of the blob; sent after every window was acknowledged.
    Footer {
        /// Journal slot of the footer (the last one).
        slot: u64,
        /// The footer page.
        page: Page,
    },
}

/// Journal slots for a blob whose data part is `data_size` bytes: one per 4 MiB window, plus the footer.
pub fn slot_count(data_size: u64) -> u64 {
    data_size.div_ceil(MAX_PUT_PAGE) + 1
}

/// Where the pieces go: a channel to the uploader (or, in tests, a vector).
pub trait PieceOut: Send {
    /// Hands a piece over; fails when the uploader stopped.
    fn send(&mut self, p: Piece) -> imgshift_converters::Result<()>;
}

impl PieceOut for mpsc::Sender<Piece> {
    fn send(&mut self, p: Piece) -> imgshift_converters::Result<()> {
        self.blocking_send(p)
            .map_err(|_| Error::input("the upload stopped"))
    }
}

impl PieceOut for Vec<Piece> {
    fn send(&mut self, p: Piece) -> imgshift_converters::Result<()> {
        self.push(p);
        Ok(())
    }
}

/// A `Sink` that turns the fixed VHD into Put Page pieces.
pub struct PageSink<O: PieceOut> {
    out: O,
    /// Size of the data part: the footer's offset.
    data_size: u64,
    /// Slots acknowledged in an earlier run (not sent again).
    skip: Bitmap,
    /// The window being gathered.
    cur: Option<(u64, Vec<Page>)>,
    footer: Option<Vec<u8>>,
    /// Pieces handed over in this run.
    pub pieces_sent: u64,
}

impl<O: PieceOut> PageSink<O> {
    /// A sink for a blob of `data_size + 512` bytes; slots set in `skip` are not sent.
    pub fn new(out: O, data_size: u64, skip: Bitmap) -> Self {
        PageSink {
            out,
            data_size,
            skip,
            cur: None,
            footer: None,
            pieces_sent: 0,
        }
    }

    /// The output, once the sink is done (tests).
    #[cfg(test)]
    pub fn into_out(self) -> O {
        self.out
    }

    fn flush(&mut self) -> imgshift_converters::Result<()> {
        let Some((slot, mut pages)) = self.cur.take() else {
            return Ok(());
        };
        if self.skip.get(slot) || pages.is_empty() {
            return Ok(());
        }
        for p in &mut pages {
            // Only a run ending at the source's end can be short of a page; pad it with zeros.
            let len = p.data.len() as u64;
            let padded = len.next_multiple_of(PAGE);
            if p.offset
                .checked_add(padded)
                .is_none_or(|e| e > self.data_size)
            {
                return Err(Error::input(format!(
                    "internal error: page write at {} of {padded} bytes passes the disk's end {}",
                    p.offset, self.data_size
                )));
            }
            p.data.resize(padded as usize, 0);
        }
        self.pieces_sent += 1;
        self.out.send(Piece::Window { slot, pages })
    }

    fn add(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        let slot = offset / MAX_PUT_PAGE;
        if self.cur.as_ref().is_some_and(|c| c.0 != slot) {
            self.flush()?;
        }
        let (_, pages) = self.cur.get_or_insert_with(|| (slot, Vec::new()));
        if let Some(last) = pages.last_mut()
            && last.offset + last.data.len() as u64 == offset
        {
            last.data.extend_from_slice(data);
            return Ok(());
        }
        if !offset.is_multiple_of(PAGE) {
            return Err(Error::input(format!(
                "internal error: data at offset {offset} is not 512-aligned"
            )));
        }
        pages.push(Page {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

impl<O: PieceOut> Sink for PageSink<O> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        if offset == self.data_size && data.len() as u64 == FOOTER {
            self.footer = Some(data.to_vec());
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.data_size)
            .ok_or_else(|| {
                Error::input(format!(
                    "internal error: write at {offset} of {} bytes passes the disk's end {}",
                    data.len(),
                    self.data_size
                ))
            })?;
        // Cut at window boundaries.
        let mut at = offset;
        while at < end {
            let window_end = (at / MAX_PUT_PAGE + 1) * MAX_PUT_PAGE;
            let to = window_end.min(end);
            let from = (at - offset) as usize;
            let till = (to - offset) as usize;
            self.add(at, &data[from..till])?;
            at = to;
        }
        Ok(())
    }

    fn can_seek_back(&self) -> bool {
        false
    }

    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        self.flush()?;
        if len != self.data_size + FOOTER {
            return Err(Error::input(format!(
                "internal error: the VHD is {len} bytes, the blob {}",
                self.data_size + FOOTER
            )));
        }
        let footer = self
            .footer
            .take()
            .ok_or_else(|| Error::input("internal error: the VHD writer wrote no footer"))?;
        let slot = slot_count(self.data_size) - 1;
        if self.skip.get(slot) {
            return Ok(());
        }
        self.pieces_sent += 1;
        self.out.send(Piece::Footer {
            slot,
            page: Page {
                offset: self.data_size,
                data: footer,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgshift_converters::{ConvertOptions, NoProgress, engine};

    fn requests(pieces: &[Piece]) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        for p in pieces {
            match p {
                Piece::Window { pages, .. } => {
                    out.extend(pages.iter().map(|p| (p.offset, p.data.len() as u64, false)))
                }
                Piece::Footer { page, .. } => out.push((page.offset, page.data.len() as u64, true)),
            }
        }
        out
    }

    /// Every request ≤ 4 MiB, 512-aligned, inside one window, before the footer; the footer is last.
    fn check_shape(pieces: &[Piece], data_size: u64) {
        let r = requests(pieces);
        let (last, body) = r.split_last().unwrap();
        assert_eq!(*last, (data_size, 512, true), "footer last");
        let mut prev_end = 0;
        for &(off, len, footer) in body {
            assert!(!footer);
            assert!(len > 0 && len <= MAX_PUT_PAGE, "{len}");
            assert_eq!(off % 512, 0);
            assert_eq!(len % 512, 0);
            assert!(off + len <= data_size, "past the end");
            assert_eq!(
                off / MAX_PUT_PAGE,
                (off + len - 1) / MAX_PUT_PAGE,
                "crosses a window"
            );
            assert!(off >= prev_end, "out of order or overlapping");
            prev_end = off + len;
        }
    }

    fn run_engine(raw: Vec<u8>, skip: Option<Bitmap>) -> (Vec<Piece>, u64) {
        let storage = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        let src = imgshift_converters::open(
            storage,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap();
        let data_size = super::super::disk_data_size(src.virtual_size()).unwrap();
        let skip = skip.unwrap_or_else(|| Bitmap::new(slot_count(data_size)));
        let mut w = crate::targets::azure::vhd::AzureVhdWriter::new().unwrap();
        let mut sink = PageSink::new(Vec::new(), data_size, skip);
        engine::convert(
            src.as_ref(),
            &mut w,
            &mut sink,
            &ConvertOptions::default(),
            &NoProgress,
        )
        .unwrap();
        (sink.into_out(), data_size)
    }

    #[test]
    fn dense_disk_is_whole_windows() {
        let raw = vec![0xA5u8; 24 << 20];
        let (p, size) = run_engine(raw, None);
        assert_eq!(size, 24 << 20);
        check_shape(&p, size);
        let r = requests(&p);
        assert_eq!(r.len(), 7);
        assert!(r[..6].iter().all(|x| x.1 == MAX_PUT_PAGE));
    }

    #[test]
    fn zeros_are_not_sent_and_tail_is_padded() {
        // 21 MiB + 100 bytes: data at 0..8 KiB, 4 MiB - 4 KiB .. 4 MiB + 4 KiB (straddles a window), and the
        // last 100 bytes (a short run at the end of the source).
        let size = (21 << 20) + 100;
        let mut raw = vec![0u8; size];
        raw[..8192].fill(1);
        raw[(4 << 20) - 4096..(4 << 20) + 4096].fill(2);
        raw[size - 100..].fill(3);
        let (p, data_size) = run_engine(raw, None);
        assert_eq!(data_size, 22 << 20);
        check_shape(&p, data_size);
        let r = requests(&p);
        assert_eq!(
            r,
            vec![
                (0, 8192, false),
                ((4 << 20) - 4096, 4096, false),
                (4 << 20, 4096, false),
                (21 << 20, 512, false),
                (22 << 20, 512, true),
            ]
        );
    }

    #[test]
    fn small_disks_are_padded_to_20_mib() {
        let (p, data_size) = run_engine(vec![7u8; 3 << 20], None);
        assert_eq!(data_size, 20 << 20);
        check_shape(&p, data_size);
        let Piece::Footer { page, slot } = p.last().unwrap() else {
            panic!()
        };
        assert_eq!(*slot, 5);
        // The footer says 20 MiB, fixed disk.
        assert_eq!(&page.data[..8], b"conectix");
        assert_eq!(
            u64::from_be_bytes(page.data[48..56].try_into().unwrap()),
            20 << 20
        );
        assert_eq!(u32::from_be_bytes(page.data[60..64].try_into().unwrap()), 2);
    }

    #[test]
    fn acknowledged_slots_are_skipped() {
        let raw = vec![1u8; 24 << 20];
        let mut skip = Bitmap::new(slot_count(24 << 20));
        skip.set(0);
        skip.set(3);
        let (p, _) = run_engine(raw, Some(skip));
        let slots: Vec<u64> = p
            .iter()
            .map(|p| match p {
                Piece::Window { slot, .. } | Piece::Footer { slot, .. } => *slot,
            })
            .collect();
        assert_eq!(slots, vec![1, 2, 4, 5, 6]);
    }

    #[test]
    fn rejects_writes_past_the_end() {
        let mut s = PageSink::new(Vec::new(), 20 << 20, Bitmap::new(6));
        assert!(s.write_at((20 << 20) - 512, &[1u8; 1024]).is_err());
        assert!(s.write_at(100, &[1u8; 512]).is_err(), "unaligned");
    }

    proptest::proptest! {
        #[test]
        fn random_runs_keep_the_shape(runs in proptest::collection::vec((0u64..6000, 1u64..3000), 0..12)) {
            // Runs in 4 KiB units over a 23.4 MiB source.
            let size = (23 << 20) + 400 * 1024;
            let mut raw = vec![0u8; size];
            for (start, len) in runs {
                let a = ((start * 4096) as usize).min(size);
                let b = (a + (len * 4096) as usize).min(size);
                raw[a..b].fill(9);
            }
            let (p, data_size) = run_engine(raw.clone(), None);
            check_shape(&p, data_size);
            // The pages put together give back the source.
            let mut back = vec![0u8; data_size as usize];
            for piece in &p {
                if let Piece::Window { pages, .. } = piece {
                    for pg in pages {
                        back[pg.offset as usize..pg.offset as usize + pg.data.len()].copy_from_slice(&pg.data);
                    }
                }
            }
            proptest::prop_assert!(back[..size] == raw[..]);
        }
    }
}
