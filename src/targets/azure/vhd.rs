//! The byte stream a managed disk upload expects: the source as a *fixed* VHD whose data part is a whole number
//! of MiB (at least 20 MiB), followed by the 512-byte footer. This is the converters' VHD writer with
//! `subformat=fixed,round_to_mib=on`, padded up to Azure's minimum.

use imgshift_converters::{FormatWriter, Plan, Run, Sink, WriterOptions, create_writer};

use super::MIN_DISK;

/// A fixed-VHD writer sized for Azure.
pub struct AzureVhdWriter {
    inner: Box<dyn FormatWriter>,
}

impl AzureVhdWriter {
    /// The converters' VHD writer with `subformat=fixed,round_to_mib=on`.
    pub fn new() -> imgshift_converters::Result<Self> {
        let mut opts = WriterOptions::default();
        opts.set("subformat", "fixed");
        opts.set("round_to_mib", "on");
        let inner = create_writer(imgshift_converters::Format::Vpc, &mut opts)?;
        Ok(AzureVhdWriter { inner })
    }
}

impl FormatWriter for AzureVhdWriter {
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    fn output_virtual_size(&self, source_size: u64) -> imgshift_converters::Result<u64> {
        let v = self.inner.output_virtual_size(source_size)?;
        if v < MIN_DISK {
            // Sizes the inner writer for the padded disk (it remembers the last sizing).
            return self.inner.output_virtual_size(MIN_DISK);
        }
        Ok(v)
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> imgshift_converters::Result<()> {
        self.inner.begin(sink, plan)
    }

    fn write_run(
        &mut self,
        sink: &mut dyn Sink,
        offset: u64,
        run: Run<'_>,
    ) -> imgshift_converters::Result<()> {
        self.inner.write_run(sink, offset, run)
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> imgshift_converters::Result<u64> {
        self.inner.finish(sink)
    }
}

/// Checks the 512-byte footer of a fixed VHD whose data part is `data_size` bytes (Microsoft "Virtual Hard Disk
/// Image Format Specification" 1.0, "Hard Disk Footer Format"): cookie `conectix`, file format version 1.0,
/// data offset 0xFFFFFFFFFFFFFFFF (fixed disks have no dynamic header), current size = `data_size`, disk type 2
/// (fixed), and the checksum (one's complement of the sum of every byte but the checksum's own four).
pub fn check_fixed_footer(footer: &[u8], data_size: u64) -> anyhow::Result<()> {
    use anyhow::bail;
    let be32 = |at: usize| -> u32 {
        footer
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes)
    };
    let be64 = |at: usize| -> u64 {
        footer
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    };
    if footer.len() != 512 {
        bail!("the VHD footer is {} bytes, not 512", footer.len());
    }
    if footer.get(..8) != Some(&b"conectix"[..]) {
        bail!("the VHD footer's cookie is not 'conectix'");
    }
    let sum = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, &b)| a.wrapping_add(u32::from(b)));
    if be32(64) != !sum {
        bail!(
            "the VHD footer's checksum is {:#010x}, its bytes sum to {:#010x}",
            be32(64),
            !sum
        );
    }
    if be32(12) != 0x0001_0000 {
        bail!(
            "the VHD footer's format version is {:#010x}, not 1.0",
            be32(12)
        );
    }
    if be64(16) != u64::MAX {
        bail!("the VHD footer has a data offset: not a fixed disk");
    }
    if be32(60) != 2 {
        bail!("the VHD disk type is {}, not 2 (fixed hard disk)", be32(60));
    }
    if be64(48) != data_size {
        bail!(
            "the VHD footer's current size is {} bytes, the disk's data part {data_size}",
            be64(48)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgshift_converters::{ConvertOptions, NoProgress, engine};

    /// The footer the writer makes for a 20 MiB disk.
    fn footer() -> Vec<u8> {
        let raw = vec![1u8; 1 << 20];
        let storage = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        let src = imgshift_converters::open(
            storage,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap();
        let mut w = AzureVhdWriter::new().unwrap();
        let mut out = imgshift_converters::MemSink::default();
        engine::convert(
            src.as_ref(),
            &mut w,
            &mut out,
            &ConvertOptions::default(),
            &NoProgress,
        )
        .unwrap();
        out.data[MIN_DISK as usize..].to_vec()
    }

    fn resum(f: &mut [u8]) {
        f[64..68].fill(0);
        let s = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!s).to_be_bytes());
    }

    #[test]
    fn the_writers_footer_passes() {
        check_fixed_footer(&footer(), MIN_DISK).unwrap();
    }

    #[test]
    fn rejects_bad_footers() {
        let good = footer();
        let e = |f: &[u8], size: u64| check_fixed_footer(f, size).unwrap_err().to_string();
        assert!(e(&good, MIN_DISK + (1 << 20)).contains("current size"));
        assert!(e(&good[..511], MIN_DISK).contains("not 512"));
        let mut f = good.clone();
        f[0] = b'x';
        assert!(e(&f, MIN_DISK).contains("cookie"));
        let mut f = good.clone();
        f[100] ^= 1;
        assert!(e(&f, MIN_DISK).contains("checksum"));
        let mut f = good.clone();
        f[63] = 3;
        resum(&mut f);
        assert!(e(&f, MIN_DISK).contains("disk type is 3"));
        let mut f = good;
        f[16..24].fill(0);
        resum(&mut f);
        assert!(e(&f, MIN_DISK).contains("data offset"));
    }
}
